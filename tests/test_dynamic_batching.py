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
from graphgrad.server.batcher import (
    GATHER_SAMPLES,
    LOOP,
    MEASURE_EVERY,
    POOL,
    WAIT,
    Batcher,
    BatchingConfig,
    Costs,
    Member,
)
from graphgrad.server.inflight import CallContext, InFlight
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
    """A run_batch that records the batches it ran (and the slots still held then), and
    answers each member with (member, batch size), or with the error a member asks for."""

    def __init__(self, fail_whole: bool = False) -> None:
        self.batches: list[list[object]] = []
        self.threads: list[str] = []  # where each batch ran
        self.held_while_running: list[int] = []
        self.fail_whole = fail_whole
        self.lock = threading.Lock()
        self.slots = 0  # members holding a slot (taken when they join)

    def __call__(self, key, items):
        with self.lock:
            self.batches.append(list(items))
            self.threads.append(threading.current_thread().name)
            self.held_while_running.append(self.slots)
        if self.fail_whole:
            raise RuntimeError("the stacked run failed")
        return [ValueError(m) if str(m).startswith("bad") else (m, len(items)) for m in items]

    def member(self, item: str, deadline: float | None = None) -> Member:
        """A member as the server makes one: it holds a slot until its batch has run."""
        with self.lock:
            self.slots += 1

        def release():
            with self.lock:
                self.slots -= 1

        def answer(outcome):
            return ("error", str(outcome)) if isinstance(outcome, Exception) else outcome

        return Member(item, lambda: (item, "alone"), answer, release, deadline)


def run_all(
    batcher: Batcher,
    rec: Recorder,
    items,
    cancel_after_join: set[int] = frozenset(),
    deadlines: dict[int, float] | None = None,
):
    """Each (key, member) joins on one event loop, all in one turn of it, with its deadline
    in `deadlines` (a time.monotonic() value); the members named in `cancel_after_join` are
    cancelled once every member has joined. Each one's answer (or "cancelled")."""
    deadlines = deadlines or {}

    async def main():
        with ThreadPoolExecutor(1) as pool:  # batches run one after another
            tasks = [
                asyncio.ensure_future(batcher.run(key, rec.member(item, deadlines.get(j)), pool))
                for j, (key, item) in enumerate(items)
            ]
            await asyncio.sleep(0)  # every task has joined its batch
            for j in cancel_after_join:
                tasks[j].cancel()
            out = await asyncio.gather(*tasks, return_exceptions=True)
            return ["cancelled" if isinstance(a, asyncio.CancelledError) else a for a in out]

    return asyncio.run(main())


FOREVER = 600_000_000  # a window far longer than any test: batches leave because they are full


class AlwaysStack(Costs):
    """Every batch runs stacked, at up to max_batch, whatever its costs measure (the tests of
    the window)."""

    def stack(self, key, n, rows=None):
        return True

    def preferred(self, key, most):
        return most


def batcher_of(rec: Recorder, window_us: int, max_batch: int, **kw) -> Batcher:
    return Batcher(BatchingConfig(window_us, max_batch), rec, costs=AlwaysStack(), **kw)


def test_a_full_batch_runs_at_once_and_no_batch_exceeds_max_batch():
    rec = Recorder()
    batcher = batcher_of(rec, FOREVER, 4)
    out = run_all(batcher, rec, [("k", f"m{i}") for i in range(8)])
    assert out == [(f"m{i}", 4) for i in range(8)]
    assert rec.batches == [["m0", "m1", "m2", "m3"], ["m4", "m5", "m6", "m7"]]
    # every member keeps its run slot until its batch has run, and gives it back then
    first, second = rec.held_while_running
    assert first >= 4 and second == 4 and rec.slots == 0


def test_a_batch_leaves_when_its_window_ends_and_one_member_runs_alone():
    rec = Recorder()
    batcher = batcher_of(rec, 1000, 64)
    assert run_all(batcher, rec, [("k", "m")]) == [("m", "alone")]  # nobody came
    assert run_all(batcher, rec, [("k", f"m{i}") for i in range(5)]) == [
        (f"m{i}", 5) for i in range(5)
    ]
    assert rec.batches == [[f"m{i}" for i in range(5)]] and rec.slots == 0
    assert batcher.waiting() == 0


def test_a_batch_with_an_idle_time_closes_once_no_member_joins_for_it():
    """--batch-idle-us: a long window fills batches while members keep coming, but a batch
    runs once that long has passed without one joining, not at the end of its window."""
    rec = Recorder()
    config = BatchingConfig(20_000_000, 64, idle_us=20_000)  # a 20 s window, 20 ms idle
    batcher = Batcher(config, rec, costs=AlwaysStack())

    async def main():
        with ThreadPoolExecutor(1) as pool:
            joined = []
            for i in range(4):  # each 5 ms after the last: within the idle time
                joined.append(asyncio.ensure_future(batcher.run("k", rec.member(f"a{i}"), pool)))
                await asyncio.sleep(0.005)
            started = time.monotonic()
            first = await asyncio.gather(*joined)
            waited = time.monotonic() - started
            late = [batcher.run("k", rec.member(f"b{i}"), pool) for i in range(2)]
            return first, waited, await asyncio.gather(*late)

    first, waited, late = asyncio.run(main())
    assert first == [(f"a{i}", 4) for i in range(4)] and late == [("b0", 2), ("b1", 2)]
    assert rec.batches == [[f"a{i}" for i in range(4)], ["b0", "b1"]]
    assert waited < 5.0  # the idle time closed it, not its window


def test_requests_stop_waiting_where_batches_gather_nobody_and_wait_again_under_load():
    """One request in flight: after GATHER_SAMPLES batches of one, a request runs at once
    (every _RETRY-th still waits, to see whether others come now); batches that gather
    several again make requests wait."""
    costs: Costs = Costs()
    assert costs.waits("k")  # nothing known: wait
    for _ in range(GATHER_SAMPLES - 1):
        costs.note_gathered("k", 1)
    assert costs.waits("k")  # too few batches to go by
    costs.note_gathered("k", 1)
    decisions = [costs.waits("k") for _ in range(32)]
    assert decisions.count(True) == 2  # the retries
    for _ in range(4):
        costs.note_gathered("k", 12)  # load came back: a retry's batch filled
    assert all(costs.waits("k") for _ in range(32))


def test_keys_never_mix():
    rec = Recorder()
    batcher = batcher_of(rec, FOREVER, 2)
    out = run_all(batcher, rec, [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")])
    assert out == [("a1", 2), ("b1", 2), ("a2", 2), ("b2", 2)]
    assert rec.batches == [["a1", "a2"], ["b1", "b2"]]


def test_a_failing_member_fails_alone_and_a_failed_stack_runs_each_alone():
    rec = Recorder()
    batcher = batcher_of(rec, FOREVER, 3)
    out = run_all(batcher, rec, [("k", "m0"), ("k", "bad1"), ("k", "m2")])
    assert out == [("m0", 3), ("error", "bad1"), ("m2", 3)]
    failing = Recorder(fail_whole=True)
    batcher = batcher_of(failing, FOREVER, 3)
    out = run_all(batcher, failing, [("k", f"m{i}") for i in range(3)])
    assert out == [(f"m{i}", "alone") for i in range(3)] and failing.slots == 0


def test_a_member_cancelled_while_its_batch_is_open_leaves_it_and_the_others_are_answered():
    rec = Recorder()
    batcher = batcher_of(rec, 1000, 64)
    out = run_all(batcher, rec, [("k", f"m{i}") for i in range(4)], cancel_after_join={1})
    assert out == [("m0", 3), "cancelled", ("m2", 3), ("m3", 3)]
    assert rec.batches == [["m0", "m2", "m3"]] and rec.slots == 0  # its slot went back at once


def test_a_batch_and_a_lone_request_have_their_own_bounds_for_the_loop():
    """batch_quick_seconds (service.BATCH_QUICK_SECONDS) for two or more, quick_seconds for a
    request alone: a batch measured under the first runs on the loop, a lone run measured over
    the second goes to the pool."""
    rec = Recorder()
    batcher = batcher_of(rec, FOREVER, 2, quick_seconds=1e-9, batch_quick_seconds=600.0)
    for _ in range(2):
        assert run_all(batcher, rec, [("k", "m0"), ("k", "m1")]) == [("m0", 2), ("m1", 2)]
    assert rec.threads[0] != "MainThread" and rec.threads[1] == "MainThread"
    batcher._costs.batch["k", 1] = 1e-3  # a lone run measured slow for quick_seconds
    assert not batcher._quick("k", 1) and batcher._quick("k", 2)


def test_a_batch_whose_members_all_left_never_runs():
    rec = Recorder()
    batcher = batcher_of(rec, 1000, 64)
    assert run_all(batcher, rec, [("k", "m0"), ("k", "m1")], {0, 1}) == ["cancelled"] * 2
    assert rec.batches == [] and rec.slots == 0 and batcher.waiting() == 0


def test_a_batch_runs_on_the_loop_once_its_run_was_measured_quick():
    rec = Recorder()
    batcher = batcher_of(rec, FOREVER, 2, quick_seconds=600.0)
    for _ in range(2):
        assert run_all(batcher, rec, [("k", "m0"), ("k", "m1")]) == [("m0", 2), ("m1", 2)]
    assert rec.threads[0] != "MainThread" and rec.threads[1] == "MainThread"
    assert rec.slots == 0


def test_a_batch_runs_stacked_only_where_stacking_was_measured_to_cost_less():
    costs: Costs = Costs()
    assert costs.stack("k", 4)  # nothing measured: try stacked
    costs.stacked["k", 4] = 2.0
    assert not costs.stack("k", 4)  # then alone
    costs.alone["k"] = 1.0  # alone costs less per request than a stack of 4
    choices = [costs.stack("k", 4) for _ in range(32)]
    assert choices.count(True) == 2 and not choices[0]  # tried stacked again now and then
    costs.alone["k"] = 3.0
    assert costs.stack("k", 4) and costs.stack("k", 2)  # 2: not measured yet


def test_a_batch_learns_its_costs_and_runs_each_member_alone_when_stacking_costs_more():
    rec = Recorder()
    costs: Costs = Costs()
    batcher = Batcher(BatchingConfig(FOREVER, 2), rec, costs=costs)
    items = [("k", "m0"), ("k", "m1")]
    assert run_all(batcher, rec, items) == [("m0", 2), ("m1", 2)]  # stacked: not measured yet
    assert run_all(batcher, rec, items) == [("m0", "alone"), ("m1", "alone")]  # now alone
    assert set(costs.stacked) == {("k", 2)} and set(costs.alone) == {"k"}
    costs.stacked["k", 2], costs.alone["k"] = 1.0, 2.0  # stacking measured cheaper
    assert run_all(batcher, rec, items) == [("m0", 2), ("m1", 2)]


def test_stacks_at_the_same_rows_are_learnt_together_and_batches_close_at_the_cheapest_rows():
    """A stack costs by its rows (members padded to the next power of two): a stack of 17
    measured at 32 rows decides for 20 and 31 members too, each by its own share; a batch
    runs once it reaches the rows where a stack was measured cheapest per request, where
    that beats running alone (the seed's network: 8 pays, 32 costs twice a lone run)."""
    batcher = Batcher(BatchingConfig(FOREVER, 64), Recorder())
    assert [batcher.rows(n) for n in (2, 3, 8, 9, 17, 32, 33, 64, 100)] == [
        2, 4, 8, 16, 32, 32, 64, 64, 100,
    ]  # fmt: skip
    costs: Costs = Costs()
    costs.alone["k"] = 1.0
    costs.note_stacked("k", 17, 2.0 * 32 / 17, rows=32)  # a request costs 2.0 in a full stack
    assert costs.stacked == {("k", 32): pytest.approx(2.0)}
    assert not costs.stack("k", 20, rows=32) and not costs.stack("k", 31, rows=32)
    assert costs.preferred("k", 64) == 64  # no stack pays: batches fill to max_batch
    costs.note_stacked("k", 8, 0.75, rows=8)
    assert costs.stack("k", 8, rows=8) and costs.preferred("k", 64) == 8
    rec = Recorder()
    batcher = Batcher(BatchingConfig(20_000_000, 64), rec, costs=costs)  # (a 20 s window)
    assert [size for _, size in run_all(batcher, rec, [("k", f"m{i}") for i in range(16)])] == [
        8
    ] * 16
    assert rec.batches == [[f"m{i}" for i in range(8)], [f"m{i}" for i in range(8, 16)]]


def test_a_request_waits_for_others_only_where_stacking_was_measured_to_pay_somewhere():
    costs: Costs = Costs()
    assert costs.waits("k")  # nothing measured: wait, to try stacking
    costs.alone["k"] = 1.0
    costs.note_stacked("k", 2, 2.0)
    costs.note_stacked("k", 4, 1.5)  # alone costs less than a stack at every size tried
    choices = [costs.waits("k") for _ in range(32)]
    assert choices.count(True) == 2 and not choices[0]  # still waits now and then
    costs.note_stacked("k", 8, 0.5)  # a size where stacking pays
    assert all(costs.waits("k") for _ in range(32))
    assert costs.waits("other")


def test_a_request_that_would_run_alone_anyway_runs_at_once_without_waiting_the_window():
    rec = Recorder()
    costs: Costs = Costs()
    costs.alone["k"], costs.batch["k", 1] = 1.0, 0.0  # quick: on the loop
    costs.note_stacked("k", 2, 2.0)
    batcher = Batcher(BatchingConfig(FOREVER, 4), rec, costs=costs, quick_seconds=1.0)

    async def lone():  # with the window waited for, this would time out
        with ThreadPoolExecutor(1) as pool:
            return await asyncio.wait_for(batcher.run("k", rec.member("m"), pool), 60)

    assert asyncio.run(lone()) == ("m", "alone")
    assert rec.batches == [] and rec.slots == 0 and batcher.waiting() == 0
    costs.skips["k"] = -1  # the next one waits, to measure again: the others join its batch
    assert run_all(batcher, rec, [("k", f"m{i}") for i in range(4)]) == [
        (f"m{i}", 4) for i in range(4)
    ]


def test_a_request_routed_to_the_loop_runs_there_and_its_costs_are_noted():
    """route() says how a member goes: alone on the loop where waiting does not pay and its
    lone run was quick (run_here: no Member, no future), in the pool where it was slow, into
    a batch where one of its key is open; run_here notes its CPU as a lone run's and a batch
    of one's, and hands an error to the answer, as a batch does."""
    rec = Recorder()
    costs: Costs = Costs()
    costs.alone["k"], costs.batch["k", 1] = 1.0, 0.0
    costs.note_stacked("k", 2, 2.0)  # alone costs less than stacked: no waiting
    batcher = Batcher(BatchingConfig(FOREVER, 4), rec, costs=costs, quick_seconds=1.0)
    assert batcher.route("k") == LOOP
    assert batcher.run_here("k", lambda: "ran", lambda outcome: ("answer", outcome)) == (
        "answer",
        "ran",
    )
    assert costs.alone["k"] < 1.0 and costs.batch["k", 1] < 1.0  # CPU time noted (averaged)

    def fails():
        raise GraphError("its own error")

    got = batcher.run_here("k", fails, lambda outcome: outcome)
    assert isinstance(got, GraphError) and str(got) == "its own error"
    costs.batch["k", 1] = 5.0  # its lone run was measured slow: the pool
    assert batcher.route("k") == POOL
    costs.skips["k"] = -1  # the next one waits, to measure again
    assert batcher.route("k") == WAIT
    assert rec.batches == [] and batcher.waiting() == 0


def test_run_here_times_one_run_in_measure_every_of_each_key():
    """Keys taking turns on the loop are each timed (their costs, and so their routes, keep
    up with drift), one run of each in MEASURE_EVERY, the first of each at once."""
    costs: Costs = Costs()
    batcher = Batcher(BatchingConfig(FOREVER, 4), Recorder(), costs=costs, quick_seconds=1.0)
    timed = {"a": 0, "b": 0}
    for i in range(8 * MEASURE_EVERY):
        key = "ab"[i % 2]
        costs.batch[key, 1] = 9.0  # a timed run moves the average off it
        batcher.run_here(key, lambda: sum(range(100)), lambda outcome: outcome)
        timed[key] += costs.batch[key, 1] != 9.0
    assert timed == {"a": 4, "b": 4}


def test_a_run_joins_a_batch_only_if_it_would_succeed_alone_and_is_not_exact():
    servicer = GraphServicer(Runtime.create(), batching=BatchingConfig(FOREVER, 4))
    graph = servicer.runtime.register(mlp().nodes)
    feeds = mlp_feeds(np.random.default_rng(0))

    def member(feeds=feeds, exact=False, fingerprint=graph.fingerprint):
        msg = run_msg(fingerprint, feeds, ["L"], list(MLP_WRT), exact=exact)
        c = servicer.run_candidate(msg)
        call = CallContext(None, InFlight())
        return None if c is None else (c.key, servicer.member(c, call, lambda respond: respond()))

    joined = member()
    assert joined is not None
    key, m = joined
    assert key == stack_key(graph, m.item.request, RunOptions())
    alone = service_pb2.RunResponse.FromString(m.answer(m.alone()))  # as the pool works it out
    assert alone.stats.batch_size == 1 and set(alone.grads) == set(MLP_WRT)
    assert member(exact=True) is None
    assert member(feeds={**feeds, "x": np.zeros(9)}) is None  # the ordinary way reports it
    assert member(fingerprint="unknown") is None
    # in a batch, the pool hands each member its response, or raises its own error
    with pytest.raises(GraphError, match="bad"):
        m.answer(GraphError("bad"))


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
