"""The job manager: runs training jobs in threads, checkpoints them, resumes them at start.

Protobuf stops at the servicer: the manager takes the stored spec bytes, decodes them once
through the codec into engine specs, and reports plain dataclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from graphgrad.engine import Cancellation, CancelledError
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.jobs import Placement, Progress, TrainingRun, group_specs
from graphgrad.engine.training import TrainSpec

from .errors import NotFoundError
from .store import JobRow, JobStore

log = logging.getLogger("graphgrad.jobs")
TERMINAL = ("done", "cancelled", "failed")


@dataclass(frozen=True)
class JobView:
    id: str
    status: str
    progress: Progress
    error: str
    created: float


class ManagedJob:
    def __init__(
        self,
        job_id: str,
        created: float,
        specs: list[TrainSpec],
        executor: str,
        run: TrainingRun,
        placement: list[Placement],
    ) -> None:
        self.id, self.created, self.specs, self.executor = job_id, created, specs, executor
        self.run, self.placement = run, placement
        self.status, self.error = "pending", ""
        self.cancel = Cancellation()
        self.changed = threading.Condition()
        self.version = 0
        self.listeners: set[Callable[[], None]] = set()  # called at every bump (watchers)

    def bump(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        for listener in tuple(self.listeners):
            listener()

    def view(self) -> JobView:
        return JobView(self.id, self.status, self.run.progress(), self.error, self.created)


class JobManager:
    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        decode: Callable[[bytes], tuple[list[TrainSpec], str]],
    ) -> None:
        self.store, self.dispatcher, self.decode = store, dispatcher, decode
        self._jobs: dict[str, ManagedJob] = {}
        self._lock = threading.Lock()

    def _build(self, row: JobRow) -> ManagedJob:
        specs, executor = self.decode(row.spec)
        groups, placement = group_specs(specs)
        runner, cpus = self.dispatcher.training_runner(executor)
        run = (
            TrainingRun(groups, cpus=cpus, runner=runner)
            if row.checkpoint is None
            else TrainingRun.resumed(groups, row.checkpoint, cpus, runner)
        )
        job = ManagedJob(row.id, row.created, specs, executor, run, placement)
        job.status, job.error = row.status, row.error
        return job

    def submit(self, spec: bytes) -> str:
        self.decode(spec)  # validate before anything is stored
        job_id = uuid.uuid4().hex[:12]
        self.store.insert(job_id, spec)
        self._start(self._build(self.store.get(job_id)))  # type: ignore[arg-type]
        return job_id

    def resume_all(self) -> None:
        """Jobs a previous server left unfinished continue from their last checkpoint."""
        for job_id in self.store.ids(("pending", "running")):
            row = self.store.get(job_id)
            assert row is not None
            log.info("resuming job %s from step %d", job_id, row.steps_done)
            self._start(self._build(row))

    def _start(self, job: ManagedJob) -> None:
        with self._lock:
            self._jobs[job.id] = job
        threading.Thread(target=self._work, args=(job,), name=f"job-{job.id}", daemon=True).start()

    def _work(self, job: ManagedJob) -> None:
        def checkpoint(run: TrainingRun) -> None:
            # Written and committed before the progress it carries is reported.
            self.store.checkpoint(job.id, run.checkpoint(), run.progress().steps_done)
            job.bump()

        job.status = "running"
        job.bump()
        try:
            job.run.run(job.cancel, on_segment=checkpoint)
            job.status = "done"
        except CancelledError:
            job.status = "cancelled"
        except Exception as e:  # the job fails, the server keeps serving
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
        self.store.checkpoint(
            job.id, job.run.checkpoint(), job.run.progress().steps_done, job.status, job.error
        )
        job.bump()

    def job(self, job_id: str) -> ManagedJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            row = self.store.get(job_id)
            if row is None:
                raise NotFoundError(job_id, "job")
            job = self._build(row)  # a finished job from before a restart
            with self._lock:
                job = self._jobs.setdefault(job_id, job)
        return job

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
        if job.status not in TERMINAL:
            job.cancel.cancel()
        return job.view()

    def list(self) -> list[JobView]:
        return [self.job(i).view() for i in self.store.ids()]

    def results(
        self, job_id: str, max_bytes: int = 4 << 20
    ) -> Iterator[tuple[int, str, str, int, np.ndarray]]:
        """(template, kind, name, first network, values) pieces of at most ~max_bytes."""
        job = self.job(job_id)
        params = job.run.params()
        offsets = np.cumsum([0] + [g.n for g in job.run.groups])
        history = job.run.history()
        for t, (g, lo, hi) in enumerate(job.placement):
            arrays = [("params", k, v[lo:hi]) for k, v in params[g].items()]
            arrays.append(("history", "", history[offsets[g] + lo : offsets[g] + hi]))
            for kind, name, value in arrays:
                per = max(1, max_bytes // max(value[:1].nbytes, 1))
                for first in range(0, len(value), per):
                    yield t, kind, name, first, value[first : first + per]
