"""Admission control: a bounded number of calls at once, a short bounded queue, and
RESOURCE_EXHAUSTED naming the limit beyond it (load is shed, never queued without bound)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from graphgrad.engine import CancelledError, CancelReason, LimitError
from graphgrad.server.inflight import CallContext


class Admission:
    """At most `slots` holders at once and `queue` more waiting for a slot (waiting blocks
    the caller's thread); a caller beyond both gets a LimitError naming `limit`."""

    def __init__(self, limit: str, what: str, slots: int, queue: int = 0) -> None:
        if slots < 1 or queue < 0:
            raise ValueError(f"{limit} must be at least 1 and its queue non-negative")
        self.limit, self.what, self.slots, self.queue = limit, what, slots, queue
        self.active = self.waiting = 0
        self._cond = threading.Condition()

    def _wake(self, ended: threading.Event) -> None:
        with self._cond:
            ended.set()
            self._cond.notify_all()  # the waiter of `ended` is among them

    def _refuse(self) -> LimitError:
        queued = f" and {self.waiting} waiting (queue {self.queue})" if self.queue else ""
        return LimitError(
            f"the server is busy: {self.active} {self.what} running{queued}, the limit is "
            f"{self.limit}={self.slots}; retry later",
            limit=self.limit,
        )

    def slot_now(self) -> SlotNow:
        """A slot if one is free now (True while held), else False at once: never waits, never
        refuses (the caller then takes the ordinary way, `slot`)."""
        return SlotNow(self)

    def take_now(self) -> bool:
        """A slot if one is free now (True: taken, give_back() it), else False at once: never
        waits, never refuses. slot_now() without its object, for the quick path."""
        with self._cond:
            if self.active >= self.slots:
                return False
            self.active += 1
            return True

    def give_back(self) -> None:
        """Give back a slot taken with take_now()."""
        with self._cond:
            self.active -= 1
            self._cond.notify()

    @contextmanager
    def slot(self, timeout: float | None = None, call: CallContext | None = None) -> Iterator[None]:
        """Hold a slot for the body; wait at most `timeout` seconds (the caller's deadline),
        and only while `call` goes on: a call that ends (its client cancelled, the server
        stops) gives up at once, so dead callers never fill the queue."""
        ended = threading.Event()
        if call is not None:
            call.add_callback(lambda: self._wake(ended))
        with self._cond:
            if self.active >= self.slots:
                if self.waiting >= self.queue:
                    raise self._refuse()
                self.waiting += 1
                try:
                    self._cond.wait_for(lambda: self.active < self.slots or ended.is_set(), timeout)
                finally:
                    self.waiting -= 1
                if self.active >= self.slots and not ended.is_set():
                    raise CancelledError(
                        f"the deadline passed while waiting for one of {self.slots} {self.what}",
                        CancelReason.DEADLINE,
                    )
            if ended.is_set():
                self._cond.notify()  # pass on a release this waiter may have taken
                raise CancelledError(
                    f"the call ended before it got one of {self.slots} {self.what}",
                    (call.reason if call is not None else None) or CancelReason.CLIENT,
                )
            self.active += 1
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify()


class SlotNow:
    """`Admission.slot_now()`'s context (a class, not a generator: it is on every quick call's
    path): enters as whether a slot was free and taken; leaving gives it back."""

    __slots__ = ("_admission", "_taken")

    def __init__(self, admission: Admission) -> None:
        self._admission, self._taken = admission, False

    def __enter__(self) -> bool:
        return self.take()

    def take(self) -> bool:
        """Whether a slot was free, and is now taken."""
        a = self._admission
        with a._cond:
            self._taken = a.active < a.slots
            if self._taken:
                a.active += 1
        return self._taken

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the slot back, if taken and not given back already."""
        if self._taken:
            self._taken = False
            a = self._admission
            with a._cond:
                a.active -= 1
                a._cond.notify()
