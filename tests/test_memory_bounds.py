"""The request memory estimates bound what a run allocates: tracemalloc's peak over a warm
local run (engine/memory.py) and over an eager one (engine/tape_memory.py), for graphs of
ufuncs, matmuls, softmaxes, reductions and losses, with and without gradients, and random
graphs on the eager tier."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgrad as gg
from graphgrad.engine import Graph, LocalExecutor, RunRequest
from graphgrad.engine.executor import request_key
from graphgrad.engine.memory import request_memory
from graphgrad.engine.tape_memory import eager_memory

from .strategies import random_requests

Case = tuple[Graph, dict[str, np.ndarray], list[str]]
# The run's own Python objects (dicts of values, frames, the result), which the estimate of
# array bytes leaves out: a few KiB.
PYTHON_OBJECTS = 16 << 10


def mlp() -> Case:
    rng = np.random.default_rng(0)
    with gg.Graph() as g:
        x, W = gg.input("x", shape=(256, 64)), gg.input("W", shape=(64, 128))
        b, V = gg.input("b", shape=(128,)), gg.input("V", shape=(128, 10))
        labels = gg.input("y", shape=(256, 10))
        z = gg.log_softmax(gg.sigmoid(x @ W + b) @ V, axis=1)
        gg.mean(-(z * labels), name="L")
    feeds = {
        "x": rng.standard_normal((256, 64)),
        "W": rng.standard_normal((64, 128)),
        "b": np.zeros(128),
        "V": rng.standard_normal((128, 10)),
        "y": np.eye(10)[rng.integers(0, 10, 256)],
    }
    return g.freeze(), feeds, ["W", "b", "V", "x"]


def softmax_and_max() -> Case:
    with gg.Graph() as g:
        x = gg.input("x", shape=(512, 256))
        m = gg.max(gg.exp(gg.softmax(x, axis=1)) * x, axis=0)
        gg.sum(gg.tanh(m) + gg.sqrt(gg.abs(m)), name="L")
    return g.freeze(), {"x": np.random.default_rng(1).standard_normal((512, 256))}, ["x"]


def cross_entropy() -> Case:
    with gg.Graph() as g:
        x, labels = gg.input("x", shape=(512, 100)), gg.input("y", shape=(512, 100))
        gg.sum(gg.softmax_cross_entropy(gg.relu(x) * 2.0, labels), name="L")
    rng = np.random.default_rng(2)
    return g.freeze(), {"x": rng.standard_normal((512, 100)), "y": np.full((512, 100), 0.01)}, ["x"]


def hessian_vector_product() -> Case:
    """Gradient nodes in the graph itself: H v of a tanh layer's loss, as the VJP of its
    gradient (and, with gradients, the third order)."""
    rng = np.random.default_rng(3)
    with gg.Graph() as g:
        x, W = gg.input("x", shape=(256, 64)), gg.input("W", shape=(64, 128))
        v = gg.input("v", shape=(64, 128))
        loss = gg.sum(gg.tanh(x @ W) ** 2)
        gW = gg.grad(loss, W)
        hv = gg.grad(gW, W, v)
        gg.sum(hv * v, name="L")
    feeds = {k: rng.standard_normal(s) for k, s in (("x", (256, 64)), ("W", (64, 128)))}
    return g.freeze(), {**feeds, "v": rng.standard_normal((64, 128))}, ["W", "v"]


@pytest.mark.parametrize("make", [mlp, softmax_and_max, cross_entropy, hessian_vector_product])
@pytest.mark.parametrize("with_grads", [False, True])
def test_the_estimate_bounds_the_measured_peak(make: Callable[[], Case], with_grads: bool):
    graph, feeds, wrt = make()
    wrt = wrt if with_grads else []
    mem = request_memory(graph, ["L"], wrt)
    request = RunRequest(("L",), feeds, tuple(wrt))
    LocalExecutor().run(graph, request)  # transform and compile outside the measurement
    tracemalloc.start()
    try:
        LocalExecutor().run(graph, request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    fed = sum(v.nbytes for v in feeds.values())  # held before the measurement began
    assert mem.kept - fed + PYTHON_OBJECTS >= peak
    assert mem.kept - fed <= 3 * peak  # a bound, not a guess far above it
    assert mem.peak >= max(mem.kept, mem.grads + mem.response)


def traced_peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def eager_case(graph: Graph, request: RunRequest, recorded: bool) -> tuple[int, int]:
    """The eager tier's estimate bounds its run's peak: a run of a tape made beforehand (as
    admission makes it), or the first call that records its tape as it runs; and it stays
    near the compiled programs' estimate."""
    key = request_key(graph, request)
    local = LocalExecutor()
    if recorded:
        peak = traced_peak(lambda: local.run_keyed(graph, key, request, None))
        mem = eager_memory(graph, key)  # from the tape that run recorded
    else:
        mem = eager_memory(graph, key)  # makes the tape, as admission does
        peak = traced_peak(lambda: local.run_keyed(graph, key, request, None))
    assert not local.compiled(key)  # both were eager runs
    fed = sum(graph.types[graph.index[n]].nbytes for n in request.feeds)
    fed += sum(a.nbytes for a in (request.grad_outputs or {}).values())
    assert mem.kept - fed + PYTHON_OBJECTS >= peak
    assert mem.peak >= max(mem.kept, mem.grads + mem.response)
    seeded = tuple(request.grad_outputs or ())
    compiled = request_memory(graph, request.outputs, request.wrt, seeded)
    assert mem.kept <= 2 * compiled.kept  # not far above the compiled programs' estimate
    return mem.kept - fed, peak


@pytest.mark.parametrize("make", [mlp, softmax_and_max, cross_entropy, hessian_vector_product])
@pytest.mark.parametrize("recorded", [False, True])
def test_the_eager_estimate_bounds_the_eager_runs_peak(make: Callable[[], Case], recorded: bool):
    graph, feeds, wrt = make()
    estimate, peak = eager_case(graph, RunRequest(("L",), feeds, tuple(wrt)), recorded)
    assert estimate <= 3 * peak  # a bound, not a guess far above it


@settings(max_examples=30)
@given(random_requests(max_nodes=25, shape=(64, 64)), st.booleans())
def test_the_eager_estimate_bounds_the_eager_runs_peak_on_random_graphs(case, recorded):
    nodes, request = case
    eager_case(Graph(nodes), request, recorded)
