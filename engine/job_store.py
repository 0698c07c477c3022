"""Where jobs are kept: the JobStore protocol the job manager (engine/job_manager.py) writes
through, and its in-memory implementation (the in-process client's jobs). The server's
durable one is SQLite (server/store.py), shared by several processes through leases.

A store holds each job's spec (opaque to it: the server's are protobuf bytes, the in-memory
store keeps engine specs as they are), its status, its latest checkpoint with the progress
it carries, its loss history in segments, and the lease of the process running it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

import numpy as np

from graphgrad.engine.training_run import HistorySegment, Progress, TrainingRun

S = TypeVar("S")
# No process takes or renews a lease for longer (`graphgrad serve --job-lease-s` is at most
# this): one that ends further from now was written by a clock since stepped back, or is
# corrupt, and holds nothing.
LONGEST_LEASE_S = 86_400.0


@dataclass(frozen=True)
class JobSummary:
    id: str
    status: str
    error: str
    created: float
    progress: Progress | None  # None: a row from before progress was stored
    lease_owner: str = ""  # the process that holds (or last held) the job's lease
    lease_expires: float = 0.0

    def holder(self, now: float) -> str:
        """The process running the job now ("HOST:PID"), or "" when none holds it."""
        return self.lease_owner if now <= self.lease_expires <= now + LONGEST_LEASE_S else ""


@dataclass(frozen=True)
class JobRow(Generic[S]):
    summary: JobSummary
    spec: S
    checkpoint: bytes | None

    @property
    def id(self) -> str:
        return self.summary.id


class Renewal(enum.Enum):
    """What a holder's heartbeat finds: its lease renewed, a cancel asked of it by another
    process (lease renewed too), or the lease gone (the job deleted or taken over)."""

    HELD = "held"
    CANCEL = "cancel"
    LOST = "lost"


class JobStore(Protocol[S]):
    """What the job manager needs of a store. Every write of a running job passes its
    holder's `owner` and changes nothing unless that owner holds the job's lease."""

    # Whether a job can be resumed from the store by another process (or after a restart):
    # then every segment's checkpoint is written; otherwise only the last one.
    resumable: bool
    # Failures of the store that may pass (busy, unreadable): never kept as a job's failure.
    transient: tuple[type[BaseException], ...]

    def check_fits(self, spec: S, run: TrainingRun) -> None:
        """Raise LimitError if the spec or the run's checkpoints cannot be stored."""

    def insert(self, job_id: str, spec: S, progress: Progress) -> float: ...

    def checkpoint(
        self,
        job_id: str,
        blob: bytes | None,
        progress: Progress,
        history: Sequence[HistorySegment] = (),
        status: str = "running",
        error: str = "",
        owner: str | None = None,
    ) -> bool:
        """The job's state (`blob` None: the stored one kept), the history of the steps it
        covers and its status, all at once; the lease released with an ending status.
        False: nothing was written (deleted, or the lease is another's)."""
        ...

    def set_status(
        self, job_id: str, status: str, error: str = "", owner: str | None = None
    ) -> bool: ...

    def claim(self, owner: str, now: float, until: float) -> JobSummary | None: ...

    def renew(self, job_id: str, owner: str, until: float) -> Renewal: ...

    def release(self, job_id: str, owner: str) -> None: ...

    def cancel(self, job_id: str, now: float) -> bool: ...

    def pending(self, now: float) -> int: ...

    def delete(self, job_id: str) -> None: ...

    def get(self, job_id: str) -> JobRow[S] | None: ...

    def summary(self, job_id: str) -> JobSummary | None: ...

    def summaries(self, oldest_first: bool = False) -> list[JobSummary]: ...

    def read_history(
        self, job_id: str, chunk: int, networks: int, steps: int, lo: int, hi: int, out: np.ndarray
    ) -> None:
        """Networks [lo, hi) of the chunk's history (of `networks` x `steps`) into `out`."""
        ...


ACTIVE = ("pending", "running")


@dataclass
class _Entry(Generic[S]):
    summary: JobSummary
    spec: S
    checkpoint: bytes | None = None
    cancel_asked: bool = False
    history: dict[tuple[int, int], np.ndarray] | None = None


class MemoryJobStore(Generic[S]):
    """A JobStore in this process's memory: for jobs that live and die with it (nothing is
    resumed from it, so only a job's last checkpoint is kept)."""

    resumable = False
    transient: tuple[type[BaseException], ...] = (MemoryError,)

    def __init__(self) -> None:
        self._jobs: dict[str, _Entry[S]] = {}  # in submission order
        self._lock = threading.Lock()

    def check_fits(self, spec: S, run: TrainingRun) -> None:
        pass  # nothing is serialized

    def insert(self, job_id: str, spec: S, progress: Progress) -> float:
        created = time.time()
        with self._lock:
            self._jobs[job_id] = _Entry(JobSummary(job_id, "pending", "", created, progress), spec)
        return created

    def _held(self, job_id: str, owner: str | None) -> _Entry[S] | None:
        entry = self._jobs.get(job_id)
        if entry is None or (owner is not None and entry.summary.lease_owner != owner):
            return None
        return entry

    def _set(self, entry: _Entry[S], owner: str | None, **changes: object) -> None:
        if owner is not None and changes.get("status") not in (None, *ACTIVE):
            changes |= {"lease_owner": "", "lease_expires": 0.0}
        entry.summary = replace(entry.summary, **changes)  # type: ignore[arg-type]

    def checkpoint(
        self,
        job_id: str,
        blob: bytes | None,
        progress: Progress,
        history: Sequence[HistorySegment] = (),
        status: str = "running",
        error: str = "",
        owner: str | None = None,
    ) -> bool:
        with self._lock:
            entry = self._held(job_id, owner)
            if entry is None:
                return False
            if blob is not None:
                entry.checkpoint = blob
            entry.history = entry.history or {}
            for s in history:
                entry.history[(s.chunk, s.first)] = s.losses
            self._set(entry, owner, status=status, error=error, progress=progress)
            return True

    def set_status(
        self, job_id: str, status: str, error: str = "", owner: str | None = None
    ) -> bool:
        with self._lock:
            entry = self._held(job_id, owner)
            if entry is None:
                return False
            self._set(entry, owner, status=status, error=error)
            return True

    def claim(self, owner: str, now: float, until: float) -> JobSummary | None:
        with self._lock:
            for entry in self._jobs.values():
                s = entry.summary
                if s.status in ACTIVE and s.lease_expires < now:
                    entry.summary = replace(s, lease_owner=owner, lease_expires=until)
                    return entry.summary
        return None

    def renew(self, job_id: str, owner: str, until: float) -> Renewal:
        with self._lock:
            entry = self._held(job_id, owner)
            if entry is None:
                return Renewal.LOST
            entry.summary = replace(entry.summary, lease_expires=until)
            return Renewal.CANCEL if entry.cancel_asked else Renewal.HELD

    def release(self, job_id: str, owner: str) -> None:
        with self._lock:
            entry = self._held(job_id, owner)
            if entry is not None:
                entry.summary = replace(entry.summary, lease_owner="", lease_expires=0.0)

    def cancel(self, job_id: str, now: float) -> bool:
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None or entry.summary.status not in ACTIVE:
                return False
            if entry.summary.lease_expires < now:
                self._set(entry, None, status="cancelled", error="", lease_owner="")
            else:
                entry.cancel_asked = True
            return True

    def pending(self, now: float) -> int:
        with self._lock:
            return sum(
                e.summary.status == "pending" and e.summary.lease_expires < now
                for e in self._jobs.values()
            )

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def get(self, job_id: str) -> JobRow[S] | None:
        with self._lock:
            entry = self._jobs.get(job_id)
        return None if entry is None else JobRow(entry.summary, entry.spec, entry.checkpoint)

    def summary(self, job_id: str) -> JobSummary | None:
        with self._lock:
            entry = self._jobs.get(job_id)
        return None if entry is None else entry.summary

    def summaries(self, oldest_first: bool = False) -> list[JobSummary]:
        with self._lock:
            rows = [e.summary for e in self._jobs.values()]
        return rows if oldest_first else rows[::-1]

    def read_history(
        self, job_id: str, chunk: int, networks: int, steps: int, lo: int, hi: int, out: np.ndarray
    ) -> None:
        with self._lock:
            entry = self._jobs.get(job_id)
            segments = dict(entry.history or {}) if entry is not None else {}
        for (c, first), losses in segments.items():
            if c == chunk:
                out[:, first : first + losses.shape[1]] = losses[lo:hi]
