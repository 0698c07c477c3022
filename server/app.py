"""Building and running the gRPC server: services, health, reflection, TLS, auth, shutdown.

The server is grpc.aio: every handler is a coroutine; plain servicers run in a thread pool
and never wait on the event loop, while a stream that mostly waits (WatchJob) is an async
generator holding no thread while idle. A Run known to be quick (its prepared run's latest
run took under service.QUICK_SECONDS) is answered on the loop when a run slot is free: the
hop to the pool and back costs more than such a run. Why aio and not a sync grpc.server
(bench/server_kinds.py measures both): a sync server answers one client ~10% sooner on 2
cores but holds a thread per open stream, and under 8 client threads neither is clearly
faster.
Concurrency is bounded: the heavy calls (Run, Explain, RegisterGraph, SubmitJob: they decode,
build or run graphs) by `max_concurrent_runs` with a short queue that a cancelled call leaves
at once, streams by `max_streams`, everything by gRPC's `maximum_concurrent_rpcs`; beyond:
RESOURCE_EXHAUSTED. Each bound is this process's: with `--workers N` every worker has its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as pb_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from graphgrad.engine import JobStatus, LimitError, RequestError
from graphgrad.server import logs, metrics
from graphgrad.server.admission import Admission, SlotNow
from graphgrad.server.auth import TokenAuth
from graphgrad.server.batcher import LOOP, Batchable, Batcher, BatchingConfig
from graphgrad.server.errors import to_status
from graphgrad.server.inflight import Call, CallContext, InFlight
from graphgrad.server.job_manager import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_QUEUED, JobManager
from graphgrad.server.job_service import JobServicer
from graphgrad.server.limits import Limits, one_per_cpu
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import GraphServicer, WorkerView
from graphgrad.v1 import jobs_pb2, service_pb2

log = logging.getLogger("graphgrad.server")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GraphService"]
JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
# The calls that decode, build or run graphs share one bound, max_concurrent_runs: each is
# CPU work proportional to a request that may be as large as max_message_bytes.
RUN_METHODS = ("Run", "Explain", "RegisterGraph", "SubmitJob")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    limits: Limits = field(default_factory=Limits)
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None
    threads: int = 16  # for ordinary calls; runs waiting for a slot get their own
    grace_seconds: float = 10.0  # what in-flight calls get at shutdown
    max_concurrent_runs: int = field(default_factory=one_per_cpu)  # heavy calls at once
    run_queue: int = 32  # heavy calls waiting for a slot; beyond: RESOURCE_EXHAUSTED
    max_streams: int = 1000  # open server streams (WatchJob, GetJobResults)
    max_running_jobs: int = field(default_factory=one_per_cpu)  # the rest queue as pending
    max_queued_jobs: int = DEFAULT_MAX_QUEUED  # pending jobs; beyond: RESOURCE_EXHAUSTED
    job_lease_seconds: float = DEFAULT_LEASE_SECONDS  # a dead worker's jobs resume after this
    metrics_port: int = 0  # where /metrics is served (server/metrics.py); 0: nowhere
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # of Runs; off by default

    # Listen with SO_REUSEPORT: a worker of `--workers N`, sharing the port with the others.
    reuse_port: bool = False

    @property
    def pool_threads(self) -> int:
        """A run waiting for a slot holds a thread, so those come on top of `threads`."""
        return self.threads + self.max_concurrent_runs + self.run_queue

    @property
    def max_concurrent_rpcs(self) -> int:
        """gRPC's outer bound on calls in flight: every stream, and a queue of unary calls."""
        return self.max_streams + 4 * self.pool_threads


@dataclass(frozen=True)
class Guards:
    """The admission controls a handler may need."""

    runs: Admission
    streams: Admission
    inflight: InFlight  # stopping the server cancels what the thread pool runs


def _parse(raw: bytes, request_type: type[pb_message.Message]) -> Any:
    try:
        return request_type.FromString(raw)
    except pb_message.DecodeError as e:
        raise RequestError(
            f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {e}", field=""
        ) from e


# The largest request parsed on the event loop to see whether it is quick (server.service's
# QUICK_SECONDS is the other bound): ~0.1 ms of parsing.
QUICK_REQUEST_BYTES = 1 << 20

_END = object()  # what `next` returns past a stream's last message


def _record(
    method: str,
    status: grpc.Status | None,
    started: float,
    sizes: tuple[int, int],
    messages: tuple[Any, Any],
    error: BaseException | None = None,
    code: str = "",
) -> None:
    """A request's metrics and log line: `status` None is OK (or `code`); `sizes` and
    `messages` are the request's and the response's (None where there is none)."""
    code = code or ("OK" if status is None else status.code.name)
    seconds = time.perf_counter() - started
    metrics.observe_request(method, code, seconds, *sizes)
    if isinstance(error, LimitError):  # the RESOURCE_EXHAUSTED our own limits answer
        metrics.observe_rejection(error.limit)
    details = "" if status is None else status.details
    logs.log_request(method, code, seconds, *sizes, *messages, error=details)


@dataclass(frozen=True)
class Quick:
    """What answers a call on the event loop: whether its request is quick (the servicer's
    guess), and its admission slot taken only if free now."""

    is_quick: Callable[[Any], bool]
    runs: Admission  # its slot is taken with take_now() and given back with give_back()


@dataclass(frozen=True)
class Batched:
    """What gathers a call into a dynamic batch on the event loop (server/batcher.py): the
    servicer's side of it, the batcher, and the admission slot taken only if free now."""

    calls: Batchable
    batcher: Batcher[Any, Any, Any]
    slot_now: Callable[[], SlotNow]


def _handler(
    method: str,
    impl: Callable[[Any, Any], Any],
    request_type: type[pb_message.Message],
    response_type: type[pb_message.Message],
    streaming: bool,
    guard: Callable[[Any], AbstractContextManager[None]],
    inflight: InFlight,
    pool: futures.Executor,
    quick: Quick | None = None,
    batched: Batched | None = None,
) -> grpc.RpcMethodHandler:
    """A coroutine handler that parses the request itself, so malformed bytes get
    INVALID_ARGUMENT, holds `guard(call)` while it works, and turns every failure into a
    status: the server keeps serving. A plain servicer runs in `pool` with a CallContext and
    never waits on the event loop; an async generator servicer runs on the loop. Responses
    are serialized here (a unary one in `pool`) unless the servicer answers with their bytes
    (`response_type`'s), and every request is recorded (_record).
    A unary request that `quick` says is quick, with a run slot free at once, is answered on
    the loop: for a small run the hop to the pool and back is most of the time it takes.
    A unary request that may join a dynamic batch (`batched`) waits for it on the loop."""
    is_async = inspect.isasyncgenfunction(impl)

    def answered(
        raw: bytes,
        call: Call,
        started: float,
        request: Any,
        respond: Callable[[Any, Call], Any],
        hold: Callable[[Any], AbstractContextManager[None]] | None = None,
    ) -> bytes | grpc.Status:
        """`respond(request, call)`'s response serialized, or its error as a status; recorded
        either way. Under `hold(call)` (a run may wait there for a slot, in its thread; None:
        the slot is held already), `request` None is parsed first."""
        try:
            if hold is None:  # on the loop, on every quick call's path: no context manager
                response = respond(request, call)
            else:
                with hold(call):
                    request = _parse(raw, request_type) if request is None else request
                    response = respond(request, call)
            if response.__class__ is bytes:  # answered serialized (Run): parsed only to log
                out: bytes = response
                response = lambda: response_type.FromString(out)  # noqa: E731
            else:
                out = response.SerializeToString()
        except Exception as e:
            status = to_status(e, call)
            _record(method, status, started, (len(raw), 0), (request, None), e)
            return status
        _record(method, None, started, (len(raw), len(out)), (request, response))
        return out

    async def in_batch(raw: bytes, context: Any, started: float) -> bytes | grpc.Status | None:
        """The answer from a dynamic batch, gathered here on the loop, when the request may
        join one and a run slot is free now (held until its batch has run); None: take the
        ordinary way (which also reports what is wrong with a request). A request that would
        run alone at once, quickly (most, under load), runs here without a Member, a future
        or a CallContext."""
        assert batched is not None
        if len(raw) > QUICK_REQUEST_BYTES:  # parsing it alone would hold the loop too long
            return None
        calls, batcher = batched.calls, batched.batcher
        slot = batched.slot_now()
        candidate = None
        try:
            request = request_type.FromString(raw)
            if slot.take():
                candidate = calls.candidate(request)
        except Exception:  # malformed or failing a check: the ordinary way reports it
            candidate = None
        if candidate is None:
            slot.release()
            return None
        key = candidate.key
        try:  # the slot goes back if anything fails before a run or a batch holds it
            route = batcher.route(key)
            if route == LOOP:
                here = inflight.on_loop(context)
            else:
                call = inflight.start(context)
                member = calls.member(
                    candidate, call, lambda respond: answered(raw, call, started, request, respond)
                )
        except BaseException:
            slot.release()
            raise
        if route == LOOP:
            try:
                return batcher.run_here(
                    key,
                    lambda: calls.alone(candidate, here.cancellation()),
                    lambda outcome: answered(
                        raw, here, started, request, lambda *_: calls.respond(candidate, outcome)
                    ),
                )
            finally:
                slot.release()
        member.release = slot.release
        try:
            out: bytes | grpc.Status = await batcher.run(key, member, pool, route)
        except asyncio.CancelledError:
            if member.left:  # it never ran: nothing else records it
                _record(method, None, started, (len(raw), 0), (request, None), code="CANCELLED")
            raise
        return out

    def work(raw: bytes, call: CallContext, started: float) -> bytes | grpc.Status:
        return answered(raw, call, started, None, impl, guard)

    def on_loop(raw: bytes, context: Any, started: float) -> bytes | grpc.Status | None:
        """The answer, worked out here on the loop when the request is quick and a run slot
        is free now; None: take the pool (which also reports malformed bytes)."""
        assert quick is not None
        if len(raw) > QUICK_REQUEST_BYTES:  # parsing it alone would hold the loop too long
            return None
        try:
            request = request_type.FromString(raw)
            if not quick.is_quick(request):
                return None
        except Exception:  # malformed: the pool's way reports it
            return None
        if not quick.runs.take_now():
            return None
        try:
            return answered(raw, inflight.on_loop(context), started, request, impl)
        finally:
            quick.runs.give_back()

    async def unary(raw: bytes, context: Any) -> Any:
        started = time.perf_counter()
        try:
            out = None if batched is None else await in_batch(raw, context, started)
            if out is None and quick is not None:
                out = on_loop(raw, context, started)
            if out is None:
                loop = asyncio.get_running_loop()
                call = inflight.start(context)
                out = await loop.run_in_executor(pool, work, raw, call, started)
        except Exception as e:  # no thread to be had: the server is stopping
            out = to_status(e, context)
        if isinstance(out, grpc.Status):
            await context.abort(out.code, out.details, out.trailing_metadata)
        return out

    async def pulled(messages: Iterator[Any]) -> AsyncIterator[Any]:
        """A plain servicer's stream, each message taken in `pool`."""
        loop = asyncio.get_running_loop()
        while (message := await loop.run_in_executor(pool, next, messages, _END)) is not _END:
            yield message

    async def stream(raw: bytes, context: Any) -> AsyncIterator[bytes]:
        started, sent, request = time.perf_counter(), 0, None
        status, error, done = None, None, False
        try:
            call = context if is_async else inflight.start(context)
            with guard(call):  # a stream slot is taken or refused at once, never waited for
                request = _parse(raw, request_type)
                messages = impl(request, call)
                async for message in messages if is_async else pulled(iter(messages)):
                    out = message.SerializeToString()
                    sent += len(out)
                    yield out
            done = True
        except Exception as e:
            status, error = to_status(e, context), e
        finally:  # a client that goes away mid-stream ends it here: CANCELLED
            gone = "" if done or status is not None else "CANCELLED"
            _record(method, status, started, (len(raw), sent), (request, None), error, gone)
        if status is not None:
            await context.abort(status.code, status.details, status.trailing_metadata)

    if streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def service_handler(
    service: Any, module: Any, servicer: object, guards: Guards, pool: futures.Executor
) -> grpc.GenericRpcHandler:
    def guard(m: Any) -> Callable[[Any], AbstractContextManager[None]]:
        if m.server_streaming:
            return lambda context: guards.streams.slot()
        if m.name in RUN_METHODS:
            return lambda call: guards.runs.slot(call.time_remaining(), call)
        return lambda context: nullcontext()

    def quick(m: Any) -> Quick | None:
        is_quick = getattr(servicer, "quick", {}).get(m.name)
        if is_quick is None or m.server_streaming or m.name not in RUN_METHODS:
            return None
        return Quick(is_quick, guards.runs)

    def batched(m: Any) -> Batched | None:
        calls = getattr(servicer, "batched", {}).get(m.name)
        if calls is None or m.server_streaming or m.name not in RUN_METHODS:
            return None
        return Batched(calls, servicer.batcher, guards.runs.slot_now)  # type: ignore[attr-defined]

    methods = {
        m.name: _handler(
            m.name,
            getattr(servicer, m.name),
            getattr(module, m.input_type.name),
            getattr(module, m.output_type.name),
            m.server_streaming,
            guard(m),
            guards.inflight,
            pool,
            quick(m),
            batched(m),
        )
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, methods)


class Server:
    """A graphgrad server; `serve()` runs it on the current event loop until SIGTERM/SIGINT.
    `port` is the bound port (useful with port 0), known once `start()` has returned."""

    def __init__(
        self,
        config: ServerConfig,
        runtime: Runtime,
        jobs: JobManager | None = None,
        worker: WorkerView | None = None,
    ) -> None:
        """`worker`: this process among the server's workers (default: the only one)."""
        self.config, self.runtime, self.jobs = config, runtime, jobs
        if jobs is not None:  # the servicer's Session sends its jobs there
            runtime.session.attach_jobs(jobs)
        self.worker = worker or WorkerView()
        self.guards = Guards(
            runs=Admission(
                "max_concurrent_runs",
                f"calls of {'/'.join(RUN_METHODS)}",
                config.max_concurrent_runs,
                config.run_queue,
            ),
            streams=Admission("max_streams", "streams", config.max_streams),
            inflight=InFlight(),
        )
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def limits(self) -> dict[str, int]:
        """Every limit a RESOURCE_EXHAUSTED can name, by that name (GetServerInfo.limits)."""
        runs, streams = self.guards.runs, self.guards.streams
        out = {
            **self.runtime.limits.as_dict(),  # the ones the runtime enforces
            runs.limit: runs.slots,
            "run_queue": runs.queue,
            streams.limit: streams.slots,
            "graph_cache_bytes": self.runtime.caches()["graphs"].max_bytes,
        }
        if self.jobs is not None:
            out["max_running_jobs"] = self.jobs.max_running
            out["max_queued_jobs"] = self.jobs.max_queued
            out["max_blob_bytes"] = self.jobs.store.max_blob_bytes
        return out

    def _build(self) -> grpc.aio.Server:
        """Needs the running event loop: grpc.aio binds the server to it."""
        config = self.config
        mb = config.limits.max_message_bytes
        interceptors = [TokenAuth(config.token)] if config.token else []
        self.pool = futures.ThreadPoolExecutor(
            max_workers=config.pool_threads, thread_name_prefix="rpc"
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_send_message_length", mb),
                ("grpc.max_receive_message_length", mb),
                ("grpc.so_reuseport", int(config.reuse_port)),
            ],
        )
        handlers = [
            service_handler(
                SERVICE,
                service_pb2,
                GraphServicer(
                    self.runtime,
                    self.limits(),
                    self.config.metrics_port,
                    self.worker,
                    self.config.batching,
                ),
                self.guards,
                self.pool,
            )
        ]
        if self.jobs is not None:
            handlers.append(
                service_handler(
                    JOB_SERVICE, jobs_pb2, JobServicer(self.runtime.session), self.guards, self.pool
                )
            )
        server.add_generic_rpc_handlers(handlers)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in the stubs
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE.full_name,
                JOB_SERVICE.full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert and config.tls_key:
                creds = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from e
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        return server

    def sample(self) -> None:
        """The gauges that are this server's state (metrics.Sampler calls it)."""
        metrics.set_caches(self.runtime.caches())
        for admission in (self.guards.runs, self.guards.streams):
            metrics.set_admission(admission.limit, admission.active, admission.waiting)
        if self.jobs is not None:
            metrics.set_jobs(self.jobs.store.count_by_status(), [str(s) for s in JobStatus])

    async def start(self) -> None:
        self.grpc = self._build()
        await self.grpc.start()
        self.sampler = metrics.Sampler(self.sample)
        for name in ("", SERVICE.full_name, JOB_SERVICE.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.grace_seconds if grace is None else grace)
        self.sampler.stop()
        self.guards.inflight.close()  # past the grace period no work goes on
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def serve(self, on_serving: Callable[[str], None] = lambda address: None) -> None:
        """Start, call `on_serving(address)` (in a thread: it may block), serve until SIGTERM
        or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        await asyncio.to_thread(on_serving, self.address)
        await stopping.wait()
        log.info(
            "shutting down: finishing in-flight calls (grace %.0fs)", self.config.grace_seconds
        )
        await self.stop()
