"""Bearer-token authentication for graphgrad RPCs; health and reflection stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/graphgrad."


def check_token(token: str, source: str) -> str:
    """The token as read from `source`, refused unless it can work: a blank token would turn
    authentication off (fail open), and one with spaces or control characters can never
    match an `authorization` header."""
    token = token.strip()
    if not token:
        raise ValueError(f"{source} holds no token (expected a non-blank line)")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{source} holds a token with spaces, control or non-ASCII characters "
            "(expected printable ASCII without spaces)"
        )
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {check_token(token, 'the auth token')}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        reason = "missing bearer token" if not given else "invalid bearer token"

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(
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
