"""The job manager's bounds (issue 10 review): places in the queue are taken before any work,
queued jobs hold no run, stored jobs are read back with structure checks only, results are
streamed a range of networks at a time, and resuming builds nothing in the caller."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

import graphgrad as gg
from graphgrad._train_specs import build_specs
from graphgrad.engine import LimitError, RequestError
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.training import TrainSpec
from graphgrad.engine.training_run import Progress
from graphgrad.server.job_manager import TERMINAL, JobManager
from graphgrad.server.job_service import spec_decoder, stored_spec_decoder
from graphgrad.server.limits import Limits
from graphgrad.server.runtime import Runtime
from graphgrad.server.store import JobStore
from graphgrad.wire import encode_job

LR = 0.01
Decoder = Callable[[bytes], tuple[list[TrainSpec], str]]


def one_weight_job(n: int, steps: int) -> bytes:
    """Loss 4 w^2 per network (w * x with x = ones(4)): SGD gives w_t = w_0 (1 - 8 lr)^t."""
    with gg.Graph():
        w, x = gg.input("w", shape=(1,)), gg.input("x", shape=(4,))
        loss = gg.sum((w * x) ** 2, name="loss")
    sgd = gg.optim.SGD(lr=LR)
    w0 = np.linspace(0.5, 1.5, n).reshape(n, 1)
    specs = build_specs(loss, {"w": w0}, {"x": np.ones(4)}, sgd, steps, None, 0)
    return encode_job(specs, "local").SerializeToString()


def expected_history(n: int, steps: int) -> np.ndarray:
    w0 = np.linspace(0.5, 1.5, n)[:, None]
    return 4 * (w0 * (1 - 8 * LR) ** np.arange(steps)) ** 2


class Recording:
    """A real decoder that records the thread of each call (and can fail its first ones)."""

    def __init__(self, decode: Decoder, fail_first: int = 0) -> None:
        self.decode, self.fail_first, self.threads = decode, fail_first, []

    def __call__(self, blob: bytes) -> tuple[list[TrainSpec], str]:
        self.threads.append(threading.current_thread().name)
        if len(self.threads) <= self.fail_first:
            raise MemoryError("a read that may pass")
        return self.decode(blob)


def manager(tmp_path, decode: Decoder | None = None, **kw) -> JobManager:
    store = JobStore(tmp_path / "jobs.sqlite3")
    dispatcher = Dispatcher(ray_enabled=False)
    decode = decode or spec_decoder(Runtime.create(None, dispatcher))
    return JobManager(store, dispatcher, decode, **kw)


def wait_for(m: JobManager, job_id: str, statuses: tuple[str, ...]) -> None:
    """Until the job is in one of `statuses` (failing at once if it ends otherwise): woken by
    a job running here, polling the store for one that is not (pending, or run elsewhere)."""
    while not (job := m.job(job_id)).live and job.status not in (*statuses, *TERMINAL):
        time.sleep(0.01)
    with job.changed:
        job.changed.wait_for(lambda: job.status in (*statuses, *TERMINAL) or not job.live)
    if job.status not in (*statuses, *TERMINAL):
        return wait_for(m, job_id, statuses)  # it stopped running here: read the store again
    assert job.status in statuses, (job.status, job.error)


def finished(m: JobManager, spec: bytes) -> str:
    job_id = m.submit(spec)
    wait_for(m, job_id, TERMINAL)
    assert m.job(job_id).status == "done"
    return job_id


def delete_all(m: JobManager) -> None:
    for view in m.list():
        m.delete(view.id)


def test_concurrent_submits_beyond_the_queue_are_refused(tmp_path):
    m = manager(tmp_path, max_running=1, max_queued=1)
    long = one_weight_job(2, 1_000_000)
    wait_for(m, m.submit(long), ("running",))  # holds the only running slot
    start, outcomes = threading.Barrier(12), []

    def submit() -> None:
        start.wait()
        try:
            outcomes.append(m.submit(long))
        except LimitError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes if isinstance(o, LimitError)]
    assert len(outcomes) - len(refused) == 1
    assert {e.limit for e in refused} == {"max_queued_jobs"}
    assert len(m.store.summaries()) == 2
    delete_all(m)


def test_queued_jobs_hold_no_run_and_a_refused_submit_builds_nothing(tmp_path):
    decode = Recording(spec_decoder(Runtime.create(None, Dispatcher(ray_enabled=False))))
    m = manager(tmp_path, decode, max_running=1, max_queued=1)
    long = one_weight_job(2, 1_000_000)
    running = m.submit(long)
    wait_for(m, running, ("running",))
    queued = m.submit(long)
    assert m.job(queued).status == "pending" and m.job(queued).run is None
    calls = len(decode.threads)
    with pytest.raises(LimitError) as e:
        m.submit(long)
    assert e.value.limit == "max_queued_jobs"
    assert len(decode.threads) == calls  # refused before it was decoded
    m.cancel(running)
    wait_for(m, queued, ("running",))  # built when it starts
    assert m.job(queued).run is not None
    delete_all(m)


def test_resume_reads_summaries_only_and_builds_each_job_in_its_thread(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    long = one_weight_job(2, 1_000_000)
    ids = [f"job{k}" for k in range(3)]
    for i in ids:  # left unfinished by a previous server
        store.insert(i, long, Progress(0, 1_000_000, 2, 0, np.nan, np.nan, np.nan))
    store.close()
    decode = Recording(spec_decoder(Runtime.create(None, Dispatcher(ray_enabled=False))))
    m = manager(tmp_path, decode, max_running=1, max_queued=0)
    m.resume_all()
    assert decode.threads == [] or all(t.startswith("job-") for t in decode.threads)
    assert [m.job(i).run is None for i in ids[1:]] == [True, True]
    wait_for(m, ids[0], ("running",))
    assert decode.threads == [f"job-{ids[0]}"]
    assert [m.job(i).status for i in ids[1:]] == ["pending", "pending"]
    m.close()  # its heartbeat stops
    delete_all(m)


def test_results_stream_a_range_of_networks_at_a_time(tmp_path):
    n, steps = 400, 1000  # a history of 3.2 MB
    job_id = finished(manager(tmp_path), one_weight_job(n, steps))
    again = manager(tmp_path)  # a restarted server: nothing of the job in memory
    expected, first = expected_history(n, steps), 0
    tracemalloc.start()
    try:
        for part in again.results(job_id, max_bytes=64 << 10):
            t, kind, start, value = part.template, part.kind, part.first, part.value
            if kind == "history":
                assert (t, start) == (0, first) and value.nbytes <= 64 << 10
                np.testing.assert_allclose(value, expected[first : first + len(value)], rtol=1e-12)
                first += len(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first == n
    assert peak < n * steps * 8 // 4  # far less than the whole history


def test_one_networks_history_must_fit_a_result_message():
    limits = Limits(max_message_bytes=1 << 20)
    decode = spec_decoder(Runtime.create(limits, Dispatcher(ray_enabled=False)))
    decode(one_weight_job(2, 100_000))  # 800 kB a network: fits
    with pytest.raises(RequestError) as e:
        decode(one_weight_job(2, 200_000))
    assert e.value.field == "steps" and "max_message_bytes=1048576" in str(e.value)


def test_listing_builds_nothing_and_a_read_that_may_pass_is_not_kept(tmp_path):
    job_id = finished(manager(tmp_path), one_weight_job(3, 20))
    flaky = Recording(stored_spec_decoder, fail_first=1)
    again = manager(tmp_path, flaky)  # reads with `decode` too
    assert [(v.id, v.status) for v in again.list()] == [(job_id, "done")]
    assert again.job(job_id).view().progress.steps_done == 20
    assert flaky.threads == []
    with pytest.raises(MemoryError):
        next(again.results(job_id))
    assert again.job(job_id).view().status == "done"
    history = np.concatenate([p.value for p in again.results(job_id) if p.kind == "history"])
    np.testing.assert_allclose(history, expected_history(3, 20), rtol=1e-12)


def test_a_deleted_job_stays_deleted(tmp_path):
    m = manager(tmp_path, max_running=1)
    job_id = m.submit(one_weight_job(2, 1_000_000))
    wait_for(m, job_id, ("running",))
    m.delete(job_id)
    while _job_thread_alive(job_id):
        time.sleep(0.01)  # until its thread has ended: its last writes change nothing
    with pytest.raises(Exception, match=job_id):
        m.job(job_id)
    assert m.list() == []


def _job_thread_alive(job_id: str) -> bool:
    return any(t.name == f"job-{job_id}" for t in threading.enumerate())
