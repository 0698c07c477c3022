"""Building and running the gRPC server: services, health, reflection, TLS, auth, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as pb_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from graphgrad.v1 import jobs_pb2, service_pb2

from .auth import TokenAuth
from .errors import to_status
from .job_service import JobServicer
from .jobs import JobManager
from .limits import Limits
from .runtime import Runtime
from .service import GraphServicer

log = logging.getLogger("graphgrad.server")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GraphService"]
JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    limits: Limits = field(default_factory=Limits)
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None
    workers: int = 16
    grace_seconds: float = 10.0


def _handler(
    impl: Callable[[Any, grpc.ServicerContext], Any],
    request_type: type[pb_message.Message],
    streaming: bool,
) -> grpc.RpcMethodHandler:
    """A handler that parses the request itself, so malformed bytes get INVALID_ARGUMENT, and
    turns every failure into a status: the server keeps serving."""

    def parse(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return request_type.FromString(raw)
        except pb_message.DecodeError as e:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {e}",
            )

    def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        request = parse(raw, context)
        try:
            return impl(request, context)
        except Exception as e:
            context.abort_with_status(to_status(e, context))

    def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        request = parse(raw, context)
        try:
            yield from impl(request, context)
        except Exception as e:
            context.abort_with_status(to_status(e, context))

    serialize = lambda m: m.SerializeToString()  # noqa: E731
    if streaming:
        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)


def service_handler(service: Any, module: Any, servicer: object) -> grpc.GenericRpcHandler:
    methods = {
        m.name: _handler(
            getattr(servicer, m.name), getattr(module, m.input_type.name), m.server_streaming
        )
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, methods)


class Server:
    """A running graphgrad server. `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        config: ServerConfig,
        runtime: Runtime,
        jobs: JobManager | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        mb = config.limits.max_message_bytes
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = (
            [TokenAuth(config.token)] if config.token else []
        )
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", mb),
                ("grpc.max_receive_message_length", mb),
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = [service_handler(SERVICE, service_pb2, GraphServicer(runtime))]
        if jobs is not None:
            handlers.append(service_handler(JOB_SERVICE, jobs_pb2, JobServicer(jobs)))
        self.grpc.add_generic_rpc_handlers(handlers)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (
                SERVICE.full_name,
                JOB_SERVICE.full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
        )
        address = f"{config.host}:{config.port}"
        if config.tls_cert and config.tls_key:
            creds = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> None:
        self.grpc.start()
        for name in ("", SERVICE.full_name, JOB_SERVICE.full_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then let in-flight calls finish within the grace period."""
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.config.grace_seconds if grace is None else grace).wait()

    def install_signal_handlers(self) -> threading.Event:
        """SIGTERM/SIGINT set the returned event; `wait_and_stop` then shuts down gracefully."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        return stop

    def wait_and_stop(self, stop: threading.Event) -> None:
        stop.wait()
        log.info(
            "shutting down: finishing in-flight calls (grace %.0fs)", self.config.grace_seconds
        )
        self.stop()
