"""The calls in progress on the thread pool, and what their servicers see of them.

Every handler is a coroutine on the event loop; a servicer's work runs in the thread pool and
never waits on the loop (a thread blocked on a loop that has stopped would keep the process
from exiting). The servicer gets a `CallContext`: the time left and callbacks, run when the
call ends (done, cancelled by the client) or when the server stops (`InFlight.close()`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from graphgrad.engine import Cancellation, CancelReason

Callback = Callable[[], None]


class CallContext:
    """The part of a call a servicer in the thread pool may use."""

    def __init__(self, time_remaining: float | None, inflight: InFlight) -> None:
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._inflight = inflight
        self._callbacks: list[Callback] = []
        self._cancels: list[Cancellation] = []  # cancelled when the call ends (cancellation())
        self.reason: CancelReason | None = None  # why the call ended, once it has
        self._lock = threading.Lock()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callback) -> bool:
        """Run `callback` when the call ends (at once if it has ended already); `reason`
        then says why."""
        with self._lock:
            if self.reason is None:
                self._callbacks.append(callback)
                return True
        callback()
        return True

    def cancellation(self) -> Cancellation:
        """What stops the call's work: its deadline passes, or the call ends (cancelled with
        the call's `reason`). Made for every Run: no callback closure, the call holds it."""
        cancel = Cancellation(deadline=self._deadline)
        with self._lock:
            if self.reason is None:
                self._cancels.append(cancel)
                return cancel
        cancel.cancel(self.reason)
        return cancel

    def _done(self, _: object) -> None:  # gRPC's done callback
        self.end()

    def end(self, reason: CancelReason | None = None) -> None:
        """The call is over: its deadline passed, its client went (or it finished), or the
        server stops (`reason` SHUTDOWN). Runs the callbacks once."""
        if reason is None:
            expired = self._deadline is not None and time.monotonic() >= self._deadline
            reason = CancelReason.DEADLINE if expired else CancelReason.CLIENT
        with self._lock:
            if self.reason is not None:
                return
            self.reason, callbacks, self._callbacks = reason, self._callbacks, []
            cancels, self._cancels = self._cancels, []
        self._inflight.discard(self)
        for cancel in cancels:
            cancel.cancel(reason)
        for callback in callbacks:
            callback()


class LoopCall:
    """A call answered on the event loop from start to end, without waiting: nothing can end
    it while its work runs (the loop runs nothing else, and the server stops from the loop),
    so unlike a CallContext it has no callbacks and InFlight does not hold it (on the path of
    most requests under load); its deadline alone stops the work."""

    __slots__ = ("_deadline",)

    def __init__(self, time_remaining: float | None) -> None:
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cancellation(self) -> Cancellation:
        return Cancellation(deadline=self._deadline)


# What a servicer's call gets: a CallContext, or a LoopCall where it is answered on the loop.
Call = CallContext | LoopCall


class InFlight:
    def __init__(self) -> None:
        self._calls: set[CallContext] = set()
        self._closed = False
        self._lock = threading.Lock()

    def start(self, context: Any) -> CallContext:
        """A call begins (on the event loop): its callbacks run when gRPC is done with it,
        or when the server stops."""
        call = CallContext(context.time_remaining(), self)
        context.add_done_callback(call._done)
        with self._lock:
            closed = self._closed
            if not closed:
                self._calls.add(call)
        if closed:  # the server is stopping: a call that starts now is cancelled at once
            call.end(CancelReason.SHUTDOWN)
        return call

    def on_loop(self, context: Any) -> Call:
        """A call to be answered on the event loop without waiting (LoopCall); once the
        server is stopping, a CallContext ended at once, as start() gives."""
        if self._closed:
            return self.start(context)
        return LoopCall(context.time_remaining())

    def discard(self, call: CallContext) -> None:
        with self._lock:
            self._calls.discard(call)

    def close(self) -> None:
        """End every call in progress, and every call still to start, as SHUTDOWN."""
        with self._lock:
            self._closed = True
            calls, self._calls = list(self._calls), set()
        for call in calls:
            call.end(CancelReason.SHUTDOWN)
