"""Batched training equals training each network alone with the engine's own gradients."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import (
    Cancellation,
    CancelledError,
    LocalExecutor,
    RequestError,
    RunRequest,
    training,
)
from graphgrad.engine.batching import batch_graph
from graphgrad.engine.plan_cache import DerivedCache
from graphgrad.engine.training import (
    SGD,
    Adam,
    ChunkTrainer,
    TrainSpec,
    classify_data,
    job_bytes,
    split,
    step_bytes,
    within,
)

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
        per_network=classify_data(graph, data),
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


def test_a_step_is_the_stacked_gradient_graph_compiled_once_per_chunk_shape(monkeypatch):
    compiled = []
    real = training.compile_step
    monkeypatch.setattr(training, "compile_step", lambda *a: compiled.append(a) or real(*a))
    monkeypatch.setattr(training, "_STEPS", DerivedCache("training steps, this test's"))
    graph = template(S)
    params, data = problem(per_network=True, seed=4)
    spec = TrainSpec(
        graph, "loss", params, data, Adam(lr=0.01), 6, per_network=frozenset({"x", "t"})
    )
    chunks = [*split(spec, 2), *split(spec, 5)]  # networks 2 + 3, then 1 + 1 + 1 + 1 + 1
    for chunk in chunks:
        for until in (2, 4, 6):  # segments, each with a trainer of its own
            ChunkTrainer(chunk).run(ChunkTrainer(chunk).initial_state(), until)
    assert sorted(a[3] for a in compiled) == [1, 2, 3]  # one program per chunk shape
    # What a step runs is the stacked graph's gradient, bit for bit as the executor gives it.
    chunk = chunks[1]
    trainer = ChunkTrainer(chunk)
    feeds = {**trainer.initial_state().params, **chunk.data}
    losses, grads = trainer.compiled(feeds, Cancellation())
    stacked, refs = batch_graph(graph, {*params, "x", "t"}, chunk.n)
    loss = refs["loss"].name
    request = RunRequest((loss,), feeds, tuple(params), {loss: np.ones(chunk.n)})
    ref = LocalExecutor().run(stacked, request)
    assert losses.tobytes() == ref.values[loss].tobytes()
    for k in params:
        assert grads[k].tobytes() == ref.grads[k].tobytes(), k


def test_a_template_holding_gradient_nodes_trains_like_each_network_alone():
    """A gradient penalty: the template differentiates its own fit (gg.grad), the step
    batches that gradient graph and differentiates it again (second order, per network)."""
    with gg.Graph() as g:
        x, t = gg.input("x", shape=(S, 4)), gg.input("t", shape=(S, 1))
        W1, W2 = gg.input("W1", shape=(H, 4)), gg.input("W2", shape=(1, H))
        fit = gg.mean((gg.tanh(x @ gg.transpose(W1)) @ gg.transpose(W2) - t) ** 2)
        dx = gg.grad(fit, x)
        gg.add(fit, gg.mul(0.1, gg.sum(dx * dx)), name="loss")
    graph = g.freeze()
    params, data = problem(per_network=True, seed=2)
    params = {k: params[k] for k in ("W1", "W2")}
    spec = TrainSpec(graph, "loss", params, data, SGD(lr=0.05), 4, per_network=frozenset(data))
    trainer = ChunkTrainer(spec)
    state = trainer.run(trainer.initial_state())
    for j in range(N):
        own = {k: v[j] for k, v in data.items()}
        p, hist = train_alone(
            graph, {k: v[j] for k, v in params.items()}, own, SGD(lr=0.05), 4, None, 0, j
        )
        np.testing.assert_allclose(state.history[j], hist, rtol=1e-10)
        for k in p:
            np.testing.assert_allclose(state.params[k][j], p[k], rtol=1e-9, atol=1e-12)


def test_a_cancelled_step_stops_inside_the_program():
    graph = template(S)
    params, data = problem(per_network=False)
    trainer = ChunkTrainer(TrainSpec(graph, "loss", params, data, SGD(), 3))
    cancel = Cancellation()
    cancel.cancel()
    state = trainer.initial_state()
    with pytest.raises(CancelledError):
        trainer.step(state, cancel)
    assert state.step == 0 and not state.losses


# --- A spec is checked completely when it is built: every mistake names its field. -------


def _valid(per_network: bool = True, batch_size: int | None = 8) -> dict:
    params, data = problem(per_network)
    return dict(
        template=template(batch_size or S),
        loss="loss",
        params=params,
        data=data,
        optimizer=SGD(lr=0.1),
        steps=5,
        batch_size=batch_size,
        seed=0,
    )


def _with(**changes):
    def edit(kw):
        for key, value in changes.items():
            if isinstance(value, dict):  # merge into params/data; None removes a key
                merged = {**kw[key], **value}
                kw[key] = {k: v for k, v in merged.items() if v is not None}
            else:
                kw[key] = value
        return kw

    return edit


def _shared():
    return _valid(per_network=False)


BAD_SPECS = {
    "param-trailing-shape": (_with(params={"W1": np.zeros((N, H, 3))}), "params['W1']"),
    "param-dtype": (_with(params={"W1": np.zeros((N, H, 4), np.float32)}), "params['W1']"),
    "param-scalar": (_with(params={"b2": np.array(0.0)}), "params['b2']"),
    "param-not-an-array": (_with(params={"b2": [[0.0]] * N}), "params['b2']"),
    "param-not-a-node": (_with(params={"zz": np.zeros((N, 1))}), "params['zz']"),
    "param-not-an-input": (_with(params={"loss": np.zeros(N)}), "params['loss']"),
    "param-nan": (_with(params={"b1": np.full((N, H), np.nan)}), "params['b1']"),
    "params-disagree-on-n": (_with(params={"b1": np.zeros((N - 1, H))}), "params['b1']"),
    "no-params": (_with(params={"W1": None, "b1": None, "W2": None, "b2": None}), "params"),
    "n-zero": (
        _with(
            params={
                k: np.zeros((0, *s))
                for k, s in {"W1": (H, 4), "b1": (H,), "W2": (1, H), "b2": (1,)}.items()
            }
        ),
        "params['W1']",
    ),
    "data-not-a-node": (_with(data={"nope": np.zeros((S, 4))}), "data['nope']"),
    "data-not-an-input": (_with(data={"loss": np.zeros(S)}), "data['loss']"),
    "data-also-a-param": (_with(data={"W1": np.zeros((N, H, 4))}), "data['W1']"),
    "missing-input": (_with(data={"t": None}), "data['t']"),
    "data-wrong-leading-n": (_with(data={"x": np.zeros((N + 1, S, 4))}), "data['x']"),
    "data-wrong-rank": (_with(data={"x": np.zeros((1, N, S, 4))}), "data['x']"),
    "data-rank-too-low": (_with(data={"x": np.zeros(4)}), "data['x']"),
    "data-wrong-rows": (_with(data={"x": np.zeros((N, S, 3))}), "data['x']"),
    "data-float32": (_with(data={"x": np.zeros((N, S, 4), np.float32)}), "data['x']"),
    "data-inf": (_with(data={"x": np.full((N, S, 4), np.inf)}), "data['x']"),
    "data-empty": (
        _with(data={"x": np.zeros((N, 0, 4)), "t": np.zeros((N, 0, 1))}),
        "data['t']",  # the first in name order
    ),
    "data-disagree-on-samples": (_with(data={"x": np.zeros((N, S - 1, 4))}), "data['x']"),
    "batch-larger-than-data": (
        _with(data={"x": np.zeros((N, 4, 4)), "t": np.zeros((N, 4, 1))}),
        "data['t']",
    ),
    "batch-not-the-template's": (_with(batch_size=4), "data['t']"),
    "no-batch-and-data-not-the-template's": (_with(batch_size=None), "data['t']"),
    "batch-zero": (_with(batch_size=0), "batch_size"),
    "batch-negative": (_with(batch_size=-8), "batch_size"),
    "negative-seed": (_with(seed=-1), "seed"),
    "loss-unknown": (_with(loss="nope"), "loss"),
    "loss-not-scalar": (_with(loss="W1"), "loss"),
    "steps-zero": (_with(steps=0), "steps"),
    "steps-negative": (_with(steps=-3), "steps"),
    "steps-int32-max": (_with(steps=2**31 - 1), "steps"),
    "steps-float": (_with(steps=5.0), "steps"),
    "steps-bool": (_with(steps=True), "steps"),
    "optimizer-not-one": (_with(optimizer="sgd"), "optimizer"),
}


def test_an_integer_param_is_refused_naming_it():
    with gg.Graph() as g:
        x, k = gg.input("x", shape=(3,)), gg.input("k", shape=(3,), dtype="int64")
        gg.sum(x * gg.astype(k, "float64"), name="loss")
    params, data = {"k": np.ones((2, 3), np.int64)}, {"x": np.ones(3)}
    with pytest.raises(RequestError, match=r"param 'k' is an integer \(int64\) input") as e:
        TrainSpec.build(g.freeze(), "loss", params, data, SGD(), 2)
    assert e.value.field == "params['k']"


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_is_refused_naming_its_field(case):
    edit, field = BAD_SPECS[case]
    kw = edit(_valid())
    with pytest.raises(RequestError) as e:
        TrainSpec.build(**kw)
    assert e.value.field == field, str(e.value)
    name = field.split("'")[1] if "'" in field else field
    assert name in str(e.value)


@pytest.mark.parametrize("per_network", [True, False])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_the_valid_specs_pass(per_network, batch_size):
    kw = _valid(per_network, batch_size)
    spec = TrainSpec.build(**kw)
    assert spec.n == N
    assert spec.per_network == (frozenset({"x", "t"}) if per_network else frozenset())


BAD_OPTIMIZERS = {
    "sgd-lr-nan": (lambda: SGD(lr=float("nan")), "lr"),
    "sgd-lr-inf": (lambda: SGD(lr=float("inf")), "lr"),
    "sgd-lr-negative": (lambda: SGD(lr=-0.1), "lr"),
    "sgd-lr-zero": (lambda: SGD(lr=0.0), "lr"),
    "sgd-lr-string": (lambda: SGD(lr="0.1"), "lr"),  # type: ignore[arg-type]
    "sgd-momentum-nan": (lambda: SGD(momentum=float("nan")), "momentum"),
    "sgd-momentum-negative": (lambda: SGD(momentum=-0.5), "momentum"),
    "sgd-momentum-one": (lambda: SGD(momentum=1.0), "momentum"),
    "adam-lr-nan": (lambda: Adam(lr=float("nan")), "lr"),
    "adam-lr-negative": (lambda: Adam(lr=-1e-3), "lr"),
    "adam-beta1-one": (lambda: Adam(beta1=1.0), "beta1"),
    "adam-beta1-negative": (lambda: Adam(beta1=-0.1), "beta1"),
    "adam-beta2-one": (lambda: Adam(beta2=1.0), "beta2"),
    "adam-beta2-above-one": (lambda: Adam(beta2=1.5), "beta2"),
    "adam-beta2-nan": (lambda: Adam(beta2=float("nan")), "beta2"),
    "adam-eps-zero": (lambda: Adam(eps=0.0), "eps"),
    "adam-eps-negative": (lambda: Adam(eps=-1e-8), "eps"),
    "adam-eps-inf": (lambda: Adam(eps=float("inf")), "eps"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIMIZERS))
def test_an_optimizer_checks_its_hyper_parameters(case):
    make, field = BAD_OPTIMIZERS[case]
    with pytest.raises(RequestError) as e:
        make()
    assert e.value.field == field and field in str(e.value)


def test_errors_inside_a_template_name_their_full_path():
    kw = _with(params={"W1": np.zeros((N, H, 3))})(_valid())
    with pytest.raises(RequestError) as e, within("templates[1]"):
        TrainSpec.build(**kw)
    assert e.value.field == "templates[1].params['W1']"
    assert str(e.value).startswith("templates[1]: ")


def test_job_bytes_count_history_state_and_activations():
    spec = TrainSpec.build(**_valid())
    per_net = sum(v[0].nbytes for v in spec.params.values())
    need = job_bytes([spec])
    assert need >= N * spec.steps * 8 + N * per_net  # at least the history and the params
    longer = job_bytes([dataclasses.replace(spec, steps=10_000)])
    assert longer - need >= N * (10_000 - spec.steps) * 8
    adam = job_bytes([dataclasses.replace(spec, optimizer=Adam())])
    assert adam - need >= 2 * N * per_net  # two moments per parameter


@pytest.mark.parametrize("optimizer", [SGD(), Adam()], ids=["sgd", "adam"])
@pytest.mark.parametrize("per_network", [True, False])
def test_step_bytes_bound_what_a_step_allocates(per_network, optimizer):
    n = 400  # values of a few hundred KiB: the step's Python objects are small beside them
    rng = np.random.default_rng(3)
    params = {"W1": rng.standard_normal((n, H, 4)), "b1": np.zeros((n, H))}
    params |= {"W2": rng.standard_normal((n, 1, H)), "b2": np.zeros((n, 1))}
    x = rng.standard_normal((n, S, 4) if per_network else (S, 4))
    data = {"x": x, "t": np.sin(x.sum(-1, keepdims=True))}
    spec = TrainSpec.build(template(S), "loss", params, data, optimizer, 3)
    trainer = ChunkTrainer(spec)
    state = trainer.initial_state()
    trainer.step(state)  # compiled outside the measurement
    tracemalloc.start()
    try:
        trainer.step(state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    update = 6 * max(v.nbytes for v in params.values())  # what job_bytes adds for it
    python_objects = 16 << 10  # the step's dicts and frames, not arrays
    assert step_bytes(spec) + update + python_objects >= peak
    assert step_bytes(spec) <= 4 * peak  # a bound, not a guess far above it
