"""Errors raised by the engine. Each names the thing that is wrong and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

SHOWN_NAMES = 3  # how many offenders a message names before counting the rest
SHOWN_NAME_CHARS = 80


def name_list(names: Iterable[str], shown: int = SHOWN_NAMES) -> str:
    """The first few names, quoted, and a count of the rest: "'a', 'b', 'c' and 2,997 more".

    Every message that lists names goes through here, so no list makes it unbounded.
    """
    names = list(names)
    quoted = [
        repr(n if len(n) <= SHOWN_NAME_CHARS else n[: SHOWN_NAME_CHARS - 3] + "...")
        for n in names[:shown]
    ]
    rest = len(names) - len(quoted)
    return ", ".join(quoted) + (f" and {rest:,} more" if rest else "")


def _rebuild(cls: type[GraphError], args: tuple[object, ...], state: dict[str, Any]) -> GraphError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class GraphError(ValueError):
    """Base class of every error the engine raises about a graph or a request."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments defeat Exception's pickling; errors must cross
        # process boundaries (Ray tasks) intact.
        return (_rebuild, (type(self), self.args, self.__dict__))


class ValidationError(GraphError):
    """A graph is malformed. `node` and `field` say where, so servers can build precise details."""

    def __init__(self, message: str, *, node: str | None = None, field: str | None = None):
        self.node = node
        self.field = field
        where = f"node '{node}': " if node is not None else ""
        super().__init__(where + message)
        self.reason = message


class UnknownOpError(ValidationError):
    """An op name that is not in the registry."""


class FeedError(GraphError):
    """A feed is missing, unknown, or does not match the declared shape or dtype of its input."""

    def __init__(self, message: str, *, input_name: str | None = None):
        self.input_name = input_name
        super().__init__(message)


class RequestError(GraphError):
    """A run request asks for something the graph cannot give (unknown output, missing seed...)."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(message)


class LimitError(GraphError):
    """A request exceeds a configured limit; `limit` names it."""

    def __init__(self, message: str, *, limit: str):
        self.limit = limit
        super().__init__(message)


class ExecutionError(GraphError):
    """An op failed on the values it was given (e.g. the max of an empty axis)."""

    def __init__(self, message: str, *, node: str):
        self.node = node
        super().__init__(f"node '{node}': {message}")


class CancelReason(StrEnum):
    """Why work stopped before it finished: the caller picks its status from this (gRPC:
    DEADLINE_EXCEEDED for DEADLINE, CANCELLED otherwise), never from the message."""

    DEADLINE = "deadline"  # its deadline passed
    CLIENT = "client"  # its caller cancelled it, or the call it served ended
    SHUTDOWN = "shutdown"  # the server is stopping


class CancelledError(GraphError):
    """A run was cancelled or its deadline passed before it finished; `reason` says which."""

    def __init__(self, message: str, reason: CancelReason = CancelReason.CLIENT) -> None:
        self.reason = CancelReason(reason)
        super().__init__(message)

    def __reduce__(self) -> tuple[type[CancelledError], tuple[str, CancelReason]]:
        return type(self), (str(self), self.reason)  # the reason survives Ray's pickling
