"""The server gives memory back after a large request, and keeps a bounded heap between requests
so that a request made again does not fault its memory back in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import graphgrad as gg
from graphgrad.server.cli import SERVER_TRIM_THRESHOLD

from .server_proc import running_server

MIB = 1 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def residual_chain(
    shape: tuple[int, ...], depth: int
) -> tuple[gg.Tensor, gg.Tensor, dict[str, np.ndarray]]:
    """x, the sum of `depth` steps h = tanh(h) / 2 + h from it, and x's feeds."""
    with gg.Graph():
        x = gg.input("x", shape=shape)
        h = x
        for _ in range(depth):
            h = gg.tanh(h) * 0.5 + h
        loss = gg.sum(h)
    return x, loss, {"x": np.linspace(-1, 1, int(np.prod(shape))).reshape(shape)}


def rss_around_three_runs(
    x: gg.Tensor, loss: gg.Tensor, feeds: dict[str, np.ndarray]
) -> tuple[int, int]:
    """A server's RSS before and after three runs of loss's gradient (its code paths warmed
    first by a light request)."""
    with running_server() as server, gg.connect(server.address) as client:
        client.run(gg.sum(x), feeds)
        before = rss(server.proc.pid)
        for _ in range(3):
            client.run(loss, feeds, wrt=["x"])
        return before, rss(server.proc.pid)


def test_rss_comes_back_after_requests_of_large_arrays():
    # Arrays of 4 MiB: after glibc frees the first large mmap it raises its threshold, and
    # every later array of that size lands on a heap that is never given back.
    n = (4 * MIB) // 8
    before, after = rss_around_three_runs(*residual_chain((n,), 40))
    # The run held ~80 values of 4 MiB at its peak; returning memory leaves far less behind.
    assert after - before < 40 * MIB, f"RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB"


def minor_faults(pid: int) -> int:
    """Pages the process has faulted in so far (minor faults: memory it had given back)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_a_repeated_request_reuses_its_memory_instead_of_faulting_it_back():
    # Values under the 1 MiB mmap threshold live on malloc's heap. Trimmed back to the
    # system after every request, a request made again page-faults them all in anew.
    shape = (64, 128)  # 64 KiB values, ~240 of them held for the backward: ~15 MiB of heap
    _, loss, feeds = residual_chain(shape, 80)
    pages = 240 * (8 * shape[0] * shape[1]) // 4096
    with running_server() as server, gg.connect(server.address) as client:
        for _ in range(20):  # past the tier-up: the compiled program runs from here on
            client.run(loss, feeds, wrt=["x"])
        before = minor_faults(server.proc.pid)
        for _ in range(5):
            client.run(loss, feeds, wrt=["x"])
        per_call = (minor_faults(server.proc.pid) - before) / 5
    assert per_call < pages / 10, f"{per_call:.0f} page faults a call (its values: {pages} pages)"


def test_rss_is_bounded_after_requests_of_many_arrays_under_the_mmap_threshold():
    # Values of 512 KiB stay on the heap. A request holding ~120 MiB of them, run three times
    # (by whichever threads), leaves at most the heap's kept free memory behind.
    n = (512 << 10) // 8
    before, after = rss_around_three_runs(*residual_chain((n,), 120))
    kept = SERVER_TRIM_THRESHOLD + 24 * MIB  # and what the server's code paths allocated
    assert after - before < kept, f"RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB"
