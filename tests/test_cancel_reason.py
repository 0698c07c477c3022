"""Cancellation carries its reason (deadline, client, shutdown) from where work stops to the
status the server sends: DEADLINE_EXCEEDED or CANCELLED is chosen from it, not from text."""

from __future__ import annotations

import pickle
import time

import grpc
import pytest

from graphgrad.engine import Cancellation, CancelledError, CancelReason
from graphgrad.server.errors import to_status
from graphgrad.server.inflight import InFlight
from graphgrad.server.service import cancellation


class FakeGrpcContext:  # what InFlight.start reads of a grpc.aio context
    def __init__(self, time_remaining: float | None) -> None:
        self._time_remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def add_done_callback(self, callback: object) -> None:
        self.done = callback


def reason_of(cancel: Cancellation) -> CancelReason:
    with pytest.raises(CancelledError) as e:
        cancel.check()
    return e.value.reason


def test_a_cancellation_says_why_and_the_first_reason_stands():
    assert reason_of(Cancellation(deadline=time.monotonic() - 1)) == CancelReason.DEADLINE
    cancel = Cancellation()
    cancel.cancel(CancelReason.SHUTDOWN)
    cancel.cancel(CancelReason.CLIENT)
    assert reason_of(cancel) == CancelReason.SHUTDOWN
    plain = Cancellation()
    plain.cancel()
    assert reason_of(plain) == CancelReason.CLIENT


def test_the_reason_survives_pickling():
    """Errors come back from Ray tasks pickled."""
    e = pickle.loads(pickle.dumps(CancelledError("stopped", CancelReason.DEADLINE)))
    assert (str(e), e.reason) == ("stopped", CancelReason.DEADLINE)


@pytest.mark.parametrize(
    ("message", "reason", "code"),
    [
        ("the user's deadline text", CancelReason.CLIENT, grpc.StatusCode.CANCELLED),
        ("stopped", CancelReason.DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED),
        ("the deadline of the server", CancelReason.SHUTDOWN, grpc.StatusCode.CANCELLED),
    ],
)
def test_the_status_comes_from_the_reason_not_the_message(message, reason, code):
    assert to_status(CancelledError(message, reason)).code == code


def test_a_server_stopping_cancels_the_run_with_reason_shutdown():
    inflight = InFlight()
    call = inflight.start(FakeGrpcContext(None))
    cancel = cancellation(call)
    inflight.close()
    assert call.reason == CancelReason.SHUTDOWN
    assert reason_of(cancel) == CancelReason.SHUTDOWN
    late = cancellation(inflight.start(FakeGrpcContext(None)))  # starts after the stop
    assert reason_of(late) == CancelReason.SHUTDOWN


def test_a_call_ending_past_its_deadline_is_a_deadline_and_before_it_a_cancel():
    inflight = InFlight()
    expired = inflight.start(FakeGrpcContext(0.0))
    cancel = cancellation(expired)
    expired.end()
    assert reason_of(cancel) == CancelReason.DEADLINE
    context = FakeGrpcContext(60.0)
    gone = inflight.start(context)
    cancel = cancellation(gone)
    context.done(None)  # the client went away with time left
    assert reason_of(cancel) == CancelReason.CLIENT
