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


def test_rss_comes_back_after_requests_of_large_arrays():
    # Arrays of 4 MiB: after glibc frees the first large mmap it raises its threshold, and
    # every later array of that size lands on a heap that is never given back.
    n = (4 * MIB) // 8
    with gg.Graph():
        x = gg.input("x", shape=(n,))
        h = x
        for _ in range(40):
            h = gg.tanh(h) * 0.5 + h
        loss = gg.sum(h)
    feeds = {"x": np.linspace(-1, 1, n)}
    with running_server() as server, gg.connect(server.address) as client:
        client.run(gg.sum(x), feeds)  # the server's code paths warmed by a light request
        before = rss(server.proc.pid)
        for _ in range(3):
            client.run(loss, feeds, wrt=["x"])
        after = rss(server.proc.pid)
    # The run held ~80 values of 4 MiB at its peak; returning memory leaves far less behind.
    assert after - before < 40 * MIB, f"RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB"


def minor_faults(pid: int) -> int:
    """Pages the process has faulted in so far (minor faults: memory it had given back)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_a_repeated_request_reuses_its_memory_instead_of_faulting_it_back():
    # Values under the 1 MiB mmap threshold live on malloc's heap. Trimmed back to the
    # system after every request, a request made again page-faults them all in anew.
    shape = (64, 128)  # 64 KiB values, ~240 of them held for the backward: ~15 MiB of heap
    with gg.Graph():
        x = gg.input("x", shape=shape)
        h = x
        for _ in range(80):
            h = gg.tanh(h) * 0.5 + h
        loss = gg.sum(h)
    feeds = {"x": np.linspace(-1, 1, shape[0] * shape[1]).reshape(shape)}
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
    with gg.Graph():
        x = gg.input("x", shape=(n,))
        h = x
        for _ in range(120):
            h = gg.tanh(h) * 0.5 + h
        loss = gg.sum(h)
    feeds = {"x": np.linspace(-1, 1, n)}
    with running_server() as server, gg.connect(server.address) as client:
        client.run(gg.sum(x), feeds)
        before = rss(server.proc.pid)
        for _ in range(3):
            client.run(loss, feeds, wrt=["x"])
        after = rss(server.proc.pid)
    kept = SERVER_TRIM_THRESHOLD + 24 * MIB  # and what the server's code paths allocated
    assert after - before < kept, f"RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB"
