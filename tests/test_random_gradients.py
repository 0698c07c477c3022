"""Gradients of random graphs (hypothesis) equal central finite differences, for `wrt` that
names fed inputs and constants, repeated or not, with one or several seeded outputs.
(Bit-identity across executors and partitionings: tests/test_ray.py, tests/test_grad.py.)"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

from graphgrad.engine import Graph, LocalExecutor, RunRequest

from .gradcheck import numerical_vjp
from .strategies import random_requests


@settings(max_examples=40)
@given(random_requests(max_nodes=12))
def test_gradients_of_random_graphs_equal_central_differences(case):
    nodes, request = case
    graph = Graph(nodes)
    by_name = {n.name: n for n in nodes}
    leaves = [
        w for w in dict.fromkeys(request.wrt) if by_name[w].op == "constant" or w in request.feeds
    ]
    if not leaves:
        return
    seeds = request.grad_outputs or {request.outputs[0]: np.ones(())}
    got = LocalExecutor().run(graph, request).grads

    def objective(xs: list[np.ndarray]) -> np.ndarray:
        """sum(seed * output) over the seeded outputs, at leaf values `xs`."""
        moved = dict(zip(leaves, xs, strict=True))
        g = Graph(
            n.replace(attrs={"value": moved[n.name]})
            if n.op == "constant" and n.name in moved
            else n
            for n in nodes
        )
        feeds = {k: moved.get(k, v) for k, v in request.feeds.items()}
        values = LocalExecutor().run(g, RunRequest(tuple(seeds), feeds)).values
        return np.asarray(sum(np.sum(s * values[o]) for o, s in seeds.items()))

    start = [
        np.asarray(by_name[w].attrs["value"]) if w not in request.feeds else request.feeds[w]
        for w in leaves
    ]
    numeric = numerical_vjp(objective, [x.astype(np.float64) for x in start], np.ones(()))
    for w, expected in zip(leaves, numeric, strict=True):
        np.testing.assert_allclose(got[w], expected, rtol=1e-5, atol=1e-6, err_msg=w)
