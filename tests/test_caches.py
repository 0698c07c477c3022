"""Issue 10 items 5 and 12b: every cache bounded in bytes as well as entries, reported in
GetServerInfo; nonsensical cache bounds refused at start."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import Graph, Node
from graphgrad.engine.lru import LRU

from .server_proc import running_server

PLAN_ENTRIES, PLAN_BYTES = 50, 3_000_000


def chain(n: int) -> list[gg.Tensor]:
    h = gg.input("x", shape=(2,))
    out = []
    for _ in range(n):
        h = gg.neg(h)
        out.append(h)
    return out


@pytest.fixture(scope="module")
def client():
    args = ("--graph-cache-bytes", "4000000", "--plan-cache-size", str(PLAN_ENTRIES))
    with (
        running_server(*args, "--plan-cache-bytes", str(PLAN_BYTES)) as server,
        gg.connect(server.address) as c,
    ):
        yield c


def test_lru_is_bounded_by_bytes_and_entries():
    lru: LRU[str, bytes] = LRU(3, max_bytes=10, size=len)
    for k in "abc":
        lru.put(k, b"xxxx")  # 12 bytes: "a" goes
    assert lru.get("a") is None and lru.stats().bytes == 8 and len(lru) == 2
    too_big = b"x" * 11
    assert lru.put("big", too_big) is too_big and lru.get("big") is None and not lru.fits(too_big)
    for k in "defg":
        lru.put(k, b"x")
    assert len(lru) == 3 and lru.stats().max_entries == 3 and lru.stats().max_bytes == 10


def test_graph_cache_bytes_nodes_estimate_is_not_below_what_a_graph_holds():
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        nodes = [Node("x", "input", shape=(2,), dtype="float64")]
        nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(20_000)]
        graph = Graph(nodes)
        del nodes
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= graph.approx_bytes() <= 2 * held


def test_plan_cache_estimate_is_not_below_what_plans_hold():
    import gc
    import tracemalloc

    from graphgrad.engine import RunRequest
    from graphgrad.engine.dispatch import Dispatcher
    from graphgrad.engine.plan_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PLANS

    nodes = [Node("x", "input", shape=(2,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(2000)]
    graph, dispatcher, x = Graph(nodes), Dispatcher(ray_enabled=False), np.ones(2)
    PLANS.configure(100_000, 1 << 40)
    try:
        dispatcher.run(graph, RunRequest(("n0",), {"x": x}))  # per-graph values (costs)
        gc.collect()
        tracemalloc.start()
        before, counted = tracemalloc.get_traced_memory()[0], PLANS.stats().bytes
        for k in range(1000, 1050):
            out = f"n{k}"
            dispatcher.run(graph, RunRequest((out,), {"x": x}, ("x",), {out: x}))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        estimated = PLANS.stats().bytes - counted
    finally:
        tracemalloc.stop()
        PLANS.configure(DEFAULT_ENTRIES, DEFAULT_BYTES)
    assert held <= estimated <= 2 * held


def test_a_thousand_runs_with_distinct_outputs_keep_the_plan_cache_bounded(client):
    with gg.Graph():
        nodes = chain(2000)
    feeds = {"x": np.array([1.0, 2.0])}
    for k in range(1000):
        sign = -1.0 if k % 2 == 0 else 1.0
        if k % 2:
            res = client.run(nodes[k], feeds, wrt=["x"], grad_outputs={nodes[k]: np.ones(2)})
            np.testing.assert_array_equal(res.grads["x"], [sign, sign])
        else:
            res = client.run(nodes[k], feeds)
        np.testing.assert_array_equal(res.value, [sign, 2 * sign])
    plans = client.server_info().caches["plans"]
    assert (plans.max_entries, plans.max_bytes) == (PLAN_ENTRIES, PLAN_BYTES)
    assert 0 < plans.entries <= PLAN_ENTRIES and 0 < plans.bytes <= PLAN_BYTES
    graphs = client.server_info().caches["graphs"]
    assert graphs.entries == 1 and 0 < graphs.bytes <= graphs.max_bytes == 4_000_000


def test_a_graph_larger_than_the_graph_cache_is_refused(client):
    with gg.Graph():
        nodes = chain(10_000)  # about 6 MB estimated, over the 4 MB cache
    with pytest.raises(gg.RemoteError) as e:
        client.run(nodes[-1], {"x": np.ones(2)})
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.violations[0][0] == "graph_cache_bytes"
    with gg.Graph():
        small = gg.sum(gg.input("x", shape=(2,)) * 3.0)
    assert float(client.run(small, {"x": np.ones(2)}).value) == 6.0


@pytest.mark.parametrize(
    "flag", ["--graph-cache-size", "--graph-cache-bytes", "--plan-cache-size", "--plan-cache-bytes"]
)
def test_nonsensical_cache_bounds_are_refused_at_start(flag):
    with tempfile.TemporaryDirectory(prefix="graphgrad-data-") as data:
        args = ["--port", "0", "--no-ray", "--data-dir", data, flag, "0"]
        try:
            done = subprocess.run(
                [sys.executable, "-m", "graphgrad.server", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server started with {flag} 0")
    assert done.returncode != 0 and "serving on" not in done.stdout
    assert done.stderr.strip() == f"graphgrad serve: {flag} must be at least 1, got 0"
