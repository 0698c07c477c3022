"""Cancellation: a deadline and a cancel flag with its reason, checked between nodes and
between tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass

from graphgrad.engine.errors import CancelledError, CancelReason

MESSAGES = {
    CancelReason.DEADLINE: "the run's deadline passed",
    CancelReason.CLIENT: "the run was cancelled",
    CancelReason.SHUTDOWN: "the run was cancelled: the server is stopping",
}


@dataclass(slots=True)
class Cancellation:
    """A deadline and a cancel flag, checked between nodes and between tasks."""

    deadline: float | None = None  # time.monotonic() value
    cancelled: bool = False  # set from any thread; a plain bool is enough under the GIL
    reason: CancelReason = CancelReason.CLIENT  # why, once cancelled

    @classmethod
    def within(cls, seconds: float | None) -> Cancellation:
        """A cancellation whose deadline is `seconds` from now (None: no deadline)."""
        return cls(deadline=None if seconds is None else time.monotonic() + seconds)

    def cancel(self, reason: CancelReason = CancelReason.CLIENT) -> None:
        if not self.cancelled:  # the first reason stands
            self.reason = reason
            self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise CancelledError(MESSAGES[self.reason], self.reason)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CancelledError(MESSAGES[CancelReason.DEADLINE], CancelReason.DEADLINE)
