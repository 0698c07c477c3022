"""Cancellation: a deadline and a cancel flag, checked between nodes and between tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import CancelledError


@dataclass(slots=True)
class Cancellation:
    """A deadline and a cancel flag, checked between nodes and between tasks."""

    deadline: float | None = None  # time.monotonic() value
    cancelled: bool = False  # set from any thread; a plain bool is enough under the GIL

    @classmethod
    def within(cls, seconds: float | None) -> Cancellation:
        """A cancellation whose deadline is `seconds` from now (None: no deadline)."""
        return cls(deadline=None if seconds is None else time.monotonic() + seconds)

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise CancelledError("the run was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CancelledError("the run's deadline passed")
