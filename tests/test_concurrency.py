"""No client can starve the server (issue 10, item 7; issue 13, item 4), against real
`graphgrad serve`s: idle WatchJob streams hold no worker thread, and Runs and streams beyond
the configured caps get RESOURCE_EXHAUSTED naming the cap (counted in the metrics under it)
while the admitted ones are served, and the server recovers once the load has gone."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import CancelledError, CancelReason, LimitError
from graphgrad.server import cli
from graphgrad.server.admission import Admission
from graphgrad.server.app import ServerConfig
from graphgrad.server.inflight import CallContext, InFlight, LoopCall
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc
from graphgrad.wire import encode_tensor

from .scrape import delta, scrape, series, wait_for
from .server_proc import (
    assert_good_request_served,
    running_server,
    wait_until_probe,
    wait_until_running,
)

DEADLINE = 10.0  # per call: generous, so a pass never depends on the machine's speed


def slow_graph(iterations: int = 1500):
    """About half a second of work for one Run: calls sent together arrive within it."""
    with gg.Graph():
        h = gg.input("x", shape=(200, 200))
        eye = gg.constant(np.eye(200) * 0.5)
        for _ in range(iterations):
            h = gg.tanh(h @ eye)
        y = gg.sum(h)
    return y


def small_graph():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x * x)
    return y


def start_long_job(client: gg.RemoteClient) -> gg.RemoteJob:
    """A one-network job that keeps running until cancelled."""
    with gg.Graph():
        x = gg.input("x", shape=(4,))
        w = gg.input("w", shape=(4,))
        loss = gg.sum((w - x) ** 2, name="loss")
    params = {"w": np.zeros((1, 4))}
    return client.train(loss, params, {"x": np.ones((1, 4))}, steps=1_000_000)


class Watchers:
    """`n` WatchJob streams on one job, each read by its own client thread."""

    def __init__(self, channel: grpc.Channel, job_id: str, n: int) -> None:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        self.calls = [stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id)) for _ in range(n)]
        self.first = [threading.Event() for _ in range(n)]
        self.errors: list[grpc.RpcError] = []
        self.threads = [
            threading.Thread(target=self._read, args=(k,), daemon=True) for k in range(n)
        ]
        for t in self.threads:
            t.start()

    def _read(self, k: int) -> None:
        try:
            for _ in self.calls[k]:
                self.first[k].set()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(e)
            self.first[k].set()

    def established(self, timeout: float = 30.0) -> list[int]:
        """Indexes of the streams that got no first message (nor an error) within `timeout`
        in all: a bound on the wait, not a measurement."""
        self.first[-1].wait(timeout)  # the last stream opened
        return [k for k, ev in enumerate(self.first) if not ev.wait(1.0)]

    def close(self) -> None:
        for c in self.calls:
            c.cancel()
        for t in self.threads:
            t.join(30)


@pytest.fixture
def long_job() -> Iterator[tuple[str, gg.RemoteClient]]:
    with running_server() as server, gg.connect(server.address) as client:
        job = start_long_job(client)
        try:
            yield job.id, client
        finally:
            job.cancel()


def test_idle_watchers_do_not_lock_out_other_calls(long_job):
    job_id, client = long_job
    with grpc.insecure_channel(client.address) as channel:
        watchers = Watchers(channel, job_id, 32)  # twice the default worker threads
        try:
            assert watchers.established() == [], "watchers got no first message"
            assert not watchers.errors
            graphs = service_pb2_grpc.GraphServiceStub(channel)
            jobs = jobs_pb2_grpc.JobServiceStub(channel)
            listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=DEADLINE)
            assert job_id in [j.id for j in listed.jobs]
            info = graphs.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=DEADLINE)
            assert info.version
            y = small_graph()
            res = client.run(y, {"x": np.array([1.0, 2.0, 3.0])}, wrt=["x"], timeout=DEADLINE)
            np.testing.assert_array_equal(res.grads["x"], [2.0, 4.0, 6.0])
        finally:
            watchers.close()


@pytest.fixture(scope="module")
def capped():
    caps = ("--max-concurrent-runs", "1", "--run-queue", "1", "--max-streams", "3")
    with running_server(*caps) as s:
        yield s


def test_streams_beyond_the_cap_are_resource_exhausted(capped):
    with gg.connect(capped.address) as client:
        job = start_long_job(client)
        try:
            with grpc.insecure_channel(capped.address) as channel:
                watchers = Watchers(channel, job.id, 3)
                try:
                    assert watchers.established() == [] and not watchers.errors
                    stub = jobs_pb2_grpc.JobServiceStub(channel)
                    with pytest.raises(grpc.RpcError) as e:
                        next(stub.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=DEADLINE))
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "max_streams=3" in (e.value.details() or "")
                    # The other calls are still served.
                    assert client.jobs()
                finally:
                    watchers.close()
        finally:
            job.cancel()


@pytest.mark.parametrize(
    ("flag", "least"),
    [
        ("--max-queued-jobs", 0),
        ("--grace", 0),
        ("--run-queue", 0),
        ("--max-running-jobs", 1),
        ("--max-concurrent-runs", 1),
        ("--max-streams", 1),
        ("--workers", 1),
        ("--threads", 1),
        ("--max-nodes", 1),
        ("--port", 0),
        ("--metrics-port", 0),
    ],
)
def test_a_numeric_flag_below_its_minimum_stops_the_start(flag, least):
    args = cli.parser().parse_args(["serve", flag, str(least - 1)])
    with pytest.raises(SystemExit) as e:
        cli.config_from(args)
    below = f"graphgrad serve: {flag} must be at least {least}, got {least - 1}"
    assert str(e.value) in (below, f"{below}.0")  # --grace is a float
    at_least = cli.config_from(cli.parser().parse_args(["serve", flag, str(least)]))
    assert at_least.host == "127.0.0.1"


def test_the_flags_defaults_are_the_configs():
    config = cli.config_from(cli.parser().parse_args(["serve"]))
    assert config == ServerConfig()


def test_admission_runs_then_queues_then_refuses():
    runs = Admission("max_concurrent_runs", "runs", slots=1, queue=1)
    ran: list[str] = []

    def queued() -> None:
        with runs.slot(timeout=60):
            ran.append("queued")

    with runs.slot():
        waiter = threading.Thread(target=queued)
        waiter.start()
        while runs.waiting == 0:  # until the second caller waits in the queue
            time.sleep(0.01)
        with pytest.raises(LimitError) as e, runs.slot():
            pass
        assert e.value.limit == "max_concurrent_runs" and "max_concurrent_runs=1" in str(e.value)
        assert ran == []
    waiter.join()
    assert ran == ["queued"] and runs.active == runs.waiting == 0
    with runs.slot(), pytest.raises(CancelledError, match="deadline"), runs.slot(timeout=0.01):
        pass  # the caller's deadline passes while it waits
    assert runs.active == runs.waiting == 0


def test_a_call_answered_on_the_loop_is_held_by_no_one_and_stopped_by_its_deadline_alone():
    """A call worked out on the event loop without waiting gets a LoopCall: InFlight does not
    hold it and it has no callbacks (nothing can end it mid-run), and its cancellation stops
    the work at its deadline. Once the server is stopping, such a call is ended at once, as
    any call that starts then."""
    inflight = InFlight()

    class Context:
        def __init__(self, remaining):
            self.remaining, self.callbacks = remaining, []

        def time_remaining(self):
            return self.remaining

        def add_done_callback(self, callback):
            self.callbacks.append(callback)

    context = Context(0.0)
    call = inflight.on_loop(context)
    assert isinstance(call, LoopCall) and context.callbacks == [] and not inflight._calls
    with pytest.raises(CancelledError) as e:
        time.sleep(0.001)
        call.cancellation().check()
    assert e.value.reason == CancelReason.DEADLINE and call.time_remaining() == 0.0
    assert inflight.on_loop(Context(None)).cancellation().deadline is None
    inflight.close()
    stopped = inflight.on_loop(Context(60.0))
    assert isinstance(stopped, CallContext) and stopped.reason == CancelReason.SHUTDOWN
    cancel = stopped.cancellation()
    assert cancel.cancelled and cancel.reason == CancelReason.SHUTDOWN


def test_a_waiter_whose_call_ends_gives_up_at_once_and_frees_its_place():
    runs = Admission("max_concurrent_runs", "runs", slots=1, queue=1)
    call = CallContext(None, InFlight())  # no deadline: only the call's end stops the wait
    outcome: list[BaseException] = []

    def queued() -> None:
        try:
            with runs.slot(call=call):
                pass
        except CancelledError as e:
            outcome.append(e)

    with runs.slot():
        waiter = threading.Thread(target=queued)
        waiter.start()
        give_up = time.monotonic() + 60  # a bound on the wait, not a measurement
        while runs.waiting == 0 and waiter.is_alive() and time.monotonic() < give_up:
            time.sleep(0.01)
        assert runs.waiting == 1, "the second caller never waited for the slot"
        call.end()  # the client cancels while the slot is still taken
        waiter.join(60)
        assert not waiter.is_alive(), "the waiter kept waiting after its call ended"
        assert runs.waiting == 0 and runs.active == 1
        assert len(outcome) == 1 and "ended" in str(outcome[0])
        with pytest.raises(CancelledError, match="deadline"), runs.slot(timeout=0.01):
            pass  # the queue place is free again: waited for, not refused
    ended = CallContext(None, InFlight())
    ended.end()
    with runs.slot(), pytest.raises(CancelledError), runs.slot(call=ended):
        pass
    assert runs.active == runs.waiting == 0


def endless_graph():
    """Minutes of work for one Run: it runs until it is cancelled, for any test here."""
    with gg.Graph():
        h = gg.input("x", shape=(1000, 1000))
        eye = gg.constant(np.eye(1000) * 0.5)
        for _ in range(5000):
            h = gg.tanh(h @ eye)
        y = gg.sum(h)
    return y


def enqueue(send: Callable[[], grpc.Future]) -> grpc.Future:
    """Send a Run until it waits in the run queue (a probe that waited may still hold the
    queue place for a moment after its deadline: that refusal comes back at once)."""
    for _ in range(20):
        queued = send()
        try:
            queued.result(timeout=3.0)
        except grpc.FutureTimeoutError:
            return queued  # not answered: it waits for the slot
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
    raise AssertionError("the Run never got the queue place")


@contextmanager
def endless_run(*caps: str) -> Iterator[tuple[gg.RemoteClient, Callable[[], grpc.Future]]]:
    """A server with `caps`, a client, and `send()`: sends a Run of minutes (as a future);
    every one still running is cancelled at the end."""
    y = endless_graph()
    sent: list[grpc.Future] = []
    with (
        running_server(*caps) as server,
        gg.connect(server.address) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        fingerprint = client.register(y.graph.freeze())
        request = service_pb2.RunRequest(fingerprint=fingerprint, outputs=[y.name])
        encode_tensor(np.ones((1000, 1000)), request.feeds["x"])
        stub = service_pb2_grpc.GraphServiceStub(channel)

        def send() -> grpc.Future:
            sent.append(stub.Run.future(request))
            return sent[-1]

        try:
            yield client, send
        finally:
            for call in sent:
                call.cancel()


def test_a_cancelled_queued_run_frees_its_queue_place_at_once():
    with endless_run("--max-concurrent-runs", "1", "--run-queue", "1") as (client, send):
        running = send()
        wait_until_probe(client, "waited")  # the long Run holds the slot
        queued = enqueue(send)
        wait_until_probe(client, "refused")  # ... and this one the only queue place
        assert not queued.done()
        queued.cancel()
        # The place is free again while the long Run still runs: probes wait, not refused.
        wait_until_probe(client, "waited", timeout=60)
        assert not running.done()


def test_runs_beyond_the_cap_and_queue_are_resource_exhausted_and_the_server_recovers():
    """With the one run slot and the one queue place held (by Runs of minutes), every other
    Run is refused naming max_concurrent_runs, and counted under that limit; once those two
    are cancelled, Runs are served again and the queue is empty."""
    caps = ("--max-concurrent-runs", "1", "--run-queue", "1", "--metrics-port", "0")
    with endless_run(*caps) as (client, send):
        metrics_port = client.server_info().metrics_port
        y = small_graph()
        client.register(y.graph.freeze())  # so that the refused calls are Runs
        running = send()
        wait_until_probe(client, "waited")  # the long Run holds the slot
        queued = enqueue(send)  # ... and this one the queue place
        before = scrape(metrics_port)
        refused: list[gg.RemoteError] = []

        def call() -> None:
            with pytest.raises(gg.RemoteError) as e:
                client.run(y, {"x": np.ones(3)}, timeout=DEADLINE)
            refused.append(e.value)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = scrape(metrics_port)
        assert len(refused) == 4
        for e in refused:
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert [s for s, _ in e.violations] == ["max_concurrent_runs"]
            assert "max_concurrent_runs=1" in e.message
        assert delta(before, after, "graphgrad_rejections_total") == {("max_concurrent_runs",): 4}
        assert delta(before, after, "graphgrad_requests_total") == {
            ("RESOURCE_EXHAUSTED", "Run"): 4
        }
        # The server recovers: the queue empties, and Runs are served, right, again.
        queued.cancel()
        running.cancel()
        wait_until_probe(client, "served")
        assert_good_request_served(client)
        wait_for(
            lambda: (
                series(scrape(metrics_port), "graphgrad_queued_calls")
                == {("max_concurrent_runs",): 0, ("max_streams",): 0}
            ),
            "an empty run queue",
        )


def test_register_graph_and_submit_job_share_the_run_bound():
    """Decoding a graph or building a job is heavy work too: with the one run slot taken,
    RegisterGraph and SubmitJob are refused naming max_concurrent_runs, like a Run."""
    with endless_run("--max-concurrent-runs", "1", "--run-queue", "0") as (client, send):
        send()
        wait_until_running(client)
        for heavy in (
            lambda: client.register(small_graph().graph.freeze()),
            lambda: start_long_job(client),
        ):
            with pytest.raises(gg.RemoteError) as e:
                heavy()
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [s for s, _ in e.value.violations] == ["max_concurrent_runs"]
            assert "RegisterGraph/SubmitJob" in e.value.message


def test_sigterm_past_the_grace_period_stops_running_work():
    """The server exits after its grace period even with a long Run in flight: that run's
    work is cancelled, not finished (minutes here) on a thread the exit would wait for."""
    y = endless_graph()
    outcome: list[object] = []
    # One run at a time and no queue: a probe is refused exactly while the long call runs.
    flags = ("--grace", "1", "--max-concurrent-runs", "1", "--run-queue", "0")
    with running_server(*flags) as server, gg.connect(server.address) as client:
        client.register(y.graph.freeze())

        def call() -> None:
            try:
                outcome.append(client.run(y, {"x": np.ones((1000, 1000))}))
            except gg.RemoteError as e:
                outcome.append(e)

        caller = threading.Thread(target=call)
        caller.start()
        wait_until_running(client)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        caller.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], gg.RemoteError)
