"""Start a real `graphgrad serve` subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

import graphgrad as gg


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    address: str  # host:port
    log_path: str
    banner: str = ""  # the line the server printed once serving

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
    server = ServerProcess(proc, match.group(1), log_path, line[0].strip())
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


def probe_run(client: gg.RemoteClient, timeout: float) -> str:
    """What a tiny Run meets within `timeout` seconds: "served"; "waited" (its deadline
    passed, in the queue for a run slot); or "refused" (RESOURCE_EXHAUSTED naming
    max_concurrent_runs: every slot and queue place taken)."""
    with gg.Graph():
        probe = gg.neg(gg.input("p", shape=()))
    try:
        client.run(probe, {"p": np.zeros(())}, timeout=timeout)
    except gg.RemoteError as e:
        if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "waited"
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and [s for s, _ in e.violations] == [
            "max_concurrent_runs"
        ]:
            return "refused"
        raise
    return "served"


def wait_until_probe(client: gg.RemoteClient, outcome: str, timeout: float = 120.0) -> None:
    """Until a probe Run meets `outcome` (see probe_run); `timeout` bounds the wait only."""
    give_up = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < give_up:
        seen = probe_run(client, timeout=2.0)
        if seen == outcome:
            return
        time.sleep(0.05)
    raise AssertionError(f"a probe Run never met {outcome!r}; the last one was {seen!r}")


def wait_until_running(client: gg.RemoteClient, timeout: float = 120.0) -> None:
    """On a server with --max-concurrent-runs 1 --run-queue 0: until a probe Run is refused
    for want of the run slot, so the long call sent before holds it."""
    wait_until_probe(client, "refused", timeout)


def assert_good_request_served(client) -> None:
    """After a bad request: the server still answers a good one, right."""
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x * x)
    res = client.run(y, {"x": np.array([1.0, 2.0, 3.0])}, wrt=[x])
    np.testing.assert_array_equal(res.grads["x"], [2.0, 4.0, 6.0])
