"""The eager first tier (engine/eager.py): a request's first calls run as a tape over its own
graph and give the compiled program's bits, check cancellation between nodes, free values as
they go, and the request tiers up to its compiled program on its TIER_UP_CALLS-th call."""

from __future__ import annotations

import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings

import graphgrad as gg
from graphgrad.engine import CancelledError, Graph, LocalExecutor, Node, RunRequest
from graphgrad.engine.codegen import CHECK_EVERY, TIER_UP_CALLS
from graphgrad.engine.driver import run_inline
from graphgrad.engine.eager import (
    CHECK_LOWERING,
    MAX_FRAMES,
    EagerOpError,
    Tape,
    held_tape,
    record,
    run_tape,
)
from graphgrad.engine.executor import _INLINE, Cancellation, request_key

from .gradcheck import numerical_vjp
from .strategies import random_requests
from .test_tiers import CountingCancellation, bits, chain, fresh_program


def eager(graph: Graph, request: RunRequest, cancel: Cancellation | None = None):
    """The request's first call: a fresh tape, run once."""
    return run_tape(
        graph, Tape(graph, request_key(graph, request)), request, cancel or Cancellation()
    )


def compiled(graph: Graph, request: RunRequest):
    ip = fresh_program(graph, request)
    ip.program.compiled()
    return run_inline(graph, ip, request, Cancellation())


def recorded(graph: Graph, request: RunRequest):
    """The request's first call: its tape made as the forward pass runs."""
    _, values, grads = record(graph, request_key(graph, request), request, Cancellation())
    return values, grads


def same_bits(graph: Graph, request: RunRequest) -> None:
    (values, grads), (values2, grads2) = eager(graph, request), compiled(graph, request)
    assert bits(values) == bits(values2) and bits(grads) == bits(grads2)
    values3, grads3 = recorded(graph, request)
    assert bits(values3) == bits(values2) and bits(grads3) == bits(grads2)


@settings(max_examples=60)
@given(random_requests())
def test_the_eager_tier_gives_the_compiled_programs_bits(case):
    nodes, request = case
    same_bits(Graph(nodes), request)


def matmul_layers() -> tuple[Graph, RunRequest]:
    """Matmuls, broadcasting, reductions over axes and the loss ops: where the layout of a
    folded constant (the seed's broadcast, a transposed constant) steers a kernel's bits."""
    rng = np.random.default_rng(0)
    with gg.Graph() as g:
        x, W = gg.input("x", shape=(8, 5)), gg.input("W", shape=(5, 7))
        b, labels = gg.input("b", shape=(7,)), gg.input("y", shape=(8, 7))
        D = gg.constant(rng.standard_normal((5, 7)))
        h = gg.tanh(x @ W + b)
        z = gg.log_softmax(h @ gg.transpose(D) @ W, axis=1)
        m = gg.max(h * 2.0, axis=0, keepdims=True) - gg.mean(h, axis=1, keepdims=True)
        s = gg.sum(gg.softmax_cross_entropy(z, labels)) + gg.sum(W * gg.sum(m))
        gg.sum(s * gg.sum(x @ W), name="L")
    feeds = {
        "x": rng.standard_normal((8, 5)),
        "W": rng.standard_normal((5, 7)),
        "b": rng.standard_normal(7),
        "y": np.eye(7)[rng.integers(0, 7, 8)],
    }
    return g.freeze(), RunRequest(("L",), feeds, ("W", "b", "x", "W"))


def test_matmuls_reductions_and_losses_give_the_compiled_programs_bits():
    graph, request = matmul_layers()
    same_bits(graph, request)
    seeded = RunRequest(request.outputs, request.feeds, request.wrt, {"L": np.array(0.5)})
    same_bits(graph, seeded)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("gradients", [True, False])
def test_cancellation_stops_the_eager_tier_between_nodes(first, gradients):
    """On a tape (later calls) and while the tape is made (the first call); in the forward
    pass alone too (no gradients asked for)."""
    graph, request = chain(400)  # some 400 forward and 400 backward nodes
    if not gradients:
        request = RunRequest(request.outputs, request.feeds)

    def run(cancel):
        if first:
            graph2 = Graph(list(graph.nodes))  # a fresh instance: no tape held for it
            return record(graph2, request_key(graph2, request), request, cancel)
        return eager(graph, request, cancel)

    cancel = CountingCancellation(at=3)
    with pytest.raises(CancelledError):
        run(cancel)
    assert cancel.checks == 3  # every CHECK_EVERY nodes: stopped some 2 * CHECK_EVERY in
    cancel = CountingCancellation(at=10**9)
    run(cancel)
    assert cancel.checks >= (800 if gradients else 400) // CHECK_EVERY


@pytest.mark.slow
def test_the_eager_tier_runs_a_200000_deep_chain_in_bounded_memory():
    n, depth = 1_000, 200_000
    nodes = [Node("x", "input", shape=(n,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(depth)]
    nodes.append(Node("L", "sum", (f"n{depth - 1}",)))
    graph = Graph(nodes)
    request = RunRequest(("L",), {"x": np.linspace(0, 1, n)}, ("x",))
    tape = Tape(graph, request_key(graph, request))  # its plan: made before the measurement
    tracemalloc.start()
    try:
        _, grads = run_tape(graph, tape, request, Cancellation())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(grads["x"], np.ones(n))  # (-1)**200000
    assert peak < 40 * n * 8  # a few live values, never the chain's 200,000 (1.6 GB)


def test_the_first_call_frees_values_as_its_tape_is_made():
    """`record` makes the tape, then runs it: a value dies at its last read on the first call
    too (the tape's own lists and frame aside, a few dozen KiB here)."""
    n, depth = 20_000, 2_000
    nodes = [Node("x", "input", shape=(n,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(depth)]
    nodes.append(Node("L", "sum", (f"n{depth - 1}",)))
    graph = Graph(nodes)
    request = RunRequest(("L",), {"x": np.linspace(0, 1, n)}, ("x",))
    tracemalloc.start()
    try:
        values, grads = recorded(graph, request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(grads["x"], np.ones(n))  # (-1)**2000
    assert values["L"] == np.sum(np.linspace(0, 1, n))  # negated an even number of times
    assert peak < 40 * n * 8  # a few live values, never the chain's 2,000 (320 MB)


def test_a_request_runs_eagerly_until_its_tier_up_call_then_compiled():
    graph, request = chain(50)
    executor, key = LocalExecutor(), request_key(graph, request)
    first = executor.run(graph, request)
    assert _INLINE.get(key) is None  # no gradient graph, no program
    for _ in range(TIER_UP_CALLS - 2):
        executor.run(graph, request)
    assert _INLINE.get(key) is None
    tier_up = executor.run(graph, request)  # the TIER_UP_CALLS-th call
    ip = _INLINE.get(key)
    assert ip is not None and ip.program.tier == "compiled"
    assert bits(first.grads) == bits(tier_up.grads) and bits(first.values) == bits(tier_up.values)

    def loss(xs: list[np.ndarray]) -> np.ndarray:
        h = xs[0]
        for i in range(50):
            h = np.sin(h) if i % 2 else -h
        return np.sum(h)

    (expected,) = numerical_vjp(loss, [request.feeds["x"]], np.ones(()))
    np.testing.assert_allclose(first.grads["x"], expected, rtol=1e-6, atol=1e-9)


def test_ops_no_gradient_flows_through_give_the_compiled_programs_bits():
    """sign and step give no gradient: cotangents cut off there (a VJP that gives none, nodes
    above it that none reaches, a wrt node that gets zeros)."""
    nodes = [
        Node("x", "input", shape=(6,), dtype="float64"),
        Node("z", "input", shape=(6,), dtype="float64"),
        Node("t", "tanh", ("z",)),
        Node("tx", "mul", ("t", "x")),
        Node("s", "sign", ("tx",)),
        Node("sx", "mul", ("s", "x")),
        Node("st", "step", ("x",)),
        Node("a", "abs", ("x",)),
        Node("r", "relu", ("x",)),
        Node("u", "add", ("sx", "a")),
        Node("w", "add", ("u", "r")),
        Node("v", "add", ("w", "st")),
        Node("L", "sum", ("v",)),
    ]
    graph = Graph(nodes)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal(6), "z": rng.standard_normal(6)}
    request = RunRequest(("L", "s"), feeds, ("x", "z", "t"))
    same_bits(graph, request)
    _, grads = eager(graph, request)
    np.testing.assert_array_equal(grads["z"], np.zeros(6))
    x = feeds["x"]
    np.testing.assert_array_equal(
        grads["x"], np.sign(np.tanh(feeds["z"]) * x) + np.sign(x) + (x > 0)
    )


def test_a_tape_keeps_its_frames_empty_and_concurrent_runs_each_get_their_own():
    """A run holds its values in a frame the tape keeps (engine/eager.py Tape): given back
    empty, so no array outlives its run; runs at once on one tape never share one; a run that
    fails gives none back."""
    graph, request = chain(200)
    extra = Graph([*graph.nodes, Node("unused", "input", shape=(3,), dtype="float64")])
    request = RunRequest(request.outputs, {**request.feeds, "unused": np.ones(3)}, request.wrt)
    tape = Tape(extra, request_key(extra, request))
    run_tape(extra, tape, request, Cancellation())
    assert len(tape.frames) == 1 and all(x is None for x in tape.frames[0])

    # each thread its own feeds: a frame shared by two runs would mix their values
    requests = [
        RunRequest(
            request.outputs, {**request.feeds, "x": request.feeds["x"] * (t + 1)}, request.wrt
        )
        for t in range(4)
    ]
    expected = [
        run_tape(extra, Tape(extra, request_key(extra, r)), r, Cancellation()) for r in requests
    ]

    def runs(t: int) -> list[tuple[dict, dict]]:
        return [run_tape(extra, tape, requests[t], Cancellation()) for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(runs, range(4)))
    for (values, grads), got in zip(expected, results, strict=True):
        for values2, grads2 in got:
            assert bits(values2) == bits(values) and bits(grads2) == bits(grads)
    assert 1 <= len(tape.frames) <= MAX_FRAMES
    assert all(x is None for frame in tape.frames for x in frame)
    # a run that fails (max over nothing) gives back no frame
    with gg.Graph() as g:
        gg.max(gg.sin(gg.input("x", shape=(0,))), name="m")
    empty, failing = g.freeze(), RunRequest(("m",), {"x": np.zeros(0)})
    tape = Tape(empty, request_key(empty, failing))
    with pytest.raises(EagerOpError, match="zero-size"):
        run_tape(empty, tape, failing, Cancellation())
    assert tape.frames == []


def test_a_request_on_a_small_part_of_a_big_graph_keeps_no_frame_of_the_graphs_size():
    nodes = [Node("x", "input", shape=(4,), dtype="float64"), Node("L", "sum", ("x",))]
    nodes += [Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(20_000)]
    graph = Graph(nodes)
    request = RunRequest(("L",), {"x": np.arange(4.0)}, ("x",))
    tape = Tape(graph, request_key(graph, request))
    assert tape.frames == [] and tape.approx_bytes() < 1024  # its values run in a dict
    values, grads = run_tape(graph, tape, request, Cancellation())
    assert values["L"] == 6.0 and np.array_equal(grads["x"], np.ones(4))


def test_making_a_tape_checks_cancellation_and_stops_the_first_call():
    """A first call lowers its request before it runs a step: on a graph of ops with
    attributes (a step of Python each) that takes a while, and it stops there when cancelled."""
    n = 20_000
    nodes = [Node("x", "input", shape=(4,), dtype="float64")]
    nodes += [
        Node(f"n{i}", "reshape", (f"n{i - 1}" if i else "x",), {"shape": (4,)}) for i in range(n)
    ]
    nodes.append(Node("L", "sum", (f"n{n - 1}",)))
    graph = Graph(nodes)
    request = RunRequest(("L",), {"x": np.arange(4.0)}, ("x",))
    counting = CountingCancellation(at=0)  # never cancels: counts the checks
    Tape(graph, request_key(graph, request), counting.check)
    assert counting.checks >= 2 * n // CHECK_LOWERING  # forward and backward steps
    graph2 = Graph(list(graph.nodes))  # a fresh instance: no tape held for it
    key = request_key(graph2, request)
    with pytest.raises(CancelledError):
        record(graph2, key, request, CountingCancellation(at=2))
    assert held_tape(key) is None
