"""The GraphService servicer: proto in -> domain -> runtime -> proto out, a few lines per RPC."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import NamedTuple

import numpy as np

from graphgrad import wire
from graphgrad.engine import (
    Cancellation,
    Graph,
    LocalExecutor,
    RequestError,
    RunRequest,
    RunResult,
    calibration,
)
from graphgrad.engine.prepared import PreparedRun
from graphgrad.engine.stacking import StackKey, stack_key, stack_size
from graphgrad.server import metrics
from graphgrad.server.batcher import Batchable, Batcher, BatchingConfig, Member
from graphgrad.server.inflight import Call, CallContext
from graphgrad.server.logs import worker_id
from graphgrad.server.runtime import Pending, Runtime
from graphgrad.v1 import graph_pb2, service_pb2

# A Run whose latest call took less CPU (decoding, running, encoding) is answered on the event
# loop: it holds the loop that long.
QUICK_SECONDS = 0.5e-3
# A dynamic batch whose latest run at its size took less CPU runs on the loop too: under load
# its hop to the thread pool and back (the GIL handed between the two threads) cost more than
# the loop's wait (bench/throughput.py, small network, 64 in flight, 1 worker: 0.75 -> 0.86 x
# echo, server CPU per request 394 -> 321 us); a few milliseconds, like a collector's pause.
BATCH_QUICK_SECONDS = 5e-3

_UNKNOWN = object()  # a stack key not worked out yet

# Read once: importlib.metadata parses the installed package's METADATA file on every call
# (~0.4 ms), and every client connection asks GetServerInfo.
VERSION = metadata.version("graphgrad")

# What a Run request names besides its feeds and seed values: (fingerprint, outputs, wrt,
# seeded outputs, executor, check_numerics, exact).
HeadKey = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], int, bool, bool]


def head_key(request: service_pb2.RunRequest) -> HeadKey:
    o = request.options
    return (
        request.fingerprint,
        tuple(request.outputs[:]),  # a slice first: tuple() of a repeated field is ~3x slower
        tuple(request.wrt[:]),
        tuple(request.grad_outputs),
        o.executor,
        o.check_numerics,
        o.exact,
    )


def cancellation(context: Call) -> Cancellation:
    """Stops the work when the client's deadline passes or the call is cancelled."""
    return context.cancellation()


def register_wire(runtime: Runtime, graph: graph_pb2.Graph) -> Graph:
    """Validate and keep a graph from the wire; the node count is checked before decoding."""
    limits = runtime.limits
    return runtime.register(
        wire.decode_graph(graph, limits.max_tensor_bytes, limits.check_node_count)
    )


def register_onnx(
    runtime: Runtime, data: bytes, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]
) -> Graph:
    """Validate and keep an ONNX model from the wire (graphgrad.onnx converts it): the node
    count and every stored tensor's size are checked before any tensor is converted."""
    from graphgrad import onnx as onnx_models  # the wire layer; needs the `onnx` package

    limits = runtime.limits
    model = onnx_models.parse_model(data)
    imported = onnx_models.from_onnx(
        model, dims, shapes, max_nodes=limits.max_nodes, max_tensor_bytes=limits.max_tensor_bytes
    )
    limits.check_node_count(len(imported.graph))
    return runtime.register(imported.graph.nodes)


def padded(runtime: Runtime, members: Sequence[Pending], most: int) -> int:
    """The rows members are stacked at: padded to a few sizes where one row's peak memory
    (a member's, as its run slot admitted it) keeps the padding small."""
    m = members[0]
    row = runtime.prepare(m.graph, m.request, m.options).admitted_bytes  # a cache lookup
    return stack_size(len(members), most, row)


# Entries of a servicer's table of request heads; past it the table forgets them all (each is
# found again by its next request: a plan cache lookup).
MOST_HEADS = 4096
# A head's graph is marked used in the graph cache (kept by its LRU) by one request in this
# many; the others look without the cache's lock.
TOUCH_EVERY = 64


class Head:
    """What the requests of one head found: their prepared run (weak: an entry serves only
    while the plan cache keeps its run), its stack key once worked out, and how many came."""

    __slots__ = ("prepared", "stack_key", "uses")

    def __init__(self, prepared: PreparedRun) -> None:
        self.prepared = weakref.ref(prepared)
        self.stack_key: object = _UNKNOWN  # a StackKey, or None: its runs are never stacked
        self.uses = 0


class Candidate(NamedTuple):
    """A Run that may join a batch: checked, its feeds views on the request's bytes."""

    key: StackKey
    prepared: PreparedRun
    feeds: dict[str, np.ndarray]
    seeds: Mapping[str, np.ndarray] | None


@dataclass(frozen=True)
class WorkerView:
    """The process that answers ("HOST:PID") and how many live ones serve the port."""

    name: str = field(default_factory=worker_id)
    live: Callable[[], int] = lambda: 1


class GraphServicer:
    def __init__(
        self,
        runtime: Runtime,
        limits: Mapping[str, int] | None = None,
        metrics_port: int = 0,
        worker: WorkerView | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        """`limits`: every limit of the server by name, for GetServerInfo (default: the
        runtime's request limits); `metrics_port`: where /metrics is served (0: nowhere);
        `worker`: this process among the server's workers; `batching`: dynamic batching of
        Runs (None or a window of 0: off)."""
        self.runtime, self.metrics_port = runtime, metrics_port
        self.quick = {"Run": self.run_is_quick}  # calls that may be answered on the event loop
        self.limits = dict(limits if limits is not None else runtime.limits.as_dict())
        # What requests found by the head that named them (by fingerprint): a request like
        # an earlier one skips decoding its names and options and the plan cache's lookup.
        self._heads: dict[HeadKey, Head] = {}
        # The request the event loop last found quick, and its prepared run (Run's next).
        self._checked: tuple[service_pb2.RunRequest, PreparedRun] | None = None
        self.worker = worker or WorkerView()
        self.batcher: Batcher[StackKey, Pending, RunResult] | None = None
        self.batched: dict[str, Batchable] = {}
        if batching is not None and batching.window_us > 0:
            most = batching.max_batch  # stacks padded to a few sizes, each compiled once
            stack = lambda key, ms: runtime.run_stack(key, ms, padded(runtime, ms, most))  # noqa: E731
            self.batcher = Batcher(
                batching,
                stack,
                metrics.observe_batch,
                QUICK_SECONDS,
                batch_quick_seconds=BATCH_QUICK_SECONDS,
            )
            # calls that may join a batch on the loop
            self.batched = {
                "Run": Batchable(self.run_candidate, self.run_alone, self.respond, self.member)
            }

    def _graph(self, request: service_pb2.RunRequest | service_pb2.ExplainRequest) -> Graph:
        which = request.WhichOneof("graph_ref")
        if which == "graph":
            return register_wire(self.runtime, request.graph)
        if which == "fingerprint":
            return self.runtime.graph(request.fingerprint)
        if which == "onnx_model" and isinstance(request, service_pb2.RunRequest):
            shapes = {k: tuple(v.shape) for k, v in request.feeds.items()}
            return register_onnx(self.runtime, request.onnx_model, request.onnx_dims, shapes)
        raise RequestError(
            "the request names no graph: set `graph` or `fingerprint`", field="graph_ref"
        )

    def RegisterGraph(
        self, request: service_pb2.RegisterGraphRequest, context: CallContext
    ) -> service_pb2.RegisterGraphResponse:
        if request.onnx_model:
            if request.HasField("graph"):
                raise RequestError("set `graph` or `onnx_model`, not both", field="onnx_model")
            graph = register_onnx(self.runtime, request.onnx_model, request.onnx_dims, {})
        else:
            graph = register_wire(self.runtime, request.graph)
        return service_pb2.RegisterGraphResponse(
            fingerprint=graph.fingerprint, num_nodes=len(graph)
        )

    def run_is_quick(self, request: service_pb2.RunRequest) -> bool:
        """Whether this Run may be answered on the event loop instead of in the thread pool
        (the hop there and back costs more than a small run: ~0.15 ms on 2 cores): its graph
        is registered, its prepared run is held, and its latest run took under QUICK_SECONDS.
        A look at caches only: nothing is planned, registered or decoded here. (With batching
        on, a Run that may join a batch is gathered on the loop before this is asked.)"""
        prepared = self._prepared_before(request)
        seconds = None if prepared is None else prepared.last_seconds
        if prepared is None or seconds is None or seconds >= QUICK_SECONDS:
            return False
        self._checked = (request, prepared)  # Run, called next on the loop, takes it here
        return True

    def _prepared_before(self, request: service_pb2.RunRequest) -> PreparedRun | None:
        """The prepared run of an earlier request with the same head, if its graph is still
        registered (the same graph: one evicted and registered again is planned anew)."""
        if request.WhichOneof("graph_ref") != "fingerprint":
            return None
        checked = self._checked
        if checked is not None and checked[0] is request:  # run_is_quick just looked it up
            self._checked = None
            return checked[1]
        found = self._found(request)
        return None if found is None else found[0]

    def _found(self, request: service_pb2.RunRequest) -> tuple[PreparedRun, Head] | None:
        """_prepared_before's lookup, with its head (a request naming its graph by
        fingerprint). Every TOUCH_EVERY-th request of a head marks its graph used in the graph
        cache (its LRU order); the others only look, without the cache's lock."""
        head = self._heads.get(head_key(request))
        prepared = None if head is None else head.prepared()
        if prepared is None:
            return None
        head.uses = uses = head.uses + 1  # type: ignore[union-attr]
        cache = self.runtime.cache
        fingerprint = request.fingerprint
        graph = cache.get(fingerprint) if uses % TOUCH_EVERY == 0 else cache.peek(fingerprint)
        if graph is not prepared.graph:
            return None
        return prepared, head  # type: ignore[return-value]

    def _remember(self, request: service_pb2.RunRequest, prepared: PreparedRun) -> Head:
        """Keep what a request named by fingerprint found, for the next of its head."""
        if len(self._heads) >= MOST_HEADS:
            self._heads.clear()
        head = self._heads[head_key(request)] = Head(prepared)
        return head

    def _prepared(self, request: service_pb2.RunRequest) -> tuple[PreparedRun, RunRequest]:
        """The request's prepared run (admitted: its peak memory is within the limit) and the
        request without its feeds: a lookup by head when an earlier request had the same."""
        limit = self.runtime.limits.max_tensor_bytes
        prepared = self._prepared_before(request)
        if prepared is None:
            graph = self._graph(request)
            run, options = wire.decode_run_request(request, limit, with_feeds=False)
            prepared = self.runtime.prepare(graph, run, options)  # admitted here
            if request.WhichOneof("graph_ref") == "fingerprint":
                self._remember(request, prepared)
            return prepared, run
        # its names, options and peak memory were checked when it was prepared
        sent = request.grad_outputs
        seeds = wire.decode_tensors(sent, "grad_outputs", limit) if sent else None
        return prepared, RunRequest(prepared.outputs, {}, prepared.wrt, seeds)

    def run_candidate(self, request: service_pb2.RunRequest) -> Candidate | None:
        """This Run as a candidate for a batch, worked out on the event loop (cache lookups,
        the feeds decoded as views against the prepared signature), or None: it runs alone
        the ordinary way, which also reports whatever is wrong with it (an unknown graph, a
        bad feed: nothing that fails a check ever joins a batch)."""
        if request.options.exact:
            return None  # exact runs alone
        if request.WhichOneof("graph_ref") != "fingerprint":  # registering is no loop work
            return None
        limit = self.runtime.limits.max_tensor_bytes
        found = self._found(request)  # the usual case: one lookup by head
        seeds: Mapping[str, np.ndarray] | None
        head: Head | None
        if found is not None:
            prepared, head = found
            sent = request.grad_outputs  # names, options and peak memory were checked before
            seeds = wire.decode_tensors(sent, "grad_outputs", limit) if sent else None
        elif self.runtime.cache.get(request.fingerprint) is None:
            return None
        else:  # the first request of its head
            prepared, first = self._prepared(request)
            seeds = first.grad_outputs
            head = self._heads.get(head_key(request))  # remembered just now
        feeds = wire.decode_exact(request.feeds, prepared.feeds, limit)
        if feeds is None:  # not exactly its signature: alone, the checks name what is wrong
            return None
        key = self._stack_key(head, prepared, feeds, seeds)
        return None if key is None else Candidate(key, prepared, feeds, seeds)

    def run_alone(self, candidate: Candidate, cancel: Cancellation) -> RunResult:
        """A candidate's run by itself (server/batcher.py: Member.alone)."""
        c = candidate
        return self.runtime.session.run_prepared(c.prepared, c.feeds, c.seeds, cancel)

    def respond(self, candidate: Candidate, outcome: RunResult | BaseException) -> bytes:
        """A candidate's answer: its response's bytes, or its error raised."""
        if isinstance(outcome, BaseException):
            raise outcome
        return self._response(outcome, candidate.prepared.graph)

    def member(
        self,
        candidate: Candidate,
        context: CallContext,
        finish: Callable[[Callable[..., bytes]], object],
    ) -> Member[Pending, RunResult]:
        """A candidate as a member of a batch. `finish(respond)` turns the member's response
        (or the error `respond(request, call)` raises) into its caller's answer."""
        c, cancel = candidate, cancellation(context)
        run = RunRequest(c.prepared.outputs, c.feeds, c.prepared.wrt, c.seeds)
        pending = Pending(c.prepared.graph, run, c.prepared.options, cancel)
        return Member(
            pending,
            lambda: self.run_alone(c, cancel),
            lambda outcome: finish(lambda *_: self.respond(c, outcome)),
            deadline=cancel.deadline,
        )

    def _stack_key(
        self,
        head: Head | None,
        prepared: PreparedRun,
        feeds: Mapping[str, np.ndarray],
        seeds: Mapping[str, np.ndarray] | None,
    ) -> StackKey | None:
        """stack_key of a run whose feeds match its prepared run's signature exactly: with no
        seeds it depends on the prepared run alone, so it is worked out once per head (kept
        there with its prepared run; seeds are checked per request)."""
        kept = not seeds and head is not None and head.prepared() is prepared
        key = head.stack_key if kept else _UNKNOWN  # type: ignore[union-attr]
        if key is _UNKNOWN:
            run = RunRequest(prepared.outputs, feeds, prepared.wrt, seeds)
            key = stack_key(prepared.graph, run, prepared.options)
            if kept:
                head.stack_key = key  # type: ignore[union-attr]
        return key  # type: ignore[return-value]

    def _response(self, result: RunResult, graph: Graph) -> bytes:
        """The RunResponse, serialized: written as bytes directly (no message to build)."""
        return wire.encode_result_bytes(result, graph.fingerprint, self.worker.name)

    def Run(self, request: service_pb2.RunRequest, context: Call) -> bytes:
        """The lean path: the prepared run of (graph, outputs, wrt, seeded outputs, options)
        is a cache lookup; the feeds are decoded as views against its signature and run; the
        answer is the RunResponse's bytes. (A Run that may join a batch does not come here:
        run_candidate, on the event loop.)"""
        # CPU time, not wall: in the pool, waits for the GIL would make a quick run look slow
        # and keep it off the loop (the batcher measures its batches the same way)
        started = time.thread_time()
        limit = self.runtime.limits.max_tensor_bytes
        prepared, run = self._prepared(request)
        feeds = wire.decode_as(request.feeds, prepared.feeds, "feeds", limit)
        cancel = cancellation(context)
        result = self.runtime.session.run_prepared(prepared, feeds, run.grad_outputs, cancel)
        out = self._response(result, prepared.graph)
        cpu = time.thread_time() - started  # what answering it on the loop would take
        # A run elsewhere (Ray) waits with little CPU: by its wall time it stays off the loop.
        local = result.stats.executor == LocalExecutor.name
        prepared.ran(cpu if local else max(cpu, result.stats.wall_time))
        return out

    def Explain(
        self, request: service_pb2.ExplainRequest, context: CallContext
    ) -> service_pb2.ExplainResponse:
        graph = self._graph(request)
        run, executor, cluster = wire.decode_explain_request(request)
        cancel = cancellation(context)
        out = wire.encode_explanation(self.runtime.explain(graph, run, executor, cancel))
        if cluster is not None:
            prediction = self.runtime.session.predict(graph, run, cluster, cancel)
            wire.encode_prediction(prediction, out.prediction)
        return out

    def ListOps(
        self, request: service_pb2.ListOpsRequest, context: CallContext
    ) -> service_pb2.ListOpsResponse:
        return wire.encode_ops(self.runtime.session.ops())

    def GetServerInfo(
        self, request: service_pb2.GetServerInfoRequest, context: CallContext
    ) -> service_pb2.GetServerInfoResponse:
        out = service_pb2.GetServerInfoResponse(
            version=VERSION,
            opset_version=wire.OPSET_VERSION,
            worker=self.worker.name,
            workers=self.worker.live(),
        )
        out.limits.update(self.limits)
        out.metrics_port = self.metrics_port
        cal = calibration.in_force()
        out.calibration = cal.source
        out.calibration_figures.update(calibration.figures(cal))
        for name, stats in self.runtime.caches().items():
            info = out.caches[name]
            info.entries, info.bytes = stats.entries, stats.bytes
            info.max_entries, info.max_bytes = stats.max_entries, stats.max_bytes
        if self.batcher is not None:
            out.batching.window_us = self.batcher.config.window_us
            out.batching.max_batch = self.batcher.config.max_batch
        ray = self.runtime.session.ray_info()
        if ray is not None:
            address, resources = ray
            out.ray_address = address
            out.ray_resources.update(resources)
        return out
