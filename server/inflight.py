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

Callback = Callable[[], None]


class CallContext:
    """The part of a call a servicer in the thread pool may use."""

    def __init__(self, time_remaining: float | None, inflight: InFlight) -> None:
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._inflight = inflight
        self._callbacks: list[Callback] = []
        self._ended = False
        self._lock = threading.Lock()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callback) -> bool:
        """Run `callback` when the call ends (at once if it has ended already)."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return self._inflight.add(callback)
        callback()
        return True

    def end(self) -> None:
        with self._lock:
            self._ended, callbacks, self._callbacks = True, self._callbacks, []
        self._inflight.discard(callbacks)
        for callback in callbacks:
            callback()


class InFlight:
    def __init__(self) -> None:
        self._callbacks: set[Callback] = set()
        self._closed = False
        self._lock = threading.Lock()

    def start(self, context: Any) -> CallContext:
        """A call begins (on the event loop): its callbacks run when gRPC is done with it."""
        call = CallContext(context.time_remaining(), self)
        context.add_done_callback(lambda _: call.end())
        return call

    def add(self, callback: Callback) -> bool:
        with self._lock:
            if not self._closed:
                self._callbacks.add(callback)
                return True
        callback()  # the server is stopping: a call that starts now is cancelled at once
        return True

    def discard(self, callbacks: list[Callback]) -> None:
        with self._lock:
            self._callbacks.difference_update(callbacks)

    def close(self) -> None:
        """Run the callbacks of every call in progress, and of every call still to start."""
        with self._lock:
            self._closed = True
            callbacks, self._callbacks = list(self._callbacks), set()
        for callback in callbacks:
            callback()
