"""Dynamic batching of Run requests: every op's stacked results against its results alone
(within the ulps its registry entry states), the stacking checks that send a request to run
alone, the batcher's window, max batch, exact and per-member errors, and a real
`graphgrad serve --batch-window-us ... --max-batch ...` under 32 concurrent clients."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad import wire
from graphgrad.engine import (
    REGISTRY,
    Cancellation,
    Graph,
    Node,
    RunOptions,
    RunRequest,
    Session,
    stacking,
)
from graphgrad.engine.errors import CancelledError, CancelReason, GraphError, RequestError
from graphgrad.engine.stacking import (
    StackCancellation,
    StackKey,
    run_stacked,
    stack_key,
    stack_size,
)
from graphgrad.server.batcher import Batcher, BatchingConfig
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import GraphServicer
from graphgrad.v1 import service_pb2, service_pb2_grpc

from .server_proc import running_server
from .test_batching import UNBATCHABLE
from .test_ops import SPECIAL, default_cases, dtype_of, random_inputs

N = 3
SESSION = Session()


def ulps(a: np.ndarray, b: np.ndarray) -> float:
    """The most units in the last place two arrays differ by (integers: 0 or infinity)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype.kind != "f":
        return 0.0 if np.array_equal(a, b) else np.inf
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    spacing = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    return float(np.max(np.where(same, 0.0, np.abs(a - b) / spacing), initial=0.0))


def run_alone(graph: Graph, request: RunRequest):
    return SESSION.run(graph, request)


def stacked(graph: Graph, requests: list[RunRequest], checks: list[bool] | None = None):
    keys = {stack_key(graph, q, RunOptions()) for q in requests}
    assert len(keys) == 1 and None not in keys, keys
    (key,) = keys
    assert isinstance(key, StackKey)
    n = len(requests)  # padded as the server pads (3 requests: 4 rows)
    return run_stacked(run_alone, graph, key, requests, checks or [False] * n, stack_size(n, 64))


def op_cases():
    for name in sorted(set(REGISTRY) - UNBATCHABLE):
        for k, (shapes, attrs) in enumerate(
            SPECIAL.get(name) or default_cases(REGISTRY[name].arity)
        ):
            for dtype in ("float64", "float32"):
                yield pytest.param(name, shapes, attrs, dtype, id=f"{name}-{k}-{dtype}")


@pytest.mark.parametrize(("op", "shapes", "attrs", "dtype"), list(op_cases()))
def test_every_op_stacked_is_within_its_stated_ulps(op, shapes, attrs, dtype):
    """N requests, each with its own random feeds and seeds, run stacked and alone: values and
    gradients differ by at most the op's `batch_ulps` (docs/batching.md has the table)."""
    rng = np.random.default_rng(11)
    names = [f"x{k}" for k in range(len(shapes))]
    dtypes = [dtype if dtype_of(s) == "float64" else dtype_of(s) for s in shapes]
    graph = Graph(
        [
            *(
                Node(n, "input", shape=s, dtype=d)
                for n, s, d in zip(names, shapes, dtypes, strict=True)
            ),
            Node("out", op, tuple(names), attrs),
        ]
    )
    out_t = graph.types[-1]
    wrt = tuple(n for n, d in zip(names, dtypes, strict=True) if d.startswith("float"))
    differentiable = out_t.dtype.startswith("float") and bool(wrt)
    requests = []
    for _ in range(N):
        xs = [x.astype(d) for x, d in zip(random_inputs(op, shapes, rng), dtypes, strict=True)]
        seed = rng.standard_normal(out_t.shape).astype(out_t.dtype)
        requests.append(
            RunRequest(
                ("out",),
                dict(zip(names, xs, strict=True)),
                wrt if differentiable else (),
                {"out": seed} if differentiable else None,
            )
        )
    worst = 0.0
    for q, res in zip(requests, stacked(graph, requests), strict=True):
        assert not isinstance(res, GraphError)
        alone = run_alone(graph, q)
        assert res.stats.batch_size == N
        for kind in ("values", "grads"):
            got, want = getattr(res, kind), getattr(alone, kind)
            assert got.keys() == want.keys()
            worst = max([worst, *(ulps(got[k], want[k]) for k in want)])
    assert worst <= REGISTRY[op].batch_ulps, f"{op} moved {worst} ulps stacked"


def mlp(hidden: int = 16) -> Graph:
    """The seed's network, smaller: tanh(W x + b), a linear layer, a squared-error loss."""
    return Graph(
        [
            Node("x", "input", shape=(8,), dtype="float64"),
            Node("t", "input", shape=(3,), dtype="float64"),
            Node("W", "input", shape=(hidden, 8), dtype="float64"),
            Node("b", "input", shape=(hidden,), dtype="float64"),
            Node("V", "input", shape=(3, hidden), dtype="float64"),
            Node("Wx", "matmul", ("W", "x")),
            Node("Wx_b", "add", ("Wx", "b")),
            Node("h", "tanh", ("Wx_b",)),
            Node("y", "matmul", ("V", "h")),
            Node("d", "sub", ("y", "t")),
            Node("d2", "mul", ("d", "d")),
            Node("L", "sum", ("d2",)),
        ]
    )


def mlp_feeds(rng: np.random.Generator, hidden: int = 16) -> dict[str, np.ndarray]:
    shapes = {"x": (8,), "t": (3,), "W": (hidden, 8), "b": (hidden,), "V": (3, hidden)}
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


MLP_WRT = ("W", "b", "V", "h")


def test_a_network_stacked_equals_each_request_alone_bit_for_bit():
    graph, rng = mlp(), np.random.default_rng(1)
    requests = [RunRequest(("L", "y"), mlp_feeds(rng), MLP_WRT) for _ in range(5)]
    results = stacked(graph, requests)
    for q, res in zip(requests, results, strict=True):
        alone = run_alone(graph, q)
        assert not isinstance(res, GraphError) and res.stats.batch_size == 5
        for k in alone.values:
            np.testing.assert_array_equal(res.values[k], alone.values[k])
        for k in alone.grads:
            np.testing.assert_array_equal(res.grads[k], alone.grads[k])


def test_stacks_take_a_few_sizes():
    assert [stack_size(n, 64) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert [stack_size(n, 10) for n in (3, 9, 10)] == [4, 10, 10]


def test_a_member_failing_check_numerics_fails_alone():
    graph, rng = mlp(), np.random.default_rng(2)
    requests = [RunRequest(("L",), mlp_feeds(rng), ("W",)) for _ in range(3)]
    requests[1].feeds["x"][0] = np.nan
    results = stacked(graph, requests, [True, True, True])
    assert isinstance(results[1], RequestError) and "feeds['x']" in str(results[1])
    for j in (0, 2):
        res = results[j]
        assert not isinstance(res, GraphError)
        np.testing.assert_array_equal(res.grads["W"], run_alone(graph, requests[j]).grads["W"])


def test_requests_that_would_fail_or_could_mix_run_alone():
    graph, rng = mlp(), np.random.default_rng(3)
    good = mlp_feeds(rng)
    opts = RunOptions()
    assert stack_key(graph, RunRequest(("L",), good, ("W",)), opts) is not None
    wrong_shape = {**good, "x": np.zeros(7)}
    wrong_dtype = {**good, "x": good["x"].astype(np.float32)}
    missing = {k: v for k, v in good.items() if k != "t"}
    unknown = {**good, "nope": np.zeros(1)}
    for feeds in (wrong_shape, wrong_dtype, missing, unknown):
        assert stack_key(graph, RunRequest(("L",), feeds, ("W",)), opts) is None
    assert stack_key(graph, RunRequest(("L",), good, ("W",)), RunOptions(exact=True)) is None
    # a non-scalar first output needs seeds; a bad seed shape; an unknown output
    assert stack_key(graph, RunRequest(("y",), good, ("W",)), opts) is None
    bad_seed = RunRequest(("y",), good, ("W",), {"y": np.ones(4)})
    assert stack_key(graph, bad_seed, opts) is None
    assert stack_key(graph, RunRequest(("nope",), good), opts) is None
    # a gradient with respect to a node no feed reaches would sum over the stack
    const = Graph(
        [
            Node("x", "input", shape=(2,), dtype="float64"),
            Node("c", "constant", (), {"value": np.ones(2)}),
            Node("e", "exp", ("c",)),
            Node("p", "mul", ("x", "e")),
            Node("s", "sum", ("p",)),
        ]
    )
    feeds = {"x": np.ones(2)}
    assert stack_key(const, RunRequest(("s",), feeds, ("x",)), opts) is not None
    assert stack_key(const, RunRequest(("s",), feeds, ("e",)), opts) is None


def test_a_graph_with_an_op_over_the_bound_runs_alone(monkeypatch):
    graph, rng = mlp(), np.random.default_rng(4)  # a fresh graph: nothing cached for it
    request = RunRequest(("L",), mlp_feeds(rng), ("W",))
    monkeypatch.setattr(stacking, "STACK_ULPS", -1)  # every op (0 ulps) is now over it
    assert stack_key(graph, request, RunOptions()) is None


def test_a_stack_stops_only_when_every_member_is_cancelled():
    a, b = Cancellation.within(5.0), Cancellation.within(50.0)
    stack = StackCancellation([a, b])
    assert stack.deadline == b.deadline
    a.cancel()
    stack.check()  # b still waits for its answer
    b.cancel(CancelReason.SHUTDOWN)
    with pytest.raises(CancelledError):
        stack.check()
    assert StackCancellation([a, Cancellation()]).deadline is None


# --- the batcher ---------------------------------------------------------------------------


class Recorder:
    """A run_batch that records the batches it ran and answers each member with (member,
    batch size), or with the error a member asks for."""

    def __init__(self, fail_whole: bool = False) -> None:
        self.batches: list[list[object]] = []
        self.fail_whole = fail_whole
        self.lock = threading.Lock()

    def __call__(self, key, members):
        with self.lock:
            self.batches.append(list(members))
        if self.fail_whole:
            raise RuntimeError("the stacked run failed")
        return [ValueError(m) if str(m).startswith("bad") else (m, len(members)) for m in members]


def submit_all(batcher: Batcher, items: list[tuple[object, str]]) -> list[object]:
    """Each (key, member) from its own thread, all at once; each one's result or error."""
    start = threading.Barrier(len(items))

    def one(item):
        key, member = item
        start.wait()
        try:
            return batcher.run(key, member, lambda: (member, "alone"))
        except Exception as e:
            return e

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))


def test_a_full_batch_runs_at_once_and_no_batch_exceeds_max_batch():
    rec = Recorder()
    # a window far longer than any test: batches leave because they are full
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=4), rec)
    out = submit_all(batcher, [("k", f"m{i}") for i in range(8)])
    assert sorted(out) == sorted((f"m{i}", 4) for i in range(8))
    assert sorted(len(b) for b in rec.batches) == [4, 4]


def test_a_batch_leaves_when_its_window_ends():
    rec = Recorder()
    batcher = Batcher(BatchingConfig(window_us=1000, max_batch=64), rec)
    assert batcher.run("k", "m", lambda: ("m", "alone")) == ("m", "alone")  # nobody came
    out = submit_all(batcher, [("k", f"m{i}") for i in range(5)])
    assert sorted(m for m, _ in out) == [f"m{i}" for i in range(5)]
    assert sum(len(b) for b in rec.batches) == sum(1 for _, n in out if n != "alone")
    assert all(len(b) <= 5 for b in rec.batches)


def test_keys_never_mix_and_a_missing_key_runs_alone():
    rec = Recorder()
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=2), rec)
    items = [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), (None, "exact")]
    out = submit_all(batcher, items)
    assert out[4] == ("exact", "alone")
    assert sorted(sorted(b) for b in rec.batches) == [["a1", "a2"], ["b1", "b2"]]


def test_a_call_on_an_event_loop_never_joins_a_batch():
    rec = Recorder()
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=2), rec)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.run, "k", "m0", lambda: ("m0", "alone"))
        while batcher.waiting() == 0:  # until m0's batch is open
            time.sleep(0.001)

        async def on_loop():
            return batcher.run("k", "loop", lambda: ("loop", "alone"))

        assert asyncio.run(on_loop()) == ("loop", "alone")
        assert batcher.waiting() == 1
        second = pool.submit(batcher.run, "k", "m2", lambda: ("m2", "alone"))
        assert (first.result(), second.result()) == (("m0", 2), ("m2", 2))
    assert rec.batches == [["m0", "m2"]]


def test_a_failing_member_fails_alone_and_a_failed_stack_runs_each_alone():
    batcher = Batcher(BatchingConfig(window_us=600_000_000, max_batch=3), Recorder())
    out = submit_all(batcher, [("k", "m0"), ("k", "bad1"), ("k", "m2")])
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad1"
    assert out[0] == ("m0", 3) and out[2] == ("m2", 3)
    failing = Batcher(BatchingConfig(window_us=600_000_000, max_batch=3), Recorder(True))
    out = submit_all(failing, [("k", f"m{i}") for i in range(3)])
    assert out == [(f"m{i}", "alone") for i in range(3)]


def test_server_info_reports_batching_only_when_on():
    req = service_pb2.GetServerInfoRequest()
    off = GraphServicer(Runtime.create()).GetServerInfo(req, None)  # type: ignore[arg-type]
    assert not off.HasField("batching")
    on = GraphServicer(Runtime.create(), batching=BatchingConfig(500, 16))
    info = on.GetServerInfo(req, None)  # type: ignore[arg-type]
    assert (info.batching.window_us, info.batching.max_batch) == (500, 16)


def test_exact_goes_from_the_sdk_over_the_wire():
    with gg.Graph():
        x = gg.input("x", shape=(2,))
        loss = gg.sum(x * x)
    assert gg.connect().prepare(loss, wrt=[x], exact=True).spec.options.exact
    assert not gg.connect().prepare(loss, wrt=[x]).spec.options.exact
    msg = wire.encode_run_request(RunRequest(("y",), {}, ()), RunOptions(exact=True))
    assert msg.options.exact and wire.decode_run_request(msg)[1].exact


# --- end to end ----------------------------------------------------------------------------

WINDOW_US, MAX_BATCH, CLIENTS, ROUNDS = 50_000, 8, 32, 3


def run_msg(fingerprint: str, feeds, outputs, wrt, check=False, exact=False, seeds=None):
    msg = service_pb2.RunRequest(fingerprint=fingerprint, outputs=outputs, wrt=wrt)
    msg.options.check_numerics, msg.options.exact = check, exact
    wire.encode_tensors(feeds, msg.feeds)
    wire.encode_tensors(seeds or {}, msg.grad_outputs)
    return msg


def test_32_concurrent_clients_get_their_own_answers_and_errors():
    args = ("--batch-window-us", str(WINDOW_US), "--max-batch", str(MAX_BATCH))
    with (
        running_server(*args) as server,  # run slots default to --max-batch
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = service_pb2_grpc.GraphServiceStub(channel)
        info = stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=30)
        assert (info.batching.window_us, info.batching.max_batch) == (WINDOW_US, MAX_BATCH)
        graphs = {h: mlp(h) for h in (16, 32)}  # two graphs, two sets of shapes
        fps = {
            h: stub.RegisterGraph(
                service_pb2.RegisterGraphRequest(graph=wire.encode_graph(g)), timeout=30
            ).fingerprint
            for h, g in graphs.items()
        }

        def request(client: int, round_: int):
            """(kind, message): mixed graphs and outputs, and some bad requests."""
            rng = np.random.default_rng(client * 100 + round_)
            h = (16, 32)[client % 2]
            feeds = mlp_feeds(rng, h)
            kind = ("good", "good", "good", "seeded", "shape", "missing", "nan", "exact")[
                (client + round_) % 8
            ]
            if kind == "shape":
                feeds["x"] = np.zeros(9)
            elif kind == "missing":
                del feeds["t"]
            elif kind == "nan":
                feeds["W"][0, 0] = np.nan
            if kind == "seeded":
                seeds = {"y": rng.standard_normal(3)}
                return kind, run_msg(fps[h], feeds, ["y"], ["W", "V"], seeds=seeds)
            return kind, run_msg(
                fps[h], feeds, ["L", "y"], list(MLP_WRT), check=True, exact=kind == "exact"
            )

        start = threading.Barrier(CLIENTS)

        def client(c: int):
            start.wait()
            out = []
            for r in range(ROUNDS):
                kind, msg = request(c, r)
                try:
                    out.append((kind, msg, stub.Run(msg, timeout=120)))
                except grpc.RpcError as e:
                    out.append((kind, msg, e))
            return out

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [a for batch in pool.map(client, range(CLIENTS)) for a in batch]

        sizes = []
        for kind, msg, res in answers:
            if kind in ("shape", "missing", "nan"):
                assert isinstance(res, grpc.RpcError), kind
                assert res.code() == grpc.StatusCode.INVALID_ARGUMENT
                field = {"shape": "'x'", "missing": "'t'", "nan": "feeds['W']"}[kind]
                assert field in res.details(), (kind, res.details())
                continue
            assert not isinstance(res, grpc.RpcError), (kind, res)
            sizes.append(res.stats.batch_size)
            if kind == "exact":
                assert res.stats.batch_size == 1
            alone = msg.__deepcopy__()
            alone.options.exact = True  # the same request, unbatched, on the same server
            want = stub.Run(alone, timeout=60)
            assert want.stats.batch_size == 1
            for got_map, want_map in ((res.values, want.values), (res.grads, want.grads)):
                assert set(got_map) == set(want_map)
                for k in want_map:  # within the documented bound: 0 ulps
                    np.testing.assert_array_equal(
                        wire.decode_tensor(got_map[k]), wire.decode_tensor(want_map[k])
                    )
        assert len(sizes) == CLIENTS * ROUNDS * 5 // 8
        assert max(sizes) > 1 and max(sizes) <= MAX_BATCH
