"""The execution core: compiled programs (errors name the node, source to read, shared
subexpressions), cancellation between nodes, and a 200,000-deep chain in bounded memory."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import (
    Cancellation,
    CancelledError,
    ExecutionError,
    LocalExecutor,
    Node,
    RunRequest,
)
from graphgrad.engine import Graph as EngineGraph
from graphgrad.engine.codegen import CHUNK, compile_program
from graphgrad.engine.driver import program
from graphgrad.engine.plan_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PLANS


def test_an_op_failing_inside_a_compiled_program_names_its_node():
    with gg.Graph() as g:
        x = gg.input("x", shape=(0,))
        gg.max(gg.sin(x, name="s"), name="the max")
    with pytest.raises(ExecutionError, match="node 'the max'") as info:
        LocalExecutor().run(g.freeze(), RunRequest(("the max",), {"x": np.zeros(0)}))
    assert "op 'max' failed" in str(info.value)


def test_program_source_is_straight_line_python_with_node_names():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        z = gg.mul(x, x, name="z")
        gg.sum(gg.tanh(z, name="h"), name="L")
    graph = g.freeze()
    executor = LocalExecutor()
    request = RunRequest(("L",), {"x": np.ones(3)}, ("x",))
    _, sched = executor.plan(graph, request)
    forward, backward = (program(sched.graph, s) for s in sched.tasks[:2])
    assert "'h' tanh" in forward.source and "'z' mul" in forward.source
    assert "check()" in forward.source and "del v" in forward.source
    # d(x*x)/dx emits g*x for each slot: the two equal products are computed once.
    assert backward.source.count("vjp(z)") == 1
    res = executor.run(graph, request)
    np.testing.assert_allclose(res.grads["x"], 2 * (1 - np.tanh(1.0) ** 2) * np.ones(3))


def test_explain_shows_each_partitions_generated_source():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        L = gg.sum(gg.tanh(x, name="h"), name="L")
    plan = gg.connect().explain(L, wrt=[x], executor="local")
    assert "'h' tanh" in plan.source(0, "forward")
    assert "vjp(h)" in plan.source(0, "backward")


def test_large_programs_compile_in_chunks_with_linear_cost():
    def chain(n: int) -> EngineGraph:
        nodes = [Node("x", "input", shape=(2,), dtype="float64")]
        nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(n)]
        return EngineGraph(nodes)

    for n in (CHUNK, 8 * CHUNK):  # bench/bigdag.py times the compile
        graph = chain(n)
        prog = compile_program(graph, list(range(1, n + 1)), [n])
        assert len(prog.chunks) == n // CHUNK
        out = prog({0: np.array([1.0, -2.0])}, Cancellation())
        np.testing.assert_array_equal(out[n], np.array([1.0, -2.0]))


def test_cancelling_stops_a_long_local_run_between_nodes():
    with gg.Graph() as g:
        h = gg.input("x", shape=(200, 200))
        eye = gg.constant(np.eye(200) * 0.5)
        for _ in range(20_000):  # far more work than the test waits for
            h = gg.tanh(h @ eye)
        gg.sum(h, name="y")
    graph = g.freeze()
    cancel = Cancellation()
    threading.Timer(0.5, cancel.cancel).start()
    with pytest.raises(CancelledError):
        LocalExecutor().run(graph, RunRequest(("y",), {"x": np.ones((200, 200))}), cancel)
    with pytest.raises(CancelledError, match="deadline"):
        LocalExecutor().run(
            graph,
            RunRequest(("y",), {"x": np.ones((200, 200))}),
            Cancellation(deadline=time.monotonic() + 0.5),
        )


@pytest.mark.slow
def test_a_200000_deep_chain_runs_in_bounded_memory():
    n, depth = 10_000, 200_000
    nodes = [Node("x", "input", shape=(n,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(depth)]
    nodes.append(Node("L", "sum", (f"n{depth - 1}",)))
    graph = EngineGraph(nodes)
    request = RunRequest(("L",), {"x": np.linspace(0, 1, n)}, ("x",))
    executor = LocalExecutor()
    PLANS.configure(DEFAULT_ENTRIES, 4 << 30)  # room for this graph's programs
    try:
        executor.run(graph, request)  # transform and compile once
        tracemalloc.start()
        res = executor.run(graph, request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        PLANS.configure(DEFAULT_ENTRIES, DEFAULT_BYTES)
    np.testing.assert_array_equal(res.grads["x"], np.ones(n))  # (-1)**200000
    assert peak < 40 * n * 8  # a few live values, never the chain's 200,000
