"""Bearer-token authentication for graphgrad RPCs; health and reflection stay open."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/graphgrad."


class TokenAuth(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token is empty")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        reason = "missing bearer token" if not given else "invalid bearer token"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{reason}: send metadata 'authorization: Bearer <token>'",
            )

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.stream_stream_rpc_method_handler(deny)
