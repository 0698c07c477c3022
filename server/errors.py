"""Engine exceptions -> gRPC status codes with google.rpc details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from graphgrad.engine import (
    CancelledError,
    ExecutionError,
    FeedError,
    GraphError,
    LimitError,
    RequestError,
    ValidationError,
)

from .codec import FieldError

log = logging.getLogger("graphgrad.server")


class NotFoundError(LookupError):
    """Something the server does not hold: NotFoundError(name, kind="graph" | "job")."""

    def __init__(self, name: str, kind: str = "graph") -> None:
        super().__init__(name, kind)
        self.name, self.kind = name, kind


def _status(code: int, message: str, detail: Message | None = None) -> grpc.Status:
    st = status_pb2.Status(code=code, message=message)
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        st.details.append(packed)
    return rpc_status.to_status(st)


def _bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        ]
    )


def to_status(e: BaseException, context: grpc.ServicerContext | None = None) -> grpc.Status:
    """The status a client gets for an exception raised while serving."""
    msg = str(e)
    if isinstance(e, ValidationError):
        field = f"graph.nodes['{e.node}'].{e.field}" if e.node is not None else f"graph.{e.field}"
        return _status(code_pb2.INVALID_ARGUMENT, msg, _bad_request(field, e.reason))
    if isinstance(e, FeedError):
        return _status(
            code_pb2.INVALID_ARGUMENT, msg, _bad_request(f"feeds['{e.input_name}']", msg)
        )
    if isinstance(e, RequestError | FieldError):
        return _status(code_pb2.INVALID_ARGUMENT, msg, _bad_request(e.field or "", msg))
    if isinstance(e, ExecutionError):
        return _status(
            code_pb2.INVALID_ARGUMENT, msg, _bad_request(f"graph.nodes['{e.node}']", msg)
        )
    if isinstance(e, LimitError):
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=e.limit, description=msg)]
        )
        return _status(code_pb2.RESOURCE_EXHAUSTED, msg, quota)
    if isinstance(e, NotFoundError):
        info = error_details_pb2.ResourceInfo(
            resource_type=e.kind, resource_name=e.name, description=f"unknown {e.kind}"
        )
        what = (
            f"no graph with fingerprint {e.name}; register it"
            if e.kind == "graph"
            else f"no {e.kind} '{e.name}'"
        )
        return _status(code_pb2.NOT_FOUND, what, info)
    if isinstance(e, CancelledError):
        expired = (
            context is not None
            and context.time_remaining() is not None
            and context.time_remaining() <= 0
        )
        return _status(
            code_pb2.DEADLINE_EXCEEDED if expired or "deadline" in msg else code_pb2.CANCELLED, msg
        )
    if isinstance(e, GraphError):
        return _status(code_pb2.INVALID_ARGUMENT, msg)
    log.exception("internal error while serving a request")
    return _status(code_pb2.INTERNAL, f"internal error: {type(e).__name__}: {e}")
