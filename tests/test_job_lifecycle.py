"""One job lifecycle (engine/job_manager.py) over either store: the in-memory one of the
in-process client and the server's SQLite one keep the same JobStore contract (leases,
fencing, cancels, history), and the same manager gives the same results over both."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import JobManager, MemoryJobStore, Session
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.job_store import JobStore, Renewal
from graphgrad.engine.training_run import HistorySegment, Progress, SegmentRunner
from graphgrad.server.job_service import spec_decoder
from graphgrad.server.runtime import Runtime
from graphgrad.server.store import JobStore as SqliteJobStore

from .test_job_leases import results
from .test_job_manager import TERMINAL, expected_history, one_weight_job, wait_for

LEASE = 30.0
P = Progress(0, 4, 2, 0, np.nan, np.nan, np.nan)


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path) -> JobStore[bytes]:
    if request.param == "memory":
        return MemoryJobStore()
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def test_a_lease_has_one_holder_and_an_expired_one_is_taken_over(store):
    store.insert("a", b"spec", P)
    assert store.claim("p1", 100.0, 100.0 + LEASE).id == "a"
    assert store.claim("p2", 101.0, 101.0 + LEASE) is None  # held
    assert store.pending(101.0) == 0
    taken = store.claim("p2", 200.0, 200.0 + LEASE)  # p1 missed its heartbeats
    assert taken.id == "a" and taken.holder(201.0) == "p2"
    assert store.renew("a", "p1", 300.0) is Renewal.LOST
    assert not store.checkpoint("a", b"late", P, owner="p1")  # fenced off
    assert not store.set_status("a", "failed", "stale", owner="p1")
    assert store.get("a").checkpoint is None and store.summary("a").status == "pending"


def test_a_checkpoint_writes_state_history_and_status_at_once(store):
    store.insert("a", b"spec", P)
    store.claim("p1", 1.0, LEASE)
    losses = np.arange(6.0).reshape(2, 3)
    done = Progress(3, 4, 2, 0, 1.0, 0.0, 5.0)
    assert store.checkpoint("a", b"ck", done, [HistorySegment(0, 0, losses)], owner="p1")
    assert store.checkpoint("a", None, done, [], owner="p1")  # None keeps the stored one
    row = store.get("a")
    assert row.checkpoint == b"ck" and row.summary.progress.steps_done == 3
    out = np.full((1, 4), np.nan)
    store.read_history("a", 0, 2, 4, 1, 2, out)
    np.testing.assert_array_equal(out, [[3.0, 4.0, 5.0, np.nan]])
    assert store.checkpoint("a", b"end", done, [], "done", owner="p1")
    assert store.summary("a").holder(1.0) == ""  # an ending status releases the lease
    assert store.claim("p2", 1e9, 1e9 + LEASE) is None  # ended: nobody takes it


def test_cancels_released_leases_and_deletes(store):
    for job_id in ("held", "free", "gone"):
        store.insert(job_id, b"spec", P)
    assert store.claim("p1", 1.0, LEASE).id == "held"  # the oldest
    assert store.cancel("held", 1.0) and store.renew("held", "p1", LEASE) is Renewal.CANCEL
    assert store.cancel("free", 1.0) and store.summary("free").status == "cancelled"
    store.release("held", "p1")
    assert store.claim("p2", 1.0, 1.0 + LEASE).id == "held"  # at once, not after a lease
    store.delete("gone")
    assert store.get("gone") is None and not store.cancel("gone", 1.0)
    assert [s.id for s in store.summaries()] == ["free", "held"]  # newest first
    assert [s.id for s in store.summaries(oldest_first=True)] == ["held", "free"]


def test_the_same_manager_trains_alike_over_either_store(tmp_path):
    dispatcher = Dispatcher(ray_enabled=False)
    decode = spec_decoder(Runtime.create(None, dispatcher))
    out = []
    for store in (MemoryJobStore(), SqliteJobStore(tmp_path / "jobs.sqlite3")):
        m: JobManager[bytes] = JobManager(store, dispatcher, decode, lease_seconds=LEASE)
        job_id = m.submit(one_weight_job(3, 40))
        wait_for(m, job_id, TERMINAL)  # type: ignore[arg-type]
        assert m.job(job_id).status == "done"
        out.append(results(m, job_id))  # type: ignore[arg-type]
    memory, sqlite = out
    np.testing.assert_allclose(memory["history/"], expected_history(3, 40), rtol=1e-12)
    assert memory.keys() == sqlite.keys()
    for key in memory:
        np.testing.assert_array_equal(memory[key], sqlite[key])


class BrokenRunnerError(Exception):
    pass


class FailingRunner(SegmentRunner):
    def train(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        raise BrokenRunnerError("the runner broke")


def test_an_in_process_job_that_fails_reraises_its_own_exception_from_wait():
    client = gg.LocalClient()
    dispatcher = client.session.dispatcher
    dispatcher.training_runner = lambda executor: (FailingRunner(), 1)  # type: ignore[method-assign]
    with gg.Graph():
        w, x = gg.input("w", shape=(1,)), gg.input("x", shape=(4,))
        loss = gg.sum((w * x) ** 2, name="loss")
    job = client.train(loss, {"w": np.ones((2, 1))}, {"x": np.ones(4)}, steps=5)
    with pytest.raises(BrokenRunnerError, match="the runner broke") as e:
        job.wait(progress=False)
    assert job.status == "failed" and job.done
    view = client.session.job(job.id).view()
    assert view.error == "BrokenRunnerError: the runner broke"
    assert client.session.job(job.id).exception is e.value  # the very object, not a copy
    assert [v.id for v in client.jobs()] == [job.id]
    assert isinstance(Session().job_manager.store, MemoryJobStore)
