"""The calls in progress on the thread pool, so that stopping the server stops their work.

grpc.aio does not run a thread-pool call's callbacks (its cancellation) when the server stops
and cancels it: the thread would finish the whole run, and the process could not exit. Here
every callback a call adds is also kept until the call ends, and `close()` runs them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Callback = Callable[[], None]


class _Context:
    """A servicer context whose callbacks InFlight also runs when the server stops."""

    def __init__(self, context: Any, inflight: InFlight) -> None:
        self._context, self._inflight = context, inflight
        self.callbacks: list[Callback] = []

    def add_callback(self, callback: Callback) -> bool:
        self.callbacks.append(callback)
        self._inflight.add(callback)
        return bool(self._context.add_callback(callback))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class InFlight:
    def __init__(self) -> None:
        self._callbacks: set[Callback] = set()
        self._closed = False
        self._lock = threading.Lock()

    def add(self, callback: Callback) -> None:
        with self._lock:
            if not self._closed:
                self._callbacks.add(callback)
                return
        callback()  # the server is stopping: a call that starts now is cancelled at once

    @contextmanager
    def call(self, context: Any) -> Iterator[Any]:
        """The context to hand the servicer for one call."""
        tracked = _Context(context, self)
        try:
            yield tracked
        finally:
            with self._lock:
                self._callbacks.difference_update(tracked.callbacks)

    def close(self) -> None:
        """Run the callbacks of every call in progress, and of every call still to start."""
        with self._lock:
            self._closed = True
            callbacks, self._callbacks = list(self._callbacks), set()
        for callback in callbacks:
            callback()
