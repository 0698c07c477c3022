"""Every op's batching rule: the stacked graph equals running each network alone, values and
gradients, whichever inputs carry the network axis. Covers every registered op."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphgrad.engine import REGISTRY, Graph, LocalExecutor, Node, RunRequest
from graphgrad.engine.batching import batch_graph

from .test_ops import NOT_DIFFERENTIATED, SPECIAL, default_cases, dtype_of, random_inputs

N = 3
UNBATCHABLE = NOT_DIFFERENTIATED | {"constant"}  # no inputs: never batched


def cases():
    for name in sorted(set(REGISTRY) - UNBATCHABLE):
        for k, (shapes, attrs) in enumerate(
            SPECIAL.get(name) or default_cases(REGISTRY[name].arity)
        ):
            subsets = [
                s
                for r in range(1, len(shapes) + 1)
                for s in itertools.combinations(range(len(shapes)), r)
            ]
            for subset in subsets:
                yield pytest.param(name, shapes, attrs, subset, id=f"{name}-{k}-{subset}")


def test_every_batchable_op_has_a_rule_and_a_case():
    assert {p.values[0] for p in cases()} == set(REGISTRY) - UNBATCHABLE
    assert all(REGISTRY[n].batch is not None for n in set(REGISTRY) - UNBATCHABLE)


@pytest.mark.parametrize(("op", "shapes", "attrs", "batched"), list(cases()))
def test_stacked_graph_equals_each_network_alone(op, shapes, attrs, batched):
    rng = np.random.default_rng(7)
    names = [f"x{k}" for k in range(len(shapes))]
    template = Graph(
        [
            *(
                Node(n, "input", shape=s, dtype=dtype_of(s))
                for n, s in zip(names, shapes, strict=True)
            ),
            Node("out", op, tuple(names), attrs),
        ]
    )
    per_net = [random_inputs(op, shapes, rng) for _ in range(N)]
    shared = per_net[0]
    feeds_of = [
        {n: (per_net[j][k] if k in batched else shared[k]) for k, n in enumerate(names)}
        for j in range(N)
    ]
    stacked, refs = batch_graph(template, {names[k] for k in batched}, N)
    out_shape = template.types[-1].shape
    seeds = rng.standard_normal((N, *out_shape))
    stacked_feeds = {
        n: (np.stack([f[n] for f in feeds_of]) if k in batched else shared[k])
        for k, n in enumerate(names)
    }
    wrt = tuple(n for n, s in zip(names, shapes, strict=True) if dtype_of(s) == "float64")
    seeds = seeds.astype(template.types[-1].dtype)  # a seed has its output's dtype
    res = LocalExecutor().run(
        stacked,
        RunRequest((refs["out"].name,), stacked_feeds, wrt, {refs["out"].name: seeds}),
    )
    for j in range(N):
        alone = LocalExecutor().run(
            template, RunRequest(("out",), feeds_of[j], wrt, {"out": seeds[j]})
        )
        np.testing.assert_allclose(
            res.values[refs["out"].name][j], alone.values["out"], rtol=1e-12, atol=1e-12
        )
        for k, n in enumerate(names):
            if k in batched and n in wrt:
                np.testing.assert_allclose(res.grads[n][j], alone.grads[n], rtol=1e-10, atol=1e-12)
