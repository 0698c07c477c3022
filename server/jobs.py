"""The job manager: checks jobs before storing them, runs a bounded number at a time (the
rest queue as pending, in submission order), checkpoints them, resumes them at start.

Protobuf stops at the servicer: the manager takes the stored spec bytes, decodes them once
through the codec into engine specs, and reports plain dataclasses. A stored row that cannot
be read (a spec that does not parse, a checkpoint that does not fit, an unknown status) makes
that job read as failed; it never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from graphgrad.engine import Cancellation, CancelledError, LimitError, RequestError
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.jobs import Placement, Progress, SegmentRunner, TrainingRun, group_specs
from graphgrad.engine.training import TrainSpec

from .errors import NotFoundError
from .store import JobRow, JobStore, JobSummary

log = logging.getLogger("graphgrad.jobs")
TERMINAL = ("done", "cancelled", "failed")
STATUSES = ("pending", "running", *TERMINAL)
NO_PROGRESS = Progress(0, 0, 0, 0, float("nan"), float("nan"), float("nan"))
DEFAULT_MAX_QUEUED = 256
RESUME_WAIT_SECONDS = 300.0


def default_max_running() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class JobView:
    id: str
    status: str
    progress: Progress
    error: str
    created: float


class ManagedJob:
    """A job this process runs or queues (`run` set), or a snapshot of a stored one."""

    def __init__(
        self,
        job_id: str,
        created: float,
        run: TrainingRun | None,
        placement: list[Placement],
        progress: Progress,
        status: str = "pending",
        error: str = "",
    ) -> None:
        self.id, self.created, self.run, self.placement = job_id, created, run, placement
        self.status, self.error = status, error
        # What the store holds: a view never reports progress a crash could take back.
        self.durable = progress
        self.cancel = Cancellation()
        self.changed = threading.Condition()
        self.version = 0
        self.deleted = False
        self.listeners: set[Callable[[], None]] = set()  # called at every bump (watchers)

    def bump(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        for listener in tuple(self.listeners):
            listener()

    def view(self) -> JobView:
        return JobView(self.id, self.status, self.durable, self.error, self.created)


@dataclass(frozen=True)
class Built:
    specs: list[TrainSpec]
    run: TrainingRun
    placement: list[Placement]


class JobManager:
    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        decode: Callable[[bytes], tuple[list[TrainSpec], str]],
        max_running: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.store, self.dispatcher, self.decode = store, dispatcher, decode
        self.max_running = max_running or default_max_running()
        self.max_queued = max_queued
        self._active: dict[str, ManagedJob] = {}  # queued or running here
        self._queue: deque[ManagedJob] = deque()
        self._running = 0
        self._stored: dict[str, tuple[str, Progress | None]] = {}  # row checks: (error, progress)
        self._lock = threading.Lock()
        # Set once resume_all has taken over the unfinished jobs of the store: until then a
        # stored pending or running row is not yet the job it will be.
        self._resumed = threading.Event()

    def _build(self, spec: bytes, checkpoint: bytes | None, to_run: bool) -> Built:
        """The job's run with every check it will make: anything wrong raises here."""
        specs, executor = self.decode(spec)
        groups, placement = group_specs(specs)
        runner, cpus = self.dispatcher.training_runner(executor) if to_run else (SegmentRunner(), 1)
        run = (
            TrainingRun(groups, cpus=cpus, runner=runner, keep_history=False)
            if checkpoint is None
            else TrainingRun.resumed(groups, checkpoint, cpus, runner, keep_history=False)
        )
        return Built(specs, run, placement)

    def _check_size(self, run: TrainingRun, spec: bytes) -> None:
        """The spec and every checkpoint must fit a blob of the store (the job's whole size
        from N x steps is checked against max_request_bytes by the spec decoder)."""
        # A checkpoint's size never changes: parameters and optimizer state.
        for what, size in (("spec", len(spec)), ("checkpoint", len(run.checkpoint()))):
            if size > self.store.max_blob_bytes:
                raise LimitError(
                    f"the job's {what} takes {size} bytes, over the store's blob limit "
                    f"max_blob_bytes={self.store.max_blob_bytes}",
                    limit="max_blob_bytes",
                )

    def submit(self, spec: bytes) -> str:
        built = self._build(spec, None, to_run=True)  # nothing is stored before this passes
        self._check_size(built.run, spec)
        job_id = uuid.uuid4().hex[:12]
        job = ManagedJob(job_id, 0.0, built.run, built.placement, built.run.progress())
        with self._lock:
            if self._running >= self.max_running and len(self._queue) >= self.max_queued:
                raise LimitError(
                    f"{self._running} jobs are running and {len(self._queue)} are queued, the "
                    f"limit max_queued_jobs={self.max_queued}: submit again later",
                    limit="max_queued_jobs",
                )
            self._active[job_id] = job
        try:
            job.created = self.store.insert(job_id, spec, job.durable)
        except BaseException:
            with self._lock:
                del self._active[job_id]
            raise
        self._enqueue(job)
        return job_id

    def resume_all(self) -> None:
        """Jobs a previous server left unfinished continue from their last checkpoint, in
        submission order; one that cannot be read reads as failed, and the rest go on."""
        try:
            self._resume_all()
        finally:
            self._resumed.set()

    def _resume_all(self) -> None:
        for summary in self.store.summaries(oldest_first=True):
            if summary.status not in ("pending", "running"):
                continue
            try:
                row = self.store.get(summary.id)
                if row is None:
                    continue
                built = self._build(row.spec, row.checkpoint, to_run=True)
            except Exception as e:
                error = f"the stored job cannot be resumed: {type(e).__name__}: {e}"
                log.error("job %s: %s", summary.id, error)
                with self._lock:
                    self._stored[summary.id] = (error, summary.progress)
                continue
            log.info("resuming job %s from step %d", summary.id, built.run.progress().steps_done)
            job = ManagedJob(
                summary.id, summary.created, built.run, built.placement, built.run.progress()
            )
            with self._lock:
                self._active[job.id] = job
            self._enqueue(job)

    def _enqueue(self, job: ManagedJob) -> None:
        with self._lock:
            self._queue.append(job)
        self._schedule()

    def _schedule(self) -> None:
        """Start queued jobs, oldest first, while fewer than max_running run."""
        while True:
            with self._lock:
                if self._running >= self.max_running or not self._queue:
                    return
                job = self._queue.popleft()
                self._running += 1
            try:
                threading.Thread(
                    target=self._work, args=(job,), name=f"job-{job.id}", daemon=True
                ).start()
            except Exception as e:  # e.g. no thread to be had: the job fails, not the server
                with self._lock:
                    self._running -= 1
                self._finish(job, "failed", f"the job could not start: {e}")

    def _work(self, job: ManagedJob) -> None:
        run = job.run
        assert run is not None

        def checkpoint(run: TrainingRun) -> None:
            # Written and committed before the progress it carries is reported.
            progress = run.progress()
            self.store.checkpoint(job.id, run.checkpoint(), progress, run.take_history())
            job.durable = progress
            job.bump()

        job.status = "running"
        job.bump()
        status, error = "done", ""
        try:
            run.run(job.cancel, on_segment=checkpoint)
        except CancelledError:
            status = "cancelled"
        except Exception as e:  # the job fails, the server keeps serving
            log.exception("job %s failed", job.id)
            status, error = "failed", f"{type(e).__name__}: {e}"
        with self._lock:
            self._running -= 1
        self._finish(job, status, error)
        self._schedule()

    def _finish(self, job: ManagedJob, status: str, error: str) -> None:
        """The job's last checkpoint and status, durable before they are reported."""
        run = job.run
        assert run is not None
        progress = run.progress()
        try:
            self.store.checkpoint(
                job.id, run.checkpoint(), progress, run.take_history(), status, error
            )
        except Exception as e:
            log.exception("job %s: its last checkpoint could not be stored", job.id)
            status, error = "failed", f"its last checkpoint could not be stored: {e}"
            progress = job.durable
            try:
                self.store.set_status(job.id, status, error)
            except Exception:
                log.exception("job %s: its failure could not be stored", job.id)
        with self._lock:
            self._active.pop(job.id, None)
            if not job.deleted:  # read from the store from now on, its results included
                self._stored[job.id] = ("", progress)
        job.durable, job.status, job.error = progress, status, error
        job.bump()

    def _snapshot(self, summary: JobSummary) -> ManagedJob:
        """A stored job's view: its row's status and progress, FAILED where the row does not
        read (checked once per process)."""
        with self._lock:
            checked = self._stored.get(summary.id)
        if checked is None:
            checked = ("", summary.progress)
            try:
                if summary.status not in STATUSES:
                    raise ValueError(f"the store holds an unknown status '{summary.status}'")
                if summary.progress is None or summary.status in ("done", "cancelled"):
                    row = self.store.get(summary.id)
                    if row is not None:
                        built, _ = self._results_of(row)
                        checked = ("", summary.progress or built.run.progress())
            except Exception as e:
                checked = (f"the stored job cannot be read: {type(e).__name__}: {e}", None)
                log.error("job %s: %s", summary.id, checked[0])
            with self._lock:
                self._stored.setdefault(summary.id, checked)
        error, progress = checked
        return ManagedJob(
            summary.id,
            summary.created,
            None,
            [],
            progress or summary.progress or NO_PROGRESS,
            "failed" if error else summary.status,
            error or summary.error,
        )

    def _results_of(self, row: JobRow) -> tuple[Built, np.ndarray]:
        built = self._build(row.spec, row.checkpoint, to_run=False)
        return built, built.run.history(self.store.history(row.id))

    def job(self, job_id: str) -> ManagedJob:
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:
            return job
        summary = self.store.summary(job_id)
        if summary is None:
            raise NotFoundError(job_id, "job")
        if summary.status in ("pending", "running") and not self._resumed.is_set():
            # Served before it was resumed: wait for resume_all (bounded, for a manager that
            # is never asked to resume) rather than hand out a snapshot that never changes.
            self._resumed.wait(RESUME_WAIT_SECONDS)
            with self._lock:
                job = self._active.get(job_id)
            if job is not None:
                return job
        return self._snapshot(summary)

    async def watch(self, job_id: str) -> AsyncIterator[JobView]:
        """The job's view now and after every change until it ends. A watcher waits on the
        event loop, holding no thread: the job's bump() wakes it through the loop. A stored
        job not run here (yet: resume_all may not have reached it) is read again, twice a
        second, until it runs here or ends."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:  # from the job's thread; the loop may be gone at shutdown
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(changed.set)

        last: tuple[str, int, str] | None = None  # of the last view sent
        while True:
            job = await asyncio.to_thread(self.job, job_id)
            job.listeners.add(wake)
            try:
                seen = -1
                while job.version != seen or job.run is not None:
                    changed.clear()
                    if job.version == seen:
                        await changed.wait()
                        continue
                    seen = job.version
                    view = job.view()
                    key = (view.status, view.progress.steps_done, view.error)
                    if key != last or job.run is not None:  # a stored job read again: news only
                        last = key
                        yield view
                    if view.status in TERMINAL:
                        return
            finally:
                job.listeners.discard(wake)
            await asyncio.sleep(0.5)

    def cancel(self, job_id: str) -> JobView:
        job = self.job(job_id)
        with self._lock:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            self._finish(job, "cancelled", "")
        elif job.status not in TERMINAL:
            job.cancel.cancel()
        return job.view()

    def delete(self, job_id: str) -> None:
        """Cancel the job if it runs, then remove it and its history from the store."""
        job = self.job(job_id)
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
            self._active.pop(job_id, None)
            self._stored.pop(job_id, None)
        job.deleted = True
        job.cancel.cancel()  # its thread's last writes find no row: they change nothing
        self.store.delete(job_id)
        job.status, job.error = "cancelled", "deleted"
        job.bump()

    def list(self) -> list[JobView]:
        views = []
        for summary in self.store.summaries():
            with self._lock:
                job = self._active.get(summary.id)
            views.append((job or self._snapshot(summary)).view())
        return views

    def results(
        self, job_id: str, max_bytes: int = 4 << 20
    ) -> Iterator[tuple[int, str, str, int, np.ndarray]]:
        """(template, kind, name, first network, values) pieces of at most ~max_bytes, of a
        job that is done, or of what a cancelled job had trained."""
        job = self.job(job_id)
        if job.status not in ("done", "cancelled"):
            why = f": {job.error}" if job.error else ""
            raise RequestError(
                f"job '{job_id}' is {job.status}{why}: results come when it is done or cancelled",
                field="id",
            )
        row = self.store.get(job_id)
        if row is None:
            raise NotFoundError(job_id, "job")
        built, history = self._results_of(row)
        params = built.run.params()
        offsets = np.cumsum([0] + [g.n for g in built.run.groups])
        for t, (g, lo, hi) in enumerate(built.placement):
            arrays = [("params", k, v[lo:hi]) for k, v in params[g].items()]
            arrays.append(("history", "", history[offsets[g] + lo : offsets[g] + hi]))
            for kind, name, value in arrays:
                per = max(1, max_bytes // max(value[:1].nbytes, 1))
                for first in range(0, len(value), per):
                    yield t, kind, name, first, value[first : first + per]
