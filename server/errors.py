"""Engine exceptions -> gRPC status codes with google.rpc details."""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from graphgrad.engine import (
    CancelledError,
    CancelReason,
    ExecutionError,
    FeedError,
    GraphError,
    LimitError,
    RequestError,
    ValidationError,
)
from graphgrad.engine.errors import ERROR_DOMAIN, NotFoundError, error_kind
from graphgrad.onnx import OnnxUnavailableError
from graphgrad.wire import FieldError

log = logging.getLogger("graphgrad.server")


# A status travels in gRPC metadata (8 KiB by default; the message percent-encoded, up to
# 3 bytes per byte, the details base64-encoded): these bounds keep any status well under it.
MAX_MESSAGE_BYTES = 1024
MAX_DETAIL_BYTES = 512


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, with a marker saying how much was cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    marker = f"... [truncated, {len(raw):,} bytes in all]"
    return raw[: limit - len(marker)].decode("utf-8", "ignore") + marker


def _clip_strings(message: Message) -> None:
    """Clip every string field of a detail message, nested ones included."""
    for fd, value in message.ListFields():
        if fd.type == fd.TYPE_STRING:
            if isinstance(value, str):
                setattr(message, fd.name, clip(value, MAX_DETAIL_BYTES))
            else:
                value[:] = [clip(v, MAX_DETAIL_BYTES) for v in value]
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key in list(value):  # string maps (ErrorInfo.metadata): keys are ours
                if isinstance(value[key], str):
                    value[key] = clip(value[key], MAX_DETAIL_BYTES)
        elif fd.type == fd.TYPE_MESSAGE:
            for sub in [value] if isinstance(value, Message) else value:
                _clip_strings(sub)


def _status(code: int, message: str, *details: Message | None) -> grpc.Status:
    st = status_pb2.Status(code=code, message=clip(message, MAX_MESSAGE_BYTES))
    for detail in details:
        if detail is None:
            continue
        _clip_strings(detail)
        packed = any_pb2.Any()
        packed.Pack(detail)
        st.details.append(packed)
    return rpc_status.to_status(st)


def _error_info(e: GraphError) -> error_details_pb2.ErrorInfo:
    """Which engine error this is and where (node, field...): clients raise the same class."""
    kind, where = error_kind(e)
    return error_details_pb2.ErrorInfo(reason=kind, domain=ERROR_DOMAIN, metadata=where)


def _bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        ]
    )


class Deadline(Protocol):
    """What a status needs of a call: a servicer context, or the pool's CallContext."""

    def time_remaining(self) -> float | None: ...


def to_status(e: BaseException, context: Deadline | None = None) -> grpc.Status:
    """The status a client gets for an exception raised while serving."""
    msg = str(e)
    info = _error_info(e) if isinstance(e, GraphError) else None
    if isinstance(e, ValidationError):
        field = f"graph.nodes['{e.node}'].{e.field}" if e.node is not None else f"graph.{e.field}"
        return _status(code_pb2.INVALID_ARGUMENT, msg, _bad_request(field, e.reason), info)
    if isinstance(e, FeedError):
        return _status(
            code_pb2.INVALID_ARGUMENT, msg, _bad_request(f"feeds['{e.input_name}']", msg), info
        )
    if isinstance(e, RequestError | FieldError):
        return _status(code_pb2.INVALID_ARGUMENT, msg, _bad_request(e.field or "", msg), info)
    if isinstance(e, ExecutionError):
        return _status(
            code_pb2.INVALID_ARGUMENT, msg, _bad_request(f"graph.nodes['{e.node}']", msg), info
        )
    if isinstance(e, LimitError):
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=e.limit, description=msg)]
        )
        return _status(code_pb2.RESOURCE_EXHAUSTED, msg, quota, info)
    if isinstance(e, NotFoundError):
        info = error_details_pb2.ResourceInfo(
            resource_type=e.kind, resource_name=e.name, description=f"unknown {e.kind}"
        )
        what = (
            f"no graph with fingerprint {e.name}; register it"
            if e.kind == "graph"
            else f"no {e.kind} '{e.name}'"
        )
        return _status(code_pb2.NOT_FOUND, what, info)
    if isinstance(e, CancelledError):
        # From why it stopped (and, should a lower layer not know, whether the call's
        # deadline has passed), never from the message.
        remaining = None if context is None else context.time_remaining()
        expired = remaining is not None and remaining <= 0
        deadline = e.reason == CancelReason.DEADLINE or expired
        return _status(code_pb2.DEADLINE_EXCEEDED if deadline else code_pb2.CANCELLED, msg, info)
    if isinstance(e, OnnxUnavailableError):
        return _status(code_pb2.FAILED_PRECONDITION, f"this server cannot read ONNX models: {msg}")
    if isinstance(e, GraphError):
        return _status(code_pb2.INVALID_ARGUMENT, msg, info)
    log.exception("internal error while serving a request")
    return _status(code_pb2.INTERNAL, f"internal error: {type(e).__name__}: {e}")
