"""The server gives memory back after a large request: its RSS returns near where it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import graphgrad as gg

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
