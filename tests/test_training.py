"""Batched training equals training each network alone with the engine's own gradients."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import LocalExecutor, RunRequest
from graphgrad.engine.training import SGD, Adam, ChunkTrainer, TrainSpec, classify_data, split

N, S, H = 5, 24, 8


def template(batch: int):
    with gg.Graph() as g:
        x = gg.input("x", shape=(batch, 4))
        t = gg.input("t", shape=(batch, 1))
        W1 = gg.input("W1", shape=(H, 4))
        b1 = gg.input("b1", shape=(H,))
        W2 = gg.input("W2", shape=(1, H))
        b2 = gg.input("b2", shape=(1,))
        y = gg.tanh(x @ gg.transpose(W1) + b1) @ gg.transpose(W2) + b2
        gg.mul(0.5 / batch, gg.sum((y - t) ** 2), name="loss")
    return g.freeze()


def problem(per_network: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "W1": rng.standard_normal((N, H, 4)) * 0.5,
        "b1": np.zeros((N, H)),
        "W2": rng.standard_normal((N, 1, H)) * 0.5,
        "b2": np.zeros((N, 1)),
    }
    lead = (N, S) if per_network else (S,)
    x = rng.standard_normal((*lead, 4))
    data = {"x": x, "t": np.sin(x.sum(-1, keepdims=True))}
    return params, data


def train_alone(graph, params, data, optimizer, steps, batch_size, seed, j):
    """One network, plain loop over the template graph, same optimizer and minibatches."""
    p = {k: v.copy() for k, v in params.items()}
    state = optimizer.init(p)
    history = []
    per_epoch = S // batch_size if batch_size else 1
    for step in range(steps):
        if batch_size is None:
            batch = data
        else:
            epoch, offset = divmod(step, per_epoch)
            perm = np.random.default_rng([seed, j, epoch]).permutation(S)
            idx = perm[offset * batch_size : (offset + 1) * batch_size]
            batch = {k: v[idx] for k, v in data.items()}
        res = LocalExecutor().run(graph, RunRequest(("loss",), {**p, **batch}, tuple(p)))
        history.append(float(res.values["loss"]))
        optimizer.update(p, res.grads, state, step)
    return p, np.array(history)


@pytest.mark.parametrize("per_network", [True, False])
@pytest.mark.parametrize("batch_size", [None, 8])
@pytest.mark.parametrize(
    "optimizer", [SGD(lr=0.1, momentum=0.9), Adam(lr=0.01)], ids=["sgd-momentum", "adam"]
)
def test_each_network_trains_as_if_alone(per_network, batch_size, optimizer):
    graph = template(batch_size or S)
    params, data = problem(per_network)
    spec = TrainSpec(
        graph,
        "loss",
        params,
        data,
        optimizer,
        steps=12,
        batch_size=batch_size,
        seed=3,
        per_network=classify_data(graph, data, N, batch_size),
    )
    trainer = ChunkTrainer(spec)
    state = trainer.run(trainer.initial_state())
    for j in range(N):
        own = {k: v[j] for k, v in data.items()} if per_network else data
        p, hist = train_alone(
            graph, {k: v[j] for k, v in params.items()}, own, optimizer, 12, batch_size, 3, j
        )
        np.testing.assert_allclose(state.history[j], hist, rtol=1e-10)
        for k in p:
            np.testing.assert_allclose(state.params[k][j], p[k], rtol=1e-9, atol=1e-12)
    assert state.history[:, -1].mean() < state.history[:, 0].mean()  # it learns


def test_chunking_and_resuming_do_not_change_results():
    graph = template(8)
    params, data = problem(per_network=True)
    spec = TrainSpec(
        graph,
        "loss",
        params,
        data,
        SGD(lr=0.1),
        steps=10,
        batch_size=8,
        seed=1,
        per_network=frozenset({"x", "t"}),
    )
    whole = ChunkTrainer(spec)
    ref = whole.run(whole.initial_state())
    for part, lo in zip(split(spec, 3), (0, 1, 3), strict=True):
        trainer = ChunkTrainer(part)
        state = trainer.run(trainer.initial_state(), until=4)  # stop, then resume
        state = ChunkTrainer(part).run(state)
        hi = lo + part.n
        np.testing.assert_array_equal(state.history, ref.history[lo:hi])
        np.testing.assert_array_equal(state.params["W1"], ref.params["W1"][lo:hi])
