"""The closed sets of names the engine works with: executors and job statuses.

They are StrEnums, so they compare equal to their plain names ("local", "done"); the wire
maps them to protobuf enums in one place (graphgrad.wire).
"""

from __future__ import annotations

from enum import StrEnum

from graphgrad.engine.errors import RequestError


class ExecutorKind(StrEnum):
    """Where a request runs: AUTO lets the cost model choose between LOCAL and RAY."""

    AUTO = "auto"
    LOCAL = "local"
    RAY = "ray"

    @classmethod
    def parse(cls, name: object, field: str = "options.executor") -> ExecutorKind:
        """The kind named `name`; anything else is the caller's error on `field`."""
        try:
            return cls(name if isinstance(name, str) else repr(name))
        except ValueError:
            known = tuple(k.value for k in cls)
            raise RequestError(
                f"executor must be one of {known}, got {name!r}", field=field
            ) from None


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.DONE, JobStatus.CANCELLED, JobStatus.FAILED})
