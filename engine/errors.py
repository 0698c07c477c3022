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


class NotFoundError(LookupError):
    """Something not held (here or in the job store): NotFoundError(name, kind="graph" |
    "job")."""

    def __init__(self, name: str, kind: str = "graph") -> None:
        super().__init__(name, kind)
        self.name, self.kind = name, kind

    def __str__(self) -> str:
        return f"no {self.kind} '{self.name}'"


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


ERROR_DOMAIN = "graphgrad"  # google.rpc.ErrorInfo's domain for the kinds below

# The errors that cross process and wire boundaries by name (a status's ErrorInfo.reason), so
# a remote call raises the class the in-process one raises. Subclasses not listed travel as
# their nearest listed base.
ERROR_KINDS: dict[str, type[GraphError]] = {
    cls.__name__: cls
    for cls in (
        GraphError,
        ValidationError,
        UnknownOpError,
        FeedError,
        RequestError,
        LimitError,
        ExecutionError,
        CancelledError,
    )
}


def error_kind(e: GraphError) -> tuple[str, dict[str, str]]:
    """The listed class `e` is an instance of, and the string attributes that locate it
    (node, field, input_name, limit...): what a server sends for `rebuild_error`."""
    kind = next(c.__name__ for c in type(e).__mro__ if ERROR_KINDS.get(c.__name__) is c)
    return kind, {k: v for k, v in vars(e).items() if isinstance(v, str)}


def rebuild_error(
    kind: str, where: dict[str, str], base: type[GraphError], *args: Any
) -> GraphError:
    """An error of the class named `kind` that is also a `base` (e.g. the SDK's RemoteError),
    built by `base(*args)` and given the attributes `where`; unknown kinds give a plain base."""
    cls = ERROR_KINDS.get(kind)
    made = base if cls is None or issubclass(base, cls) else _remote_class(cls, base)
    error = made(*args)
    for key, value in where.items():
        if not hasattr(type(error), key):  # never shadow a method or property
            setattr(error, key, value)
    return error


_REMOTE_CLASSES: dict[tuple[type, type], type[GraphError]] = {}


def _remote_class(cls: type[GraphError], base: type[GraphError]) -> type[GraphError]:
    """`class Remote<cls>(base, cls)`, made once per pair: constructed as `base` is."""
    made = _REMOTE_CLASSES.get((cls, base))
    if made is None:
        made = type(
            f"{base.__name__.removesuffix('Error')}{cls.__name__}",
            (base, cls),
            {"__init__": base.__init__, "__module__": base.__module__},
        )
        _REMOTE_CLASSES[(cls, base)] = made
    return made
