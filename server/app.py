"""Building and running the gRPC server: services, health, reflection, TLS, auth, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message as pb_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from graphgrad.v1 import service_pb2

from .auth import TokenAuth
from .errors import to_status
from .limits import Limits
from .runtime import Runtime
from .service import GraphServicer

log = logging.getLogger("graphgrad.server")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GraphService"]


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


def _unary(
    impl: Callable[[Any, grpc.ServicerContext], Any], request_type: type[pb_message.Message]
) -> grpc.RpcMethodHandler:
    """A handler that parses the request itself, so malformed bytes get INVALID_ARGUMENT."""

    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = request_type.FromString(raw)
        except pb_message.DecodeError as e:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {e}",
            )
        try:
            return impl(request, context)
        except Exception as e:  # every failure becomes a status; the server keeps serving
            context.abort_with_status(to_status(e, context))

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
    )


def graph_service_handler(servicer: GraphServicer) -> grpc.GenericRpcHandler:
    methods = {
        m.name: _unary(getattr(servicer, m.name), getattr(service_pb2, m.input_type.name))
        for m in SERVICE.methods
    }
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


class Server:
    """A running graphgrad server. `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        config: ServerConfig,
        runtime: Runtime,
        ray_info: Callable[[], tuple[str, dict[str, float]]] | None = None,
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
        self.grpc.add_generic_rpc_handlers((graph_service_handler(GraphServicer(runtime)),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
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
        for name in ("", SERVICE.full_name):
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
