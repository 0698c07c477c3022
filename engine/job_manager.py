"""The job manager, the one lifecycle of every training job (the in-process client's and
the server's): it checks jobs before storing them, runs a bounded number at a time (the rest
queue as pending in the store, in submission order), checkpoints them, resumes them.

Several processes may share one store (the workers of one server, or servers sharing a data
directory): each job is run by the one process holding its lease in the store. A process
takes the oldest pending job whenever it has a free place (max_running each), renews the
leases of its jobs from a heartbeat thread (every third of a lease), and takes over a job
whose holder died once its lease expires, resuming it from its last checkpoint (training is
deterministic from a checkpoint: the results are those of an uninterrupted run). Every write
of a running job is fenced by its lease, so a holder that lost it changes nothing. Any
process answers for any job: a job run elsewhere is read from the store, and cancelling it
asks its holder through the store (its heartbeat sees it).

The manager never sees the wire: a job's spec is opaque to it (protobuf bytes on a server,
engine specs in memory in-process), turned into engine specs by the `decode` it is given.
Memory is bounded by the running jobs: a place is reserved before a submit does any work,
and a queued job holds its id only (built from its row when it starts). Stored jobs are
listed from their rows and read back with structure checks only, their history a range of
networks at a time. A stored row that cannot be read (a spec that does not parse, a
checkpoint that does not fit, an unknown status) makes that job read as failed; it never
stops the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.errors import (
    CancelledError,
    CancelReason,
    LimitError,
    NotFoundError,
    RequestError,
)
from graphgrad.engine.job_reports import NO_PROGRESS, JobView, ResultPart, result_parts
from graphgrad.engine.job_store import JobStore, JobSummary, Renewal
from graphgrad.engine.kinds import TERMINAL, ExecutorKind, JobStatus
from graphgrad.engine.training import TrainSpec
from graphgrad.engine.training_run import (
    HistorySegment,
    Placement,
    Progress,
    SegmentRunner,
    TrainingRun,
    group_specs,
)

S = TypeVar("S")
# A job's spec decoded: the engine specs of its templates and the executor it asks for.
Decoder = Callable[[S], tuple[list[TrainSpec], ExecutorKind]]
# Told of every change of a job's state: (id, old status or None for a new job, new, error).
ChangeHook = Callable[[str, str | None, str, str], None]
STATUSES = frozenset(JobStatus)
DEFAULT_MAX_QUEUED = 256
# A holder that misses its heartbeats this long loses its jobs to other processes: long
# enough for a busy machine's stalls, short enough that a dead worker's jobs resume soon.
DEFAULT_LEASE_SECONDS = 10.0
log = logging.getLogger("graphgrad.engine.jobs")
log.addHandler(logging.NullHandler())  # an in-process client's failures are its handles'


def process_id() -> str:
    """This process, as leases name it ("HOST:PID")."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseLostError(RuntimeError):
    """The job's lease is no longer this process's (it was deleted, or taken over after this
    process missed its heartbeats): the run stops and writes nothing more."""


class ManagedJob:
    """A job this process runs (`live`, holding its lease; `run` is set once it is built
    from its stored row), or a snapshot of a stored one (pending, run elsewhere, or ended).
    A job run here keeps, once ended, the exception that failed it (`exception`)."""

    def __init__(
        self,
        job_id: str,
        created: float,
        progress: Progress,
        status: JobStatus = JobStatus.PENDING,
        error: str = "",
        live: bool = False,
        worker: str = "",
        on_change: ChangeHook | None = None,
    ) -> None:
        self.id, self.created, self.live, self.worker = job_id, created, live, worker
        self.on_change = on_change
        self.run: TrainingRun | None = None
        self.layout: list[int] = []  # chunks per stacked group, once built here
        self.placement: list[Placement] = []  # once built here
        self.exception: BaseException | None = None
        self.ended = threading.Event()  # set once a job run here has ended and is reported
        self.status, self.error = status, error
        # What the store holds: a view never reports progress a crash could take back.
        self.durable = progress
        self.cancel = Cancellation()
        self.changed = threading.Condition()
        self.version = 0
        self.deleted = False
        self.listeners: set[Callable[[], None]] = set()  # called at every bump (watchers)

    def set_status(self, status: JobStatus, error: str = "") -> None:
        """A change of state, logged (the caller bumps)."""
        if self.on_change is not None and (status != self.status or error != self.error):
            self.on_change(self.id, self.status, status, error)
        self.status, self.error = status, error

    def bump(self) -> None:
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        for listener in tuple(self.listeners):
            listener()

    def wait_past(self, version: int, timeout: float | None) -> bool:
        """Wait for a change after `version`; False: `timeout` passed first."""
        with self.changed:
            return self.changed.wait_for(lambda: self.version != version, timeout)

    def view(self) -> JobView:
        worker = self.worker if self.status in (JobStatus.PENDING, JobStatus.RUNNING) else ""
        return JobView(self.id, self.status, self.durable, self.error, self.created, worker)


class News:
    """What a watcher sends of a job: every view of a job running here; of a stored job
    read again, only those that differ from the last sent. It ends with a terminal one."""

    def __init__(self) -> None:
        self.last: tuple[str, int, str, str] | None = None  # of the last view sent
        self.ended = False

    def of(self, job: ManagedJob) -> JobView | None:
        view = job.view()
        key = (view.status, view.progress.steps_done, view.error, view.worker)
        self.ended = view.status in TERMINAL
        if key == self.last and not job.live:
            return None
        self.last = key
        return view


@dataclass(frozen=True)
class Built:
    specs: list[TrainSpec]
    run: TrainingRun
    placement: list[Placement]


class JobManager(Generic[S]):
    def __init__(
        self,
        store: JobStore[S],
        dispatcher: Dispatcher,
        decode: Decoder[S],
        max_running: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        read: Decoder[S] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        *,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
        on_change: ChangeHook | None = None,
        on_steps: Callable[[int], None] | None = None,
        on_start: Callable[[ManagedJob], None] | None = None,
        partial_results: bool = False,
        logger: logging.Logger = log,
    ) -> None:
        """`decode` checks a spec with every live check (limits, graph registration); `read`
        (default: `decode`) reads a stored one back with structure checks only. `owner`
        names this process's leases (default "HOST:PID"); `clock` is the wall clock leases
        expire by, shared by every process of the store. `on_change` is told of every change
        of a job's state, `on_steps` of the training steps each checkpoint made durable,
        `on_start` of each job this process takes (before it runs). `partial_results`: the
        results of a job may be read in any state (those of a job running here are read
        from its run), not only once it is done or cancelled."""
        self.store, self.dispatcher, self.decode = store, dispatcher, decode
        self.read = read or decode
        self.max_running = max_running or os.cpu_count() or 1
        self.max_queued = max_queued
        self.lease_seconds, self.owner, self.clock = lease_seconds, owner or process_id(), clock
        self.new_id, self.on_change, self.on_start = new_id, on_change, on_start
        self.on_steps = on_steps or (lambda steps: None)
        self.partial_results, self.log = partial_results, logger
        self._active: dict[str, ManagedJob] = {}  # running here (holding its lease)
        self._running = 0  # places taken here: jobs being built or run
        self._reserved = 0  # places taken by submits still being checked and stored
        # Rows read once: (error, progress) of rows that do not read or predate stored
        # progress. Only failures that cannot pass are kept.
        self._stored: dict[str, tuple[str, Progress | None]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None

    def _build(self, spec: S, checkpoint: bytes | None, to_run: bool) -> Built:
        """The job's run with every check it will make (to run it), or with structure checks
        only (to read a stored one): anything wrong raises here."""
        specs, executor = (self.decode if to_run else self.read)(spec)
        groups, placement = group_specs(specs)
        runner, cpus = self.dispatcher.training_runner(executor) if to_run else (SegmentRunner(), 1)
        run = (
            TrainingRun(groups, cpus=cpus, runner=runner, keep_history=False)
            if checkpoint is None
            else TrainingRun.resumed(groups, checkpoint, cpus, runner, keep_history=False)
        )
        return Built(specs, run, placement)

    def _reserve(self) -> None:
        """Take a place among the pending jobs (of every process of the store; a free
        running place here counts as one), or refuse: before any work."""
        with self._lock:
            waiting = self.store.pending(self.clock()) + self._reserved
            if self._running + waiting >= self.max_running + self.max_queued:
                raise LimitError(
                    f"{self._running} jobs are running here and {waiting} are queued or being "
                    f"submitted, the limit max_queued_jobs={self.max_queued}: submit again later",
                    limit="max_queued_jobs",
                )
            self._reserved += 1

    def submit(self, spec: S) -> str:
        self._reserve()
        try:
            built = self._build(spec, None, to_run=True)  # nothing is stored before this passes
            self.store.check_fits(spec, built.run)
            progress = built.run.progress()
            del built  # queued, the job holds its id only: it is built again when it starts
            job_id = self.new_id()
            self.store.insert(job_id, spec, progress)  # pending: queued in the store
        finally:
            with self._lock:
                self._reserved -= 1
        if self.on_change is not None:
            self.on_change(job_id, None, JobStatus.PENDING, "")
        self._schedule()
        return job_id

    def resume_all(self) -> None:
        """Take what this process can run now (jobs a previous server left unfinished
        included, oldest first), then keep taking and heartbeating from a thread of its own.
        Only a claimed row's summary is read here: each job is built from its row when it
        starts, in its own thread, and one that cannot be built fails alone."""
        self._schedule()
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)
            self._keeper.start()

    def close(self) -> None:
        """Take no more jobs and give up the leases of those running here (a process
        stopping): another process, or this server restarted, resumes them at once from
        their last checkpoints. Their runs here can write nothing more."""
        self._stopping.set()
        if self._keeper is not None:
            self._keeper.join()
        with self._lock:
            mine = list(self._active.values())
        for job in mine:
            self.store.release(job.id, self.owner)
            job.cancel.cancel(CancelReason.SHUTDOWN)

    def _keep(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 3):
            try:
                self.heartbeat()
            except Exception:  # a busy or unreadable store: tried again at the next beat
                self.log.exception("job leases: the heartbeat failed")

    def heartbeat(self) -> None:
        """Renew the leases of the jobs running here (stopping those cancelled from another
        process, or whose lease is gone), then take pending jobs into free places."""
        until = self.clock() + self.lease_seconds
        with self._lock:
            mine = list(self._active.values())
        for job in mine:
            if self.store.renew(job.id, self.owner, until) is not Renewal.HELD:
                job.cancel.cancel()  # LOST: its fenced writes would change nothing anyway
        self._schedule()

    def _schedule(self) -> None:
        """Take jobs from the store, oldest first, while fewer than max_running run here."""
        while True:
            with self._lock:
                if self._running >= self.max_running or self._stopping.is_set():
                    return
                self._running += 1
            try:
                now = self.clock()
                taken = self.store.claim(self.owner, now, now + self.lease_seconds)
            except Exception:  # the next heartbeat tries again
                self.log.exception("job leases: no job could be taken from the store")
                taken = None
            if taken is None:
                with self._lock:
                    self._running -= 1
                return
            progress = taken.progress or NO_PROGRESS
            job = ManagedJob(
                taken.id,
                taken.created,
                progress,
                live=True,
                worker=self.owner,
                on_change=self.on_change,
            )
            with self._lock:
                self._active[job.id] = job
            if self.on_start is not None:
                self.on_start(job)
            try:
                threading.Thread(
                    target=self._work, args=(job,), name=f"job-{job.id}", daemon=True
                ).start()
            except Exception as e:  # e.g. no thread to be had: the job fails, not the server
                with self._lock:
                    self._running -= 1
                self._finish(job, JobStatus.FAILED, f"the job could not start: {e}")

    def _start(self, job: ManagedJob) -> TrainingRun | None:
        """The job's run, built from its stored row and marked running; None for a job
        deleted (or whose lease was lost) meanwhile."""
        row = self.store.get(job.id)
        if row is None:
            return None
        built = self._build(row.spec, row.checkpoint, to_run=True)
        run, job.placement = built.run, built.placement
        if not self.store.set_status(job.id, JobStatus.RUNNING, owner=self.owner):
            return None
        job.layout = list(run.layout or [])
        if row.checkpoint is not None:
            self.log.info("resuming job %s from step %d", job.id, run.progress().steps_done)
        return run

    def _work(self, job: ManagedJob) -> None:
        def checkpoint(run: TrainingRun) -> None:
            # Written and committed before the progress it carries is reported.
            progress = run.progress()
            blob = run.checkpoint() if self.store.resumable else None
            history = run.take_history()
            if not self.store.checkpoint(job.id, blob, progress, history, owner=self.owner):
                raise LeaseLostError(f"job {job.id}: its lease is no longer {self.owner}'s")
            self.on_steps(progress.steps_done - job.durable.steps_done)
            job.durable = progress
            job.bump()

        status, error, durable = JobStatus.DONE, "", True
        try:
            job.run = self._start(job)
        except Exception as e:
            status, error = (
                JobStatus.FAILED,
                f"the stored job cannot be started: {type(e).__name__}: {e}",
            )
            self.log.error("job %s: %s", job.id, error)
            durable = not isinstance(e, self.store.transient)  # tried again once its lease lapses
        if job.run is None and not error:
            status, error = JobStatus.CANCELLED, "deleted"
        if job.run is not None:
            job.set_status(JobStatus.RUNNING)
            job.bump()
            try:
                job.run.run(job.cancel, on_segment=checkpoint)
            except CancelledError:
                status = JobStatus.CANCELLED
            except LeaseLostError as e:  # its last writes are fenced off too
                self.log.warning("%s: it stops here", e)
                status = JobStatus.CANCELLED
            except Exception as e:  # the job fails, the process keeps serving
                self.log.exception("job %s failed", job.id)
                status, error = JobStatus.FAILED, f"{type(e).__name__}: {e}"
                job.exception = e
        with self._lock:
            self._running -= 1
        self._finish(job, status, error, durable)
        self._schedule()

    def _finish(self, job: ManagedJob, status: JobStatus, error: str, durable: bool = True) -> None:
        """The job's last checkpoint and status, durable before they are reported, and its
        lease released. A job that was never built writes its status alone (`durable` False:
        not even that, and its lease lapses, so any process tries it again after a lease).
        A job whose lease was lost or that was deleted writes nothing and reports nothing."""
        run, progress, owner = job.run, job.durable, self.owner
        written = durable
        try:
            if run is not None:
                progress = run.progress()
                blob, history = run.checkpoint(), run.take_history()
                written = self.store.checkpoint(
                    job.id, blob, progress, history, status, error, owner
                )
            elif durable:
                written = self.store.set_status(job.id, status, error, owner)
        except Exception as e:
            self.log.exception("job %s: its last checkpoint could not be stored", job.id)
            status, error = JobStatus.FAILED, f"its last checkpoint could not be stored: {e}"
            progress = job.durable
            try:
                written = self.store.set_status(job.id, status, error, owner)
            except Exception:
                self.log.exception("job %s: its failure could not be stored", job.id)
        with self._lock:  # read from the store from now on, its results included
            if self._active.get(job.id) is job:
                del self._active[job.id]
        job.run = None  # its memory goes with it
        job.live = False
        if written:
            self.on_steps(progress.steps_done - job.durable.steps_done)
            job.durable = progress
            job.set_status(status, error)
        job.ended.set()
        job.bump()

    def _snapshot(self, summary: JobSummary) -> ManagedJob:
        """A stored job's view from its row; FAILED where the row does not read."""
        error, progress = self._checked(summary)
        return ManagedJob(
            summary.id,
            summary.created,
            progress or summary.progress or NO_PROGRESS,
            JobStatus.FAILED if error else JobStatus(summary.status),
            error or summary.error,
            worker=summary.holder(self.clock()),
            on_change=self.on_change,
        )

    def _checked(self, summary: JobSummary) -> tuple[str, Progress | None]:
        """(error, progress) of a stored row: its own columns, except for a row from before
        progress was stored, read once with structure checks only (no limits, no graph
        cache). A failure that may pass (self.store.transient) raises and is not kept."""
        if summary.status in STATUSES and summary.progress is not None:
            return "", summary.progress
        with self._lock:
            known = self._stored.get(summary.id)
        if known is not None:
            return known
        checked: tuple[str, Progress | None]
        passing: tuple[type[BaseException], ...] = (NotFoundError, *self.store.transient)
        try:
            if summary.status not in STATUSES:
                raise ValueError(f"the store holds an unknown status '{summary.status}'")
            row = self.store.get(summary.id)
            if row is None:
                raise NotFoundError(summary.id, "job")
            checked = ("", self._build(row.spec, row.checkpoint, to_run=False).run.progress())
        except passing:
            raise
        except Exception as e:
            checked = (f"the stored job cannot be read: {type(e).__name__}: {e}", None)
            self.log.error("job %s: %s", summary.id, checked[0])
        with self._lock:
            return self._stored.setdefault(summary.id, checked)

    def job(self, job_id: str) -> ManagedJob:
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:
            return job
        summary = self.store.summary(job_id)
        if summary is None:
            raise NotFoundError(job_id, "job")
        return self._snapshot(summary)

    def watch(self, job_id: str, interval: float | None = None) -> Iterator[JobView]:
        """The job's view now and after every change until it ends (and every `interval`
        seconds, for a caller with a deadline), blocking the caller's thread between them.
        A stored job not run here is read again, twice a second, until it runs here or ends."""
        news = News()
        while True:
            job = self.job(job_id)
            seen = -1
            while job.version != seen or job.live:
                if job.version == seen:
                    if not job.wait_past(seen, interval):
                        yield job.view()
                    continue
                seen = job.version
                if (view := news.of(job)) is not None:
                    yield view
                if news.ended:
                    return
            time.sleep(0.5)

    async def watch_async(self, job_id: str) -> AsyncIterator[JobView]:
        """The job's view now and after every change until it ends. A watcher waits on the
        event loop, holding no thread: the job's bump() wakes it through the loop. A stored
        job not run here is read again, twice a second, until it runs here or ends."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:  # from the job's thread; the loop may be gone at shutdown
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(changed.set)

        news = News()
        while True:
            job = await asyncio.to_thread(self.job, job_id)
            job.listeners.add(wake)
            try:
                seen = -1
                while job.version != seen or job.live:
                    changed.clear()
                    if job.version == seen:
                        await changed.wait()
                        continue
                    seen = job.version
                    if (view := news.of(job)) is not None:
                        yield view
                    if news.ended:
                        return
            finally:
                job.listeners.discard(wake)
            await asyncio.sleep(0.5)

    def cancel(self, job_id: str) -> JobView:
        """A job running here stops at once; a pending one, or one whose holder died, is
        cancelled in the store; one running elsewhere is asked to stop through the store
        (its holder's heartbeat sees it)."""
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:
            job.cancel.cancel()
            return job.view()
        self.store.cancel(job_id, self.clock())
        return self.job(job_id).view()

    def delete(self, job_id: str) -> None:
        """Cancel the job if it runs, then remove it and its history from the store (a
        holder elsewhere finds its lease gone at its next heartbeat and stops)."""
        job = self.job(job_id)
        with self._lock:  # deleted with its entries: a _finish meanwhile keeps nothing
            self._active.pop(job_id, None)
            self._stored.pop(job_id, None)
            job.deleted = True
        job.cancel.cancel()  # its thread's last writes find no row: they change nothing
        self.store.delete(job_id)
        job.set_status(JobStatus.CANCELLED, "deleted")
        job.bump()

    def list(self) -> list[JobView]:
        """Every job, from the store's rows (and the live jobs here): nothing is built."""
        views = []
        for summary in self.store.summaries():
            with self._lock:
                job = self._active.get(summary.id)
            with contextlib.suppress(NotFoundError):  # deleted meanwhile
                views.append((job or self._snapshot(summary)).view())
        return views

    def results(self, job_id: str, max_bytes: int = 4 << 20) -> Iterator[ResultPart]:
        """The results of a job that is done, or what a cancelled job had trained, in pieces
        of at most ~max_bytes (one network at least). The history is read from the store
        one range of networks at a time. With `partial_results`, a job's results in any
        state: those of a job running here from its run (parameters now, history as of its
        last checkpoint)."""
        job = self.job(job_id)
        live = job.run if self.partial_results else None
        if live is not None:
            sizes, steps = live.chunk_sizes(), live.steps

            def so_far(lo: int, hi: int) -> np.ndarray:
                return read_history(self.store, job_id, sizes, steps, [], 0, lo, hi)

            groups = [g.n for g in live.groups]
            yield from result_parts(live.params(), job.placement, groups, steps, so_far, max_bytes)
            return
        if not self.partial_results and job.status not in (JobStatus.DONE, JobStatus.CANCELLED):
            why = f": {job.error}" if job.error else ""
            raise RequestError(
                f"job '{job_id}' is {job.status}{why}: results come when it is done or cancelled",
                field="id",
            )
        row = self.store.get(job_id)
        if row is None:
            raise NotFoundError(job_id, "job")
        try:
            built = self._build(row.spec, row.checkpoint, to_run=False)
            run = built.run
            params = run.params()
            legacy = run.take_history()  # stores from before history rows: in the checkpoint
        except self.store.transient:
            raise
        except Exception as e:
            error = f"the stored job cannot be read: {type(e).__name__}: {e}"
            with self._lock:
                self._stored.setdefault(job_id, (error, None))
            raise RequestError(f"job '{job_id}': {error}", field="id") from e
        placement, sizes, steps = built.placement, run.chunk_sizes(), run.steps
        del row, built

        def history(lo: int, hi: int) -> np.ndarray:
            return read_history(self.store, job_id, sizes, steps, legacy, 0, lo, hi)

        groups = [g.n for g in run.groups]
        yield from result_parts(params, placement, groups, steps, history, max_bytes)


def read_history(
    store: JobStore,
    job_id: str,
    sizes: list[int],
    steps: int,
    legacy: list[HistorySegment],
    base: int,
    lo: int,
    hi: int,
) -> np.ndarray:
    """Networks [base + lo, base + hi) of the job's [networks, steps] history, NaN for steps
    not run, read from the store's rows of the chunks (of `sizes` networks) that hold them."""
    out = np.full((hi - lo, steps), np.nan)
    start = 0
    for chunk, n in enumerate(sizes):
        a, b = max(base + lo, start), min(base + hi, start + n)
        if a < b:
            rows = out[a - base - lo : b - base - lo]
            store.read_history(job_id, chunk, n, steps, a - start, b - start, rows)
            for seg in legacy:
                if seg.chunk == chunk:
                    k = seg.losses.shape[1]
                    rows[:, seg.first : seg.first + k] = seg.losses[a - start : b - start]
        start += n
    return out
