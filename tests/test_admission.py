"""The server's admission (server/runtime.py) of a request's first calls: its peak memory comes
from the eager tier's tape (engine/eager.py), so admitting a new request does not build its
gradient graph, a request over the limit is still refused before it runs, and one whose
compiled program would be over the limit keeps running eagerly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import (
    Cancellation,
    ExecutionError,
    Graph,
    LimitError,
    Node,
    RunOptions,
    RunRequest,
)
from graphgrad.engine import driver as engine_driver
from graphgrad.engine.codegen import TIER_UP_CALLS
from graphgrad.engine.executor import request_key
from graphgrad.engine.memory import request_memory
from graphgrad.engine.plan_cache import RequestKey
from graphgrad.engine.tape_memory import eager_memory
from graphgrad.server.limits import Limits
from graphgrad.server.runtime import Runtime


@pytest.fixture
def gradient_graphs_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A spy on the gradient transform the compiled path runs: one entry per call."""
    calls: list[int] = []
    real = engine_driver.grad_graph

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_driver, "grad_graph", spy)
    yield calls


def chain(depth: int, width: int, seed: int) -> tuple[Graph, dict[str, np.ndarray]]:
    """A chain of tanh(h @ W + b) layers (a fresh graph per seed: nothing of it is cached)."""
    rng = np.random.default_rng(seed)
    with gg.Graph() as g:
        x = gg.input("x", shape=(4, width))
        W, b = gg.input("W", shape=(width, width)), gg.input("b", shape=(width,))
        h = x
        for _ in range(depth):
            h = gg.tanh(h @ W + b)
        gg.sum(h * float(seed), name="L")
    feeds = {
        "x": rng.standard_normal((4, width)),
        "W": rng.standard_normal((width, width)) / width,
        "b": rng.standard_normal(width),
    }
    return g.freeze(), feeds


def test_the_first_runs_of_a_new_request_build_no_gradient_graph(gradient_graphs_built):
    graph, feeds = chain(depth=50, width=16, seed=11)
    runtime = Runtime.create()
    request = RunRequest(("L",), feeds, ("W", "b"))
    first = runtime.run(graph, request, RunOptions(), Cancellation())
    for _ in range(TIER_UP_CALLS - 2):
        runtime.run(graph, request, RunOptions(), Cancellation())
    assert gradient_graphs_built == []  # admission and the eager tier alike
    compiled = [runtime.run(graph, request, RunOptions(), Cancellation()) for _ in range(2)]
    assert gradient_graphs_built == [1]  # the tier-up makes the program, once
    for later in compiled:  # the compiled program gives the eager tier's gradients, bit for bit
        for name in ("W", "b"):
            np.testing.assert_array_equal(later.grads[name], first.grads[name])


def test_a_new_request_over_the_limit_is_refused_before_it_runs(gradient_graphs_built):
    graph, feeds = chain(depth=50, width=16, seed=12)
    runtime = Runtime.create(Limits(max_request_bytes=4096))
    with pytest.raises(LimitError, match="max_request_bytes=4096") as refused:
        runtime.run(graph, RunRequest(("L",), feeds, ("W",)), RunOptions(), Cancellation())
    assert refused.value.limit == "max_request_bytes"
    assert gradient_graphs_built == []


def hessian_vector_product(failing: bool = False) -> tuple[Graph, dict[str, np.ndarray]]:
    """A graph whose compiled program holds more than its eager run: gradient nodes in the
    graph itself (H v of a tanh layer's loss); `failing`: plus the max of an empty axis,
    which fails as it runs."""
    rng = np.random.default_rng(3)
    with gg.Graph() as g:
        x, W = gg.input("x", shape=(64, 32)), gg.input("W", shape=(32, 64))
        v = gg.input("v", shape=(32, 64))
        hv = gg.grad(gg.grad(gg.sum(gg.tanh(x @ W) ** 2), W), W, v)
        if failing:
            bad = gg.sum(gg.max(gg.input("empty", shape=(0, 3)), axis=0, name="max"))
            gg.add(gg.sum(hv * v), bad, name="L")
        else:
            gg.sum(hv * v, name="L")
    shapes = {"x": (64, 32), "W": (32, 64), "v": (32, 64)}
    feeds = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return g.freeze(), feeds | ({"empty": np.zeros((0, 3))} if failing else {})


def test_a_request_whose_program_is_over_its_budget_stays_on_the_eager_tier(
    gradient_graphs_built,
):
    graph, feeds = hessian_vector_product()
    request = RunRequest(("L",), feeds, ("W", "v"))
    key = RequestKey(graph.serial, ("L",), ("W", "v"), ())
    eager, compiled = eager_memory(graph, key).peak, request_memory(graph, ["L"], ["W", "v"]).peak
    assert eager < compiled
    gradient_graphs_built.clear()  # (the compiled estimate above built it)
    runtime = Runtime.create(Limits(max_request_bytes=(eager + compiled) // 2))
    results = [
        runtime.run(graph, request, RunOptions(), Cancellation()) for _ in range(TIER_UP_CALLS + 2)
    ]
    assert not runtime.dispatcher.local.compiled(key)
    assert gradient_graphs_built == []
    for later in results[1:]:
        for name in ("W", "v"):
            np.testing.assert_array_equal(later.grads[name], results[0].grads[name])


def test_an_op_failing_eagerly_is_named_without_the_program_over_the_budget(
    gradient_graphs_built,
):
    graph, feeds = hessian_vector_product(failing=True)
    request = RunRequest(("L",), feeds, ("W", "v"))
    key = RequestKey(graph.serial, ("L",), ("W", "v"), ())
    eager, compiled = eager_memory(graph, key).peak, request_memory(graph, ["L"], ["W", "v"]).peak
    assert eager < compiled
    gradient_graphs_built.clear()
    runtime = Runtime.create(Limits(max_request_bytes=(eager + compiled) // 2))
    for _ in range(TIER_UP_CALLS + 1):
        with pytest.raises(ExecutionError, match="zero-size array") as failed:
            runtime.run(graph, request, RunOptions(), Cancellation())
        assert failed.value.node == "max"
    assert gradient_graphs_built == []


def tape_heavier_than_program() -> tuple[Graph, RunRequest]:
    """A request whose eager tape holds more at its peak than its compiled program does."""
    n = 1 << 16
    graph = Graph(
        [
            Node("x", "input", shape=(n,), dtype="float64"),
            Node("w", "input", shape=(n,), dtype="float64"),
            Node("a", "mul", ("x", "w")),
            Node("b", "tanh", ("a",)),
            Node("c", "mul", ("b", "b")),
            Node("d", "add", ("c", "a")),
            Node("loss", "sum", ("d",)),
        ]
    )
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(n), "w": rng.standard_normal(n)}
    return graph, RunRequest(("loss",), feeds, ("x", "w"))


def test_a_request_whose_program_fits_is_admitted_though_its_tape_does_not():
    # Found by review: admitted on its eager estimate alone, such a request was refused on
    # every call, though its program fits (it never ran, so it never tiered up). It is
    # admitted on its program's estimate and runs compiled from its first call.
    graph, request = tape_heavier_than_program()
    key = request_key(graph, request)
    eager = eager_memory(graph, key).peak
    compiled = request_memory(graph, key.outputs, key.wrt, key.seeded).peak
    assert compiled < eager
    runtime = Runtime.create(Limits(max_request_bytes=(eager + compiled) // 2))
    x, w = request.feeds["x"], request.feeds["w"]
    a = x * w
    b = np.tanh(a)
    dd_da = 2 * b * (1 - b * b) + 1  # d/da of tanh(a)^2 + a
    for _ in range(3):
        res = runtime.run(graph, request, RunOptions(), Cancellation())
        np.testing.assert_allclose(res.grads["x"], dd_da * w, rtol=1e-12)
        np.testing.assert_allclose(res.grads["w"], dd_da * x, rtol=1e-12)
    # over both estimates, it is still refused before it runs
    tight = Runtime.create(Limits(max_request_bytes=compiled - 1))
    with pytest.raises(LimitError, match="max_request_bytes"):
        tight.run(graph, request, RunOptions(), Cancellation())
