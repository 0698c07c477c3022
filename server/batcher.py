"""Dynamic batching of Run requests (Triton's dynamic batcher, for gradients): concurrent
requests with the same stack key that arrive within a window run as one stacked run.

The first request of a batch leads it: it waits up to the window (or until the batch is full),
closes the batch, runs it on its own thread and hands each member its result or its own error.
A member with a deadline shortens the wait: the batch leaves by the time half of any member's
time left has gone, so a window longer than a request's deadline never makes it miss it.
Only requests that are already running (each holds one of the server's run slots) ever wait
here, so nothing queues beyond the server's max_concurrent_runs and run_queue. If the stacked
run itself fails, every member runs alone, so each error stays with the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("graphgrad.server.batcher")

K = TypeVar("K")  # the stack key
Q = TypeVar("Q")  # a member's request
R = TypeVar("R")  # a member's result


def _on_event_loop() -> bool:
    """Whether this thread runs an event loop, which must never wait for a batch to fill."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Alone:
    """A member's outcome when it runs alone after all: nobody joined its batch, or the
    stacked run failed."""


ALONE = _Alone()


@dataclass(eq=False)
class _Batch(Generic[Q]):
    members: list[Q]
    leave_at: float  # time.monotonic() when the leader stops waiting for more
    full: threading.Event = field(default_factory=threading.Event)  # no more may join
    wake: threading.Event = field(default_factory=threading.Event)  # full, or leave_at moved
    done: threading.Event = field(default_factory=threading.Event)  # outcomes are set
    outcomes: list[object] = field(default_factory=list)


@dataclass(frozen=True)
class BatchingConfig:
    window_us: int = 0  # 0: off
    max_batch: int = 8


class Batcher(Generic[K, Q, R]):
    """`run_batch(key, members)` runs members (two or more) stacked and returns one outcome per
    member, in order: its result or its own error; it raises if the stacked run failed."""

    def __init__(
        self,
        config: BatchingConfig,
        run_batch: Callable[[K, Sequence[Q]], Sequence[R | BaseException]],
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        if config.window_us <= 0 or config.max_batch < 2:
            raise ValueError(f"batching needs a window > 0 and max_batch >= 2, got {config}")
        self.config = config
        self._window = config.window_us / 1e6
        self._run_batch, self._on_batch = run_batch, on_batch
        self._open: dict[K, _Batch[Q]] = {}  # at most one open batch per key
        self._lock = threading.Lock()

    def run(
        self, key: K | None, member: Q, alone: Callable[[], R], deadline: float | None = None
    ) -> R:
        """The member's result: from a stacked run when others with the same key come within
        the window, else from `alone()`: also when `key` is None (it may not be stacked) and
        on an event loop's thread (a quick call answered there). `deadline`: the member's
        (a time.monotonic() value; None: none)."""
        if key is None or _on_event_loop():
            return alone()
        now = time.monotonic()
        wait = self._window if deadline is None else min(self._window, (deadline - now) / 2)
        leave_at = now + max(0.0, wait)
        with self._lock:
            batch = self._open.get(key)
            lead = batch is None
            if batch is None:
                batch = self._open[key] = _Batch([member], leave_at)
            else:
                batch.members.append(member)
                if leave_at < batch.leave_at:
                    batch.leave_at = leave_at
                    batch.wake.set()
            index = len(batch.members) - 1
            if len(batch.members) >= self.config.max_batch:
                del self._open[key]
                batch.full.set()
                batch.wake.set()
        if lead:
            self._lead(key, batch)
        else:
            batch.done.wait()  # the leader always sets it, whatever happens
        outcome = batch.outcomes[index]
        if outcome is ALONE:
            return alone()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]

    def waiting(self) -> int:
        """Requests in batches still open (waiting for others to join)."""
        with self._lock:
            return sum(len(b.members) for b in self._open.values())

    def _lead(self, key: K, batch: _Batch[Q]) -> None:
        members: list[Q] = []
        try:
            while not batch.full.is_set():  # flush when full or at the batch's leave_at
                left = batch.leave_at - time.monotonic()
                if left <= 0:
                    break
                batch.wake.wait(min(left, threading.TIMEOUT_MAX))  # past it: OverflowError
                batch.wake.clear()  # leave_at is moved before wake is set: read again
            members = self._close(key, batch)
            if len(members) > 1:
                self._on_batch(len(members))
                batch.outcomes = list(self._run_batch(key, members))
        except Exception as e:  # each member runs alone, so errors stay per request
            log.warning("a stacked run of %d requests failed, each runs alone: %s", len(members), e)
        finally:  # whatever happened, the members are answered and the batch is closed
            members = self._close(key, batch)
            if len(batch.outcomes) != len(members):
                batch.outcomes = [ALONE] * len(members)
            batch.done.set()

    def _close(self, key: K, batch: _Batch[Q]) -> list[Q]:
        """The batch's members, once nobody can join it any more."""
        with self._lock:
            if self._open.get(key) is batch:
                del self._open[key]
        return batch.members
