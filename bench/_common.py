"""Shared by the benchmarks: timing and a real `graphgrad serve` subprocess."""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def interleaved_medians(
    fns: dict[str, Callable[[], object]], calls: int, block: int = 25
) -> dict[str, float]:
    """Median seconds per call of each function, sampled in alternating blocks so that drift
    on a shared machine affects every function alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(20):
            fn()
    while len(next(iter(samples.values()))) < calls:
        for k, fn in fns.items():
            for _ in range(block):
                t = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def median_seconds(fn: Callable[[], object], calls: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


@contextmanager
def subprocess_server(
    cmd: list[str], pattern: str = r"serving on grpcs?://(\S+)", stderr: int | None = None
) -> Iterator[str]:
    """Start a server process that prints its address on its first line; yield the address.
    `stderr`: where its log goes (default: this process's stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None
    match = re.search(pattern, proc.stdout.readline())
    if match is None:
        proc.kill()
        raise RuntimeError(f"{cmd} did not start")
    try:
        yield match.group(1)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM a server process, and SIGKILL it if it has not exited within `grace` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def graphgrad_server(*args: str, stderr: int | None = None) -> Iterator[str]:
    """A `graphgrad serve` on a free loopback port with a temporary data dir (a benchmark never
    touches the user's job store); yields its address."""
    with tempfile.TemporaryDirectory(prefix="graphgrad-bench-") as data_dir:
        cmd = [sys.executable, "-m", "graphgrad.server", "--port", "0", "--data-dir", data_dir]
        with subprocess_server([*cmd, *args], stderr=stderr) as address:
            yield address


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} us"
