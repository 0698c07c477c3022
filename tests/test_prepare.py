"""`client.prepare(...)`: prepared calls give what plain runs give (remotely and in process),
bad feeds get clear errors while the server keeps serving, and feeds decoded as views of the
request's bytes are never written by the program."""

from __future__ import annotations

import dataclasses
import time

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad import wire
from graphgrad.engine import RunRequest, RunResult
from graphgrad.server import service
from graphgrad.server.admission import Admission
from graphgrad.server.batcher import BatchingConfig
from graphgrad.server.cache import GraphCache
from graphgrad.server.errors import NotFoundError
from graphgrad.server.inflight import CallContext, InFlight
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import GraphServicer
from graphgrad.v1 import service_pb2

from .server_proc import running_server
from .test_seed import network_feeds, two_layer_network

WRT = ["W", "b", "V", "a"]


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture(scope="module", params=["local", "remote"])
def client(request, server):
    address = server.address if request.param == "remote" else None
    with gg.connect(address) as c:
        yield c


def hand_grads(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dL/d(W, b, V, a) of the two-layer network, by hand."""
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    r = f["V"] @ h + f["a"] - f["t"]
    dz = (f["V"].T @ r) * (1 - h * h)
    return {"W": np.outer(dz, f["x"]), "b": dz, "V": np.outer(r, h), "a": r}


def linear_map():
    """A vector output, differentiated through seeds: y = W x + c, z = sum(relu(y))."""
    with gg.Graph():
        W = gg.input("W", shape=(3, 4))
        x = gg.input("x", shape=(4,))
        c = gg.input("c", shape=(3,), dtype="float32")
        y = gg.add(W @ x, gg.astype(c, "float64"), name="y")
        z = gg.sum(gg.relu(y), name="z")
    rng = np.random.default_rng(1)
    feeds = {
        "W": rng.standard_normal((3, 4)),
        "x": rng.standard_normal(4),
        "c": rng.standard_normal(3).astype(np.float32),
    }
    return y, z, feeds


def test_prepared_calls_equal_plain_runs_and_hand_derived_gradients(client):
    _, L = two_layer_network()
    prepared = client.prepare(L, wrt=WRT)
    for seed in range(3):  # several calls: each only brings feeds
        f = network_feeds(seed)
        got, plain = prepared(f), client.run(L, f, wrt=WRT)
        assert got.value.tobytes() == plain.value.tobytes()
        for k, expected in hand_grads(f).items():
            assert got.grads[k].tobytes() == plain.grads[k].tobytes()
            assert got.grads[k].shape == f[k].shape and got.grads[k].dtype == f[k].dtype
            np.testing.assert_allclose(got.grads[k], expected, rtol=1e-10, atol=1e-12)


def test_prepared_with_seeds_and_several_outputs(client):
    y, z, f = linear_map()
    v = np.array([1.0, -2.0, 0.5])
    prepared = client.prepare([y, z], wrt=["W", "x"], grad_outputs={y: v})
    got, plain = prepared(f), client.run([y, z], f, wrt=["W", "x"], grad_outputs={y: v})
    yv = f["W"] @ f["x"] + f["c"].astype(np.float64)
    np.testing.assert_allclose(got.values["y"], yv, rtol=1e-6)
    assert got.values["z"] == pytest.approx(np.maximum(yv, 0).sum(), rel=1e-6)
    # The seed of y: dW = v x^T, dx = W^T v.
    np.testing.assert_allclose(got.grads["W"], np.outer(v, f["x"]), rtol=1e-12)
    np.testing.assert_allclose(got.grads["x"], f["W"].T @ v, rtol=1e-12)
    for k in ("W", "x"):
        assert got.grads[k].tobytes() == plain.grads[k].tobytes()
    # Other seeds for the same output, on one call.
    w = np.array([0.0, 3.0, 1.0])
    np.testing.assert_allclose(prepared(f, grad_outputs={"y": w}).grads["x"], f["W"].T @ w)
    with pytest.raises(gg.RequestError, match="seeds 'y'"):
        prepared(f, grad_outputs={"z": np.float64(1.0)})


def test_a_forward_only_prepared_run(client):
    _, z, f = linear_map()
    prepared = client.prepare(z)
    assert prepared(f).grads == {}
    assert prepared(f).value.tobytes() == client.run(z, f).value.tobytes()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda f: {**f, "W": f["W"][:100]}, ["'W'", "(128, 64)", "(100, 64)"]),
        (lambda f: {**f, "b": f["b"].astype(np.float32)}, ["'b'", "float64", "float32"]),
        (lambda f: {k: v for k, v in f.items() if k != "t"}, ["missing", "'t'"]),
        (lambda f: {**f, "nope": f["t"]}, ["'nope'", "not an input"]),
    ],
    ids=["shape", "dtype", "missing", "unknown"],
)
def test_a_bad_feed_to_a_prepared_run_is_named_and_the_next_call_is_served(client, change, words):
    _, L = two_layer_network()
    prepared = client.prepare(L, wrt=WRT)
    f = network_feeds()
    with pytest.raises(gg.FeedError) as info:
        prepared(change(f))
    for w in words:
        assert w in str(info.value)
    if isinstance(info.value, gg.RemoteError):
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_allclose(prepared(f).grads["a"], hand_grads(f)["a"], rtol=1e-10)


def test_unknown_names_fail_when_prepared_or_called(client):
    _, L = two_layer_network()
    with pytest.raises(gg.RequestError, match="nope"):
        client.prepare(L, wrt=["nope"])(network_feeds())


def test_feeds_decoded_as_views_of_the_request_are_never_written():
    """Feeds are read-only views on the request's bytes; ops that write into a dying input's
    buffer (in place) must copy from a feed instead: the request's bytes stay as sent, and a
    second run of the same bytes gives the same answer."""
    with gg.Graph() as g:
        x = gg.input("x", shape=(1000,))
        y = gg.sum(gg.exp(gg.tanh(x) * 2.0 + 1.0) - x, name="y")  # chains of in-place ops
    graph = g.freeze()
    servicer = GraphServicer(Runtime.create())
    servicer.RegisterGraph(
        service_pb2.RegisterGraphRequest(graph=wire.encode_graph(graph)),
        CallContext(None, InFlight()),
    )
    xv = np.linspace(-2.0, 2.0, 1000)
    msg = service_pb2.RunRequest(fingerprint=graph.fingerprint, outputs=[y.name], wrt=["x"])
    wire.encode_tensors({"x": xv}, msg.feeds)
    sent = msg.SerializeToString()
    expected = np.sum(np.exp(np.tanh(xv) * 2.0 + 1.0) - xv)
    grad = np.exp(np.tanh(xv) * 2.0 + 1.0) * 2.0 * (1 - np.tanh(xv) ** 2) - 1.0
    for _ in range(40):  # past the compiled tier's first call, too
        request = service_pb2.RunRequest.FromString(sent)
        out = servicer.Run(request, CallContext(None, InFlight()))
        assert request.SerializeToString() == sent
        res = wire.decode_result(service_pb2.RunResponse.FromString(out))
        np.testing.assert_allclose(res.values[y.name], expected, rtol=1e-12)
        np.testing.assert_allclose(res.grads["x"], grad, rtol=1e-12)
    prepared = servicer.runtime.session.prepare(graph, RunRequest((y.name,), {}, ("x",)))
    view = wire.decode_as(request.feeds, prepared.feeds)["x"]
    assert not view.flags.writeable and view.tobytes() == xv.tobytes()


def registered(servicer: GraphServicer, y: gg.Tensor, feeds: dict[str, np.ndarray]):
    graph = y.graph.freeze()
    servicer.RegisterGraph(
        service_pb2.RegisterGraphRequest(graph=wire.encode_graph(graph)),
        CallContext(None, InFlight()),
    )
    msg = service_pb2.RunRequest(fingerprint=graph.fingerprint, outputs=[y.name])
    wire.encode_tensors(feeds, msg.feeds)
    return msg


def ran(servicer: GraphServicer, msg: service_pb2.RunRequest) -> RunResult:
    """Run's answer (the RunResponse's bytes), decoded."""
    out = servicer.Run(msg, CallContext(None, InFlight()))
    return wire.decode_result(service_pb2.RunResponse.FromString(out))


def small_request(servicer: GraphServicer) -> service_pb2.RunRequest:
    """A registered sum(x * x) of 3 values: a run far under any quick bound."""
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        small = gg.sum(x * x)
    return registered(servicer, small, {"x": np.ones(3)})


def judged_quick_after(monkeypatch, run_as) -> bool:
    """Whether a small request is judged quick once it ran through `run_as(run_prepared)`,
    which waits 50 ms without CPU, under a quick bound of 40 ms: under the wait, far over
    the CPU."""
    servicer = GraphServicer(Runtime.create())
    msg = small_request(servicer)
    session = servicer.runtime.session
    monkeypatch.setattr(session, "run_prepared", run_as(session.run_prepared))
    servicer.Run(msg, CallContext(None, InFlight()))
    monkeypatch.setattr(service, "QUICK_SECONDS", 0.04)
    return servicer.run_is_quick(msg)


def test_only_runs_known_to_be_quick_are_answered_on_the_event_loop(monkeypatch):
    servicer = GraphServicer(Runtime.create())
    msg = small_request(servicer)
    assert not servicer.run_is_quick(msg), "never run: how long it takes is unknown"
    servicer.Run(msg, CallContext(None, InFlight()))
    with monkeypatch.context() as m:  # a bound no machine misses: the decision, not the speed
        m.setattr(service, "QUICK_SECONDS", 10.0)
        assert servicer.run_is_quick(msg)
    with gg.Graph():  # 40 products of 300 x 300 matrices: milliseconds on any machine
        h = gg.input("h", shape=(300, 300))
        eye = gg.constant(np.eye(300))
        for _ in range(40):
            h = h @ eye
        heavy = gg.sum(h)
    msg = registered(servicer, heavy, {"h": np.ones((300, 300))})
    servicer.Run(msg, CallContext(None, InFlight()))
    assert not servicer.run_is_quick(msg)
    msg.fingerprint = "0" * 64  # not registered
    assert not servicer.run_is_quick(msg)


def test_a_run_is_judged_quick_by_its_cpu_time_not_by_its_waits(monkeypatch):
    """In the pool a run waits for the GIL behind the event loop; counted as its time, those
    waits would keep a quick run off the loop for good (each run there waits again)."""

    def waiting(run_prepared):
        def run(*args, **kwargs):
            time.sleep(0.05)  # a wait: no CPU
            return run_prepared(*args, **kwargs)

        return run

    assert judged_quick_after(monkeypatch, waiting)


def test_a_run_elsewhere_is_judged_by_its_wall_time_and_never_held_on_the_loop(monkeypatch):
    """A Ray run waits in ray.get with little CPU: judged by its CPU time it would look quick
    and be answered on the event loop, which would then wait out every round trip to Ray."""

    def on_ray(run_prepared):
        def run(*args, **kwargs):
            time.sleep(0.05)  # the round trip: no CPU here
            result = run_prepared(*args, **kwargs)
            stats = dataclasses.replace(result.stats, executor="ray", wall_time=0.05)
            return dataclasses.replace(result, stats=stats)

        return run

    assert not judged_quick_after(monkeypatch, on_ray)


def test_with_batching_on_a_run_that_cannot_join_a_batch_may_still_be_quick(monkeypatch):
    servicer = GraphServicer(Runtime.create(), batching=BatchingConfig(500, 4))
    msg = small_request(servicer)
    msg.options.exact = True  # never batched
    call = CallContext(None, InFlight())
    assert servicer.run_candidate(msg) is None
    servicer.Run(msg, call)
    monkeypatch.setattr(service, "QUICK_SECONDS", 10.0)
    assert servicer.run_is_quick(msg)


def test_slot_now_takes_a_free_slot_or_none_and_never_waits():
    runs = Admission("max_concurrent_runs", "runs", slots=1, queue=4)
    with runs.slot_now() as first:
        assert first and runs.active == 1
        with runs.slot_now() as second:
            assert not second and runs.active == 1 and runs.waiting == 0
    assert runs.active == 0
    with runs.slot(), runs.slot_now() as third:
        assert not third


def test_a_run_like_an_earlier_one_reuses_its_prepared_run_while_its_graph_is_held(monkeypatch):
    servicer = GraphServicer(Runtime.create())
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(gg.tanh(x) * x)
    xv = np.array([0.5, -1.0, 2.0])
    msg = registered(servicer, y, {"x": xv})
    msg.wrt.append("x")
    prepares = []
    prepare = servicer.runtime.prepare
    monkeypatch.setattr(servicer.runtime, "prepare", lambda *a: prepares.append(a) or prepare(*a))
    grad = np.tanh(xv) + xv * (1 - np.tanh(xv) ** 2)
    for _ in range(3):
        res = ran(servicer, msg)
        np.testing.assert_allclose(res.grads["x"], grad, rtol=1e-12)
    assert len(prepares) == 1, "names and options were decoded and checked once"
    monkeypatch.setattr(service, "QUICK_SECONDS", 10.0)
    assert servicer.run_is_quick(msg)  # what it found is what Run, next on the loop, runs
    res = ran(servicer, msg)
    np.testing.assert_allclose(res.grads["x"], grad, rtol=1e-12)
    assert len(prepares) == 1
    seeded = service_pb2.RunRequest()
    seeded.CopyFrom(msg)
    wire.encode_tensors({y.name: np.array(2.0)}, seeded.grad_outputs)
    for _ in range(2):  # another head: prepared once; its seed values are decoded each call
        res = ran(servicer, seeded)
        np.testing.assert_allclose(res.grads["x"], 2 * grad, rtol=1e-12)
    assert len(prepares) == 2
    servicer.runtime.cache = GraphCache()  # the graph forgotten: NOT_FOUND, as for any other
    with pytest.raises(NotFoundError):
        servicer.Run(msg, CallContext(None, InFlight()))
    registered(servicer, y, {"x": xv})  # registered again: a new graph, prepared anew
    res = ran(servicer, msg)
    np.testing.assert_allclose(res.grads["x"], grad, rtol=1e-12)
    assert len(prepares) == 3


def test_a_graph_run_by_head_stays_recently_used_in_the_graph_cache():
    """Requests found by their head look at the graph cache without its lock, and one in
    TOUCH_EVERY marks the graph used: with room for two graphs, the one run often outlives
    one registered after it and never run, when a third comes."""
    servicer = GraphServicer(Runtime.create(cache_size=2))
    graphs = []
    for scale in (1.0, 2.0):
        with gg.Graph():
            x = gg.input("x", shape=(3,))
            graphs.append(gg.sum(x * scale))
    xv = np.array([0.5, -1.0, 2.0])
    hot = registered(servicer, graphs[0], {"x": xv})
    ran(servicer, hot)  # prepared: later requests of its head are found by it
    registered(servicer, graphs[1], {"x": xv})  # the most recently used now
    for _ in range(service.TOUCH_EVERY):
        assert ran(servicer, hot).values[graphs[0].name] == pytest.approx(xv.sum())
    with gg.Graph():
        third = gg.sum(gg.input("x", shape=(3,)) * 3.0)
    registered(servicer, third, {"x": xv})  # evicts the least recently used
    assert servicer.runtime.cache.peek(hot.fingerprint) is not None
    assert servicer.runtime.cache.peek(graphs[1].graph.freeze().fingerprint) is None


def test_repeated_runs_follow_the_graph_as_it_grows(client):
    """A run() call shape seen before reuses its prepared form only while the graph is the
    one it was made for: nodes added since, other wrt or options, give their own answers."""
    g = gg.Graph()
    with g:
        x = gg.input("x", (3,))
        y = gg.sum(x * x)
    xv = np.array([1.0, -2.0, 3.0])
    for _ in range(3):
        res = client.run(y, {x: xv}, wrt=[x])
        np.testing.assert_array_equal(res.grads["x"], 2 * xv)
        assert res.value == pytest.approx(14.0)
    with g:
        z = gg.sum(gg.exp(x)) + y  # the graph grows: y's run must see the new graph
    res = client.run(y, {x: xv}, wrt=[x])
    np.testing.assert_array_equal(res.grads["x"], 2 * xv)
    np.testing.assert_allclose(client.run(z, {x: xv}, wrt=[x]).grads["x"], np.exp(xv) + 2 * xv)
    assert client.run(y, {x: xv}).grads == {}  # another wrt: another shape
    bad = np.array([np.nan, 1.0, 2.0])
    assert np.isnan(client.run(y, {x: bad}, wrt=[x]).value)
    with pytest.raises(gg.GraphError, match="x"):  # the feed named, in both places
        client.run(y, {x: bad}, wrt=[x], check_numerics=True)


def test_repeated_runs_never_mix_graphs_that_share_names(client):
    """Graphs built one after another reuse node names (and, once freed, memory addresses):
    each run answers for its own graph."""
    xv = np.array([1.0, 2.0])
    for k in range(1, 13):
        g = gg.Graph()
        with g:
            x = gg.input("x", (2,))
            y = gg.sum(x * float(k))
        wrt = [x] if k % 2 else ["x"]  # by node or by name
        np.testing.assert_array_equal(client.run(y, {x: xv}, wrt=wrt).grads["x"], [k, k])
        del g, x, y
