"""Start a real `graphgrad serve` subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str  # host:port
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text()


@contextmanager
def running_server(
    *args: str,
    env: dict[str, str] | None = None,
    startup_timeout: float = 120.0,
    ray: bool = False,
) -> Iterator[ServerProcess]:
    """`ray=False` (the default) adds --no-ray unless the args attach Ray themselves: most
    end-to-end tests are about gRPC, and each embedded Ray costs seconds of CPU on 2 cores.
    Without a --data-dir the server gets a temporary one: tests never touch the user's store."""
    if not ray and "--ray-address" not in args:
        args = (*args, "--no-ray")
    scratch = None
    if "--data-dir" not in args:
        scratch = tempfile.TemporaryDirectory(prefix="graphgrad-data-")
        args = (*args, "--data-dir", scratch.name)
    fd, log_path = tempfile.mkstemp(prefix="graphgrad-server-", suffix=".log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphgrad.server", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=fd,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(startup_timeout)
    match = re.search(r"serving on grpcs?://(\S+)", line[0] if line else "")
    if match is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{Path(log_path).read_text()}")
    server = ServerProcess(proc, match.group(1), log_path)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(fd)
        os.unlink(log_path)
        if scratch is not None:
            scratch.cleanup()
