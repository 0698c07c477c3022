"""Job leases: several processes share one job store and exactly one runs each job. Unit
tests of two managers on one store (each with its own connection, as two processes have),
then two real servers sharing a data directory: any one answers for any job, and a job whose
holder is SIGKILLed is taken over by the other and ends with an uninterrupted run's results."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest

import graphgrad as gg
from graphgrad.engine import NO_PROGRESS, Cancellation, CancelledError
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.training_run import TrainingRun, group_specs
from graphgrad.server.job_manager import JobManager
from graphgrad.server.job_service import stored_spec_decoder
from graphgrad.server.store import JobStore
from graphgrad.v1 import jobs_pb2

from .server_proc import running_server
from .test_job_manager import expected_history, manager, one_weight_job, wait_for
from .test_jobs import init, mlp, own_data

LEASE = 30.0  # unit tests move their managers' clocks instead of waiting for a lease


class Clock:
    """A wall clock a test moves forward (a lease expires without waiting for it)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


def pair(tmp_path, **kw) -> tuple[JobManager, JobManager]:
    """Two managers on one store, as two processes: their own connections and owners."""
    return (
        manager(tmp_path, owner="host:1", lease_seconds=LEASE, **kw),
        manager(tmp_path, owner="host:2", lease_seconds=LEASE, **kw),
    )


def results(m: JobManager, job_id: str) -> dict[str, np.ndarray]:
    """Every result part of the job, by kind and name, joined in network order."""
    parts: dict[str, list[np.ndarray]] = {}
    for p in m.results(job_id):
        parts.setdefault(f"{p.kind}/{p.name}", []).append(p.value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def test_each_pending_job_is_claimed_by_exactly_one_of_many_racing_claimers(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    spec, first = one_weight_job(1, 5), JobStore(path)
    for k in range(40):
        first.insert(f"job{k}", spec, NO_PROGRESS)
    stores, taken = [JobStore(path) for _ in range(2)], []
    start = threading.Barrier(8)

    def claim(store: JobStore, owner: str) -> None:
        start.wait()
        now = time.time()
        while (job := store.claim(owner, now, now + LEASE)) is not None:
            taken.append((job.id, owner))

    threads = [threading.Thread(target=claim, args=(stores[k % 2], f"host:{k}")) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in taken) == sorted(f"job{k}" for k in range(40))  # each once
    holders = {s.id: s.lease_owner for s in first.summaries()}
    assert holders == dict(taken)


def test_a_pending_job_goes_to_the_free_manager_and_either_cancels_the_others(tmp_path):
    a, b = pair(tmp_path, max_running=1)
    long = one_weight_job(2, 1_000_000)
    first = a.submit(long)
    wait_for(a, first, ("running",))
    second = a.submit(long)  # a is full: it waits in the store, taken by nobody yet
    assert a.job(second).view().status == "pending" and not a.job(second).live
    b.heartbeat()  # b has a free place
    wait_for(b, second, ("running",))
    assert a.job(second).run is None  # exactly one runs it: b
    views = {m.owner: {v.id: v for v in m.list()} for m in (a, b)}
    for seen in views.values():  # either process names the holder of each job
        assert (seen[first].worker, seen[second].worker) == ("host:1", "host:2")
        assert {seen[first].status, seen[second].status} == {"running"}

    assert b.cancel(first).status == "running"  # asked of its holder through the store
    a.heartbeat()
    wait_for(a, first, ("cancelled",))
    stopped = b.job(first).view()
    assert (stopped.status, stopped.worker) == ("cancelled", "")
    assert stopped.progress.steps_done > 0  # a cancelled job keeps what it trained
    assert results(b, first)["params/w"].shape == (2, 1)

    a.delete(second)  # b runs it: b's heartbeat finds its lease gone and stops it
    b.heartbeat()
    while any(t.name == f"job-{second}" for t in threading.enumerate()):
        time.sleep(0.01)  # until b's run of it has stopped
    assert [v.id for v in a.list()] == [first] == [v.id for v in b.list()]


def test_a_live_lease_is_kept_and_an_expired_one_resumed_from_its_checkpoint(tmp_path, caplog):
    n, steps, ghost = 3, 200, "ghost:9"
    spec, store = one_weight_job(n, steps), JobStore(tmp_path / "jobs.sqlite3")
    store.insert("job", spec, NO_PROGRESS)
    now = time.time()
    assert store.claim(ghost, now, now + LEASE) is not None
    # The holder runs the job as a manager does, checkpoints past step 50, then dies.
    specs, executor = stored_spec_decoder(spec)
    runner, cpus = Dispatcher(ray_enabled=False).training_runner(executor)
    run = TrainingRun(group_specs(specs)[0], cpus=cpus, runner=runner, keep_history=False)
    cancel = Cancellation()

    def checkpoint(r: TrainingRun) -> None:
        assert store.checkpoint("job", r.checkpoint(), r.progress(), r.take_history(), owner=ghost)
        if r.progress().steps_done >= 50:
            cancel.cancel()

    with pytest.raises(CancelledError):
        run.run(cancel, on_segment=checkpoint)
    died_at = store.summary("job").progress.steps_done
    assert 50 <= died_at < steps

    clock = Clock()
    b = manager(tmp_path, owner="host:2", lease_seconds=LEASE, clock=clock)
    b.heartbeat()  # the lease is live: b leaves the job alone
    view = b.job("job").view()
    assert (view.status, view.worker, b.job("job").live) == ("running", ghost, False)

    clock.ahead = LEASE + 1  # the holder missed its heartbeats for a whole lease
    assert b.job("job").view().worker == ""
    with caplog.at_level(logging.INFO, logger="graphgrad.jobs"):
        b.heartbeat()
        wait_for(b, "job", ("done",))
    assert f"resuming job job from step {died_at}" in caplog.text
    assert store.renew("job", ghost, time.time() + LEASE).value == "lost"
    assert not store.checkpoint("job", run.checkpoint(), run.progress(), owner=ghost)
    assert not store.set_status("job", "failed", "stale", owner=ghost)  # fenced off

    reference = manager(tmp_path / "uninterrupted")
    ref_id = reference.submit(spec)
    wait_for(reference, ref_id, ("done",))
    got, want = results(b, "job"), results(reference, ref_id)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    np.testing.assert_allclose(got["history/"], expected_history(n, steps), rtol=1e-12)


def test_a_holder_whose_lease_was_taken_over_stops_and_writes_nothing(tmp_path):
    clock = Clock()
    a = manager(tmp_path, owner="host:1", lease_seconds=LEASE, max_running=1)
    b = manager(tmp_path, owner="host:2", lease_seconds=LEASE, max_running=1, clock=clock)
    job_id = a.submit(one_weight_job(2, 1_000_000))
    wait_for(a, job_id, ("running",))
    clock.ahead = LEASE + 1  # a stalled past its lease, as b sees it
    b.heartbeat()
    wait_for(b, job_id, ("running",))
    while a.job(job_id).live:
        time.sleep(0.01)  # until a's next checkpoint found its lease gone
    assert a.job(job_id).view().worker == "host:2"
    b.cancel(job_id)
    wait_for(b, job_id, ("cancelled",))
    assert a.job(job_id).view().status == "cancelled"
    assert a.job(job_id).view().progress == b.job(job_id).view().progress


def sharing(tmp_path, lease: float = 1.0) -> tuple[str, ...]:
    """Flags of servers on one data directory, as the workers of one server are; a short
    lease so a dead holder's job is taken over soon."""
    return ("--data-dir", str(tmp_path), "--job-lease-s", str(lease), "--max-running-jobs", "1")


def worker_of(server) -> str:
    return f"{socket.gethostname()}:{server.proc.pid}"


def test_a_job_run_by_one_server_is_watched_listed_and_cancelled_from_the_other(tmp_path):
    with (
        # No takeover here: a lease that a loaded machine's stalls do not outlast.
        running_server(*sharing(tmp_path, lease=3.0)) as a,
        running_server(*sharing(tmp_path, lease=3.0)) as b,
        gg.connect(a.address) as on_a,
        gg.connect(b.address) as on_b,
    ):
        submitted = on_a.train(mlp(8), init(4, 8, 0), own_data(4), steps=200_000)
        for event in on_b.job_stream("WatchJob", jobs_pb2.WatchJobRequest(id=submitted.id), 120):
            if event.job.steps_done > 0:
                break
        holder = event.job.worker
        assert event.job.status == jobs_pb2.JOB_STATUS_RUNNING
        assert holder in (worker_of(a), worker_of(b))
        assert [(v.id, v.worker) for v in on_b.jobs()] == [(submitted.id, holder)]
        job = gg.RemoteJob(on_b, submitted.id, 1)
        job.cancel()
        job.wait(progress=False, timeout=120)
        assert job.status == submitted.status == "cancelled"
        assert [v.worker for v in on_a.jobs()] == [""]  # no one holds it now
        assert job.params["W1"].shape == (4, 8, 4)  # a cancelled job keeps what it trained
        assert job.history.tobytes() == submitted.history.tobytes()


LOSS, PARAMS, DATA, STEPS = mlp(8), init(8, 8, 3), own_data(8), 1500
SGD = gg.optim.SGD(lr=0.05, momentum=0.9)


def submit_and_follow(address: str) -> jobs_pb2.JobInfo:
    """Submit the job and follow it until a checkpoint past step 100: its JobInfo then."""
    with gg.connect(address) as c:
        job_id = c.train(LOSS, PARAMS, DATA, SGD, steps=STEPS).id
        for event in c.job_stream("WatchJob", jobs_pb2.WatchJobRequest(id=job_id), 120):
            if event.job.steps_done >= 100:
                return event.job
    raise AssertionError(f"job {job_id} ended before step 100")


def finished_by(log: str, job_id: str) -> str:
    """The worker whose job-state log line took the job to done (the watch events a
    non-holder streams are read from the store and may skip the new holder's short run)."""
    done = re.findall(rf"job state job={job_id} old=\S+ new=done worker=(\S+)", log)
    assert len(done) == 1, log
    return done[0]


def finish_as_uninterrupted(address: str, killed: jobs_pb2.JobInfo) -> None:
    """Follow the job whose holder was killed to its end and check its results against an
    uninterrupted run's, bit for bit."""
    with gg.connect(address) as c:
        request = jobs_pb2.WatchJobRequest(id=killed.id)
        seen = [e.job for e in c.job_stream("WatchJob", request, 300)]
        assert seen[-1].status == jobs_pb2.JOB_STATUS_DONE
        assert min(info.steps_done for info in seen) >= killed.steps_done  # none taken back
        resumed = gg.RemoteJob(c, killed.id, 1)
        reference = gg.connect().train(LOSS, PARAMS, DATA, SGD, steps=STEPS, executor="local")
        reference.wait(progress=False)
        assert resumed.history.tobytes() == reference.history.tobytes()
        for k in PARAMS:
            assert resumed.params[k].tobytes() == reference.params[k].tobytes()


def test_a_job_whose_server_is_sigkilled_is_finished_by_the_other_with_the_same_results(
    tmp_path,
):
    with running_server(*sharing(tmp_path)) as a, running_server(*sharing(tmp_path)) as b:
        killed = submit_and_follow(a.address)
        holder, survivor = (a, b) if killed.worker == worker_of(a) else (b, a)
        assert killed.worker == worker_of(holder) and killed.steps_done < STEPS
        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait(30)
        finish_as_uninterrupted(survivor.address, killed)
        assert finished_by(survivor.log(), killed.id) == worker_of(survivor)


def test_a_server_stopping_gives_up_its_leases_and_the_next_resumes_at_once(tmp_path):
    flags = sharing(tmp_path, lease=3600.0)  # were the lease kept, no one could take it
    with running_server(*flags) as a, gg.connect(a.address) as c:
        job = c.train(mlp(8), init(2, 8, 0), own_data(2), steps=200_000)
        for event in c.job_stream("WatchJob", jobs_pb2.WatchJobRequest(id=job.id), 120):
            if event.job.steps_done > 0:
                break
    left = JobStore(tmp_path / "jobs.sqlite3").summary(job.id)  # a stopped by SIGTERM
    assert left is not None and left.progress is not None
    assert (left.status, left.lease_owner) == ("running", "")
    with running_server(*flags) as b, gg.connect(b.address) as c:
        request = jobs_pb2.WatchJobRequest(id=job.id)
        for event in c.job_stream("WatchJob", request, 120):
            if event.job.worker == worker_of(b):
                break
        assert event.job.steps_done >= left.progress.steps_done  # resumed, not restarted
        gg.RemoteJob(c, job.id, 1).delete()
