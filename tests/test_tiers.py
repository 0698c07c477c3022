"""Tiered programs (engine/codegen.py): a program is interpreted from its lowered steps until
its TIER_UP_CALLS-th call, then compiled; both tiers give the same bits, check cancellation
between the same nodes, and name a node whose op fails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import graphgrad as gg
from graphgrad.engine import (
    CancelledError,
    ExecutionError,
    Graph,
    LocalExecutor,
    Node,
    RunRequest,
    codegen,
)
from graphgrad.engine.autodiff import plan_pass
from graphgrad.engine.codegen import (
    CHECK_EVERY,
    PROGRAM_NODE_BYTES,
    TIER_UP_CALLS,
    compile_program,
)
from graphgrad.engine.driver import InlineProgram, inline_program, run_inline
from graphgrad.engine.executor import Cancellation
from graphgrad.engine.plan_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PLANS

from .strategies import random_requests


def fresh_program(graph: Graph, request: RunRequest) -> InlineProgram:
    """The request's inline program, made anew (never called: interpreted first)."""
    _, sched = LocalExecutor().plan(graph, request)
    seeded = tuple(request.grad_outputs or ())
    return inline_program(graph, sched, plan_pass(graph, request.outputs, request.wrt, seeded))


def bits(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()) for k, a in arrays.items()}


@settings(max_examples=40)
@given(random_requests())
def test_the_interpreted_and_compiled_tiers_give_the_same_bits(case):
    nodes, request = case
    graph = Graph(nodes)
    ip = fresh_program(graph, request)
    runs = []
    for _ in range(TIER_UP_CALLS):
        tier = ip.program.tier
        runs.append((tier, run_inline(graph, ip, request, Cancellation())))
    assert [tier for tier, _ in runs] == ["interpreted"] * TIER_UP_CALLS
    assert ip.program.tier == "compiled"
    (_, (values, grads)), (_, (values2, grads2)) = runs[0], runs[-1]
    assert bits(values) == bits(values2) and bits(grads) == bits(grads2)


def chain(n: int) -> tuple[Graph, RunRequest]:
    nodes = [Node("x", "input", shape=(4,), dtype="float64")]
    nodes += [
        Node(f"n{i}", "sin" if i % 2 else "neg", (f"n{i - 1}" if i else "x",)) for i in range(n)
    ]
    nodes.append(Node("L", "sum", (f"n{n - 1}",)))
    return Graph(nodes), RunRequest(("L",), {"x": np.linspace(-1, 1, 4)}, ("x",))


def test_the_program_compiles_on_its_tier_up_call_and_shows_its_source_before():
    graph, request = chain(50)
    ip = fresh_program(graph, request)
    source = ip.program.source  # rendered on demand: reading it compiles nothing
    assert "'n7' sin" in source and ip.program.tier == "interpreted"
    tiers = []
    for _ in range(TIER_UP_CALLS + 1):
        run_inline(graph, ip, request, Cancellation())
        tiers.append(ip.program.tier)
    assert tiers == ["interpreted"] * (TIER_UP_CALLS - 1) + ["compiled"] * 2
    assert ip.program.source == source  # the compiled tier runs what was shown


class CountingCancellation(Cancellation):
    """Cancels itself at its `at`-th check (what another thread's cancel would do)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.checks = at, 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.at:
            self.cancel()
        super().check()


@pytest.mark.parametrize("compiled", [False, True])
def test_cancellation_stops_either_tier_between_nodes(compiled):
    graph, request = chain(400)
    ip = fresh_program(graph, request)
    if compiled:
        ip.program.compiled()
    cancel = CountingCancellation(at=3)
    with pytest.raises(CancelledError):
        run_inline(graph, ip, request, cancel)
    # stopped at the third check, about 2 * CHECK_EVERY nodes in, of some 1,200
    assert cancel.checks == 3 and ip.program.tier == ("compiled" if compiled else "interpreted")
    assert len(ip.program.steps) > 20 * CHECK_EVERY


@pytest.mark.parametrize("calls", [1, TIER_UP_CALLS])
def test_an_op_failing_in_either_tier_names_its_node(calls):
    with gg.Graph() as g:
        x = gg.input("x", shape=(0,))
        gg.max(gg.sin(x, name="s"), name="the max")
    graph = g.freeze()
    request = RunRequest(("the max",), {"x": np.zeros(0)})
    ip = fresh_program(graph, request)
    for call in range(1, calls + 1):
        with pytest.raises(ExecutionError, match="node 'the max'") as info:
            run_inline(graph, ip, request, Cancellation())
        assert "op 'max' failed" in str(info.value)
        assert ip.program.tier == ("compiled" if call >= TIER_UP_CALLS else "interpreted")


def test_a_program_of_a_plain_list_of_nodes_runs_in_both_tiers():
    graph, _ = chain(10)
    nodes = [i for i in range(len(graph)) if graph.nodes[i].op != "input"]
    program = compile_program(graph, nodes, [graph.index["L"], graph.index["n3"]])
    x = np.linspace(-1, 1, 4)
    first = program({graph.index["x"]: x}, Cancellation())
    program.compiled()
    second = program({graph.index["x"]: x}, Cancellation())
    assert program.tier == "compiled" and first.keys() == second.keys()
    for i in first:
        assert first[i].tobytes() == second[i].tobytes()
    np.testing.assert_array_equal(second[graph.index["n3"]], np.sin(-np.sin(-x)))


def test_a_compiled_tier_larger_than_the_plan_cache_is_made_once_then_the_program_interprets(
    monkeypatch,
):
    graph, request = chain(200)
    ip = fresh_program(graph, request)
    expected = bits(run_inline(graph, ip, request, Cancellation())[1])
    made = []
    compile_ = codegen._compile
    monkeypatch.setattr(codegen, "_compile", lambda p: made.append(p) or compile_(p))
    PLANS.configure(DEFAULT_ENTRIES, 200 * PROGRAM_NODE_BYTES)  # below the compiled tier's size
    try:
        for _ in range(TIER_UP_CALLS + 4):
            assert bits(run_inline(graph, ip, request, Cancellation())[1]) == expected
        assert ip.program.tier == "interpreted" and len(made) == 1  # not again on every call
        assert PLANS.stats().bytes <= PLANS.stats().max_bytes
    finally:
        PLANS.configure(DEFAULT_ENTRIES, DEFAULT_BYTES)


@pytest.mark.parametrize("compiled", [False, True])
def test_either_tier_frees_a_long_chain_as_it_goes(compiled):
    import tracemalloc

    n, depth = 10_000, 3_000  # without freeing, the chain's values hold 240 MB
    nodes = [Node("x", "input", shape=(n,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(depth)]
    nodes.append(Node("L", "sum", (f"n{depth - 1}",)))
    graph = Graph(nodes)
    request = RunRequest(("L",), {"x": np.linspace(0, 1, n)}, ("x",))
    ip = fresh_program(graph, request)
    if compiled:
        ip.program.compiled()  # made before measuring: the run is what is measured
    tracemalloc.start()
    try:
        _, grads = run_inline(graph, ip, request, Cancellation())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ip.program.tier == ("compiled" if compiled else "interpreted")
    np.testing.assert_array_equal(grads["x"], np.ones(n))  # (-1)**3000
    assert peak < 40 * n * 8  # a few live values, never the chain's 3,000
