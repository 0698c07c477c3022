"""Structured log lines: one per request (logger `graphgrad.requests`, at DEBUG: a busy
server answers thousands a second) and one per job state change (`graphgrad.jobs`, at INFO),
written as key=value text or as one JSON object a line (`--log-format`).

A structured line is a short message and its fields: `event(logger, level, message, **fields)`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

REQUESTS = logging.getLogger("graphgrad.requests")
JOBS = logging.getLogger("graphgrad.jobs")
FORMATS = ("text", "json")
MAX_ERROR_CHARS = 300  # of a failed request's status message, in its line
MAX_FIELD_CHARS = 300  # of any other text field: ids and fingerprints come from clients


def worker_id(pid: int | None = None) -> str:
    """This server process (or its worker `pid`), as the wire names it ("HOST:PID")."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        fields = {k: _short(v) if isinstance(v, str) else v for k, v in fields.items()}
        logger.log(level, message, extra={"fields": fields})


def _short(text: str, most: int = MAX_FIELD_CHARS) -> str:
    """`text`, or its first `most` characters and how long it was: a line stays a line."""
    return text if len(text) <= most else f"{text[:most]}...({len(text)} chars)"


def _text(value: Any) -> str:
    """A value of a key=value pair: quoted (JSON, ASCII) when it is empty or has spaces,
    quotes or anything unprintable: names and job ids come from clients, and a carriage
    return, a line separator or a terminal escape in them must not forge or hide a line."""
    text = str(value)
    if not text or not text.isprintable() or any(c in text for c in ' "='):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {pairs}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """The server's logging: every line to stderr, in `fmt` (FORMATS); graphgrad's own lines
    from `level` up, other libraries' from INFO up (their DEBUG is a line per call)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    chosen = logging.getLevelName(level.upper())
    logging.basicConfig(level=max(chosen, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("graphgrad").setLevel(chosen)


def _field(message: Message | None, *path: str) -> Any:
    """A (nested) field of a message, or "" where the message has no such field."""
    for name in path:
        if message is None or name not in message.DESCRIPTOR.fields_by_name:
            return ""
        message = getattr(message, name)
    return message


def log_request(
    method: str,
    code: str,
    seconds: float,
    request_bytes: int,
    response_bytes: int,
    request: Message | None,
    response: Message | Callable[[], Message] | None,
    error: str = "",
) -> None:
    """The request's line: its fingerprint, job and executor where the messages carry them.
    `response` may be what makes it (a servicer that answers with bytes: parsed only here)."""
    if not REQUESTS.isEnabledFor(logging.DEBUG):
        return
    if callable(response):
        response = response()
    fields: dict[str, Any] = {"method": method}
    fingerprint = _field(response, "fingerprint") or _field(request, "fingerprint")
    if fingerprint:
        fields["fingerprint"] = fingerprint
    job = _field(request, "id") or _field(response, "id")  # the JobService's calls
    if job:
        fields["job"] = job
    executor = _field(response, "stats", "executor") or _field(response, "executor")
    if executor:
        fields["executor"] = executor
    fields.update(
        status=code,
        duration_ms=round(seconds * 1e3, 3),
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        worker=worker_id(),
    )
    if error:
        fields["error"] = error[:MAX_ERROR_CHARS]
    event(REQUESTS, logging.DEBUG, "request", **fields)


def log_job_change(job_id: str, old: str | None, new: str, error: str = "") -> None:
    """A job's state changed (`old` None: it is new)."""
    fields: dict[str, Any] = {"job": job_id, "old": old or "none", "new": new}
    fields["worker"] = worker_id()
    if error:
        fields["error"] = error[:MAX_ERROR_CHARS]
    event(JOBS, logging.INFO, "job state", **fields)
