"""The durable job store: an embedded SQLite database in the server's data directory, the
server's implementation of the engine's JobStore (engine/job_store.py).

A job's row is written only once the job is built and checked, and its progress only with
the checkpoint that carries it, in one transaction with the history rows of the steps it
covers (write-ahead log, synchronous commits: what was reported survives a crash). Each
checkpoint holds parameters and optimizer state; the loss history is appended per segment
to its own table, so the bytes written per checkpoint do not grow with the job's length.
Specs are protobuf bytes, checkpoints .npz arrays, history raw float64: nothing read back is
ever unpickled.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from graphgrad.engine.errors import LimitError
from graphgrad.engine.job_store import LONGEST_LEASE_S, JobRow, JobSummary, Renewal
from graphgrad.engine.training_run import HistorySegment, Progress, TrainingRun

__all__ = ["JobRow", "JobStore", "JobSummary", "Renewal", "StoreError"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,          -- SubmitJobRequest, serialized protobuf
    status TEXT NOT NULL,        -- pending | running | done | cancelled | failed
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    checkpoint BLOB,             -- latest TrainingRun.checkpoint(): .npz bytes
    steps_done INTEGER NOT NULL DEFAULT 0
);
"""
# Version 1: progress beside each checkpoint, and the history in rows of its own.
MIGRATIONS = [
    """
    ALTER TABLE jobs ADD COLUMN steps INTEGER;
    ALTER TABLE jobs ADD COLUMN networks INTEGER;
    ALTER TABLE jobs ADD COLUMN networks_done INTEGER;
    ALTER TABLE jobs ADD COLUMN loss_median REAL;
    ALTER TABLE jobs ADD COLUMN loss_best REAL;
    ALTER TABLE jobs ADD COLUMN loss_worst REAL;
    CREATE TABLE history (
        job_id TEXT NOT NULL,
        chunk INTEGER NOT NULL,
        first INTEGER NOT NULL,
        networks INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        losses BLOB NOT NULL,    -- [networks, steps] float64, little-endian, row-major
        PRIMARY KEY (job_id, chunk, first)
    );
    """,
    # Version 2: networks whose latest loss is NaN or infinite.
    "ALTER TABLE jobs ADD COLUMN networks_nonfinite INTEGER",
    # Version 3: the lease of the process running the job ("HOST:PID", until when, in
    # time.time() seconds; '' and 0: free) and a cancel asked of it by another process.
    """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN lease_expires REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN cancel_asked INTEGER NOT NULL DEFAULT 0
    """,
]
# How long a write waits for another process's transaction (the workers of a server share
# the store) before it fails: a checkpoint that fails fails its job, so never a short wait.
BUSY_SECONDS = 60.0
# SQLite's default SQLITE_MAX_LENGTH: no blob (checkpoint, spec, segment) may be longer.
MAX_BLOB_BYTES = 1_000_000_000
PROGRESS = (
    "steps_done, steps, networks, networks_done, loss_median, loss_best, loss_worst, "
    "networks_nonfinite"
)
SUMMARY = f"id, status, error, created, {PROGRESS}, lease_owner, lease_expires"
# A job a process may take: not ended, and its lease free or expired (its holder died), or
# ending further away than any lease lasts (LONGEST_LEASE_S); parameters: now and
# _far(now). A lease_expires that is not a number reads as 0, free, here as in _summary
# (SQLite would order text after every number: a corrupt lease would hold its job forever).
FREE_LEASE = "NOT CAST(lease_expires AS REAL) BETWEEN ? AND ?"
CLAIMABLE = f"status IN ('pending', 'running') AND {FREE_LEASE}"


class StoreError(RuntimeError):
    """The job store cannot be used (not a SQLite database, unreadable, a newer schema)."""


def _progress(row: Sequence[Any]) -> Progress | None:
    """None: a row from before progress was stored, or whose progress is not numbers (a
    corrupt row reads as a job without progress; its spec and checkpoint are what it runs)."""
    if any(v is None for v in row[:4]):
        return None
    nan = lambda v: math.nan if v is None else float(v)  # noqa: E731  SQLite stores NaN as NULL
    try:
        i = [int(v) for v in row[:4]]
        nonfinite = int(row[7] or 0)  # NULL in a row from before version 2
        return Progress(i[0], i[1], i[2], i[3], nan(row[4]), nan(row[5]), nan(row[6]), nonfinite)
    except (TypeError, ValueError, OverflowError):
        return None


def _far(now: float) -> float:
    """Where a lease ends that no process could have taken at `now`."""
    return now + LONGEST_LEASE_S


def _seconds(value: Any) -> float:
    """A stored time; one that is not a number reads as 0 (a lease: free), as CLAIMABLE."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class JobStore:
    """Shared by every process of a server (and by servers sharing a data directory): each
    job is run by the one process holding its lease, taken in one transaction and renewed by
    the holder's heartbeat; every write of a running job's state is fenced by that lease."""

    resumable = True  # any process (or this server restarted) resumes a job from here
    transient: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, MemoryError)

    def __init__(self, path: Path, max_blob_bytes: int = MAX_BLOB_BYTES) -> None:
        self.max_blob_bytes = max_blob_bytes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(path), BUSY_SECONDS, check_same_thread=False, isolation_level=None
            )
            self._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_blob_bytes)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a reported checkpoint survives a crash
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"the job store {path} cannot be used: {e}") from e
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(f"schema version {version} is newer than this server's")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript would commit half-way.
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            for script in MIGRATIONS[version:]:
                for stmt in script.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def check_fits(self, spec: bytes, run: TrainingRun) -> None:
        """The spec and every checkpoint must fit a blob (the job's whole size from N x steps
        is checked against max_request_bytes by the spec decoder)."""
        # A checkpoint's size never changes: parameters and optimizer state.
        for what, size in (("spec", len(spec)), ("checkpoint", len(run.checkpoint()))):
            if size > self.max_blob_bytes:
                raise LimitError(
                    f"the job's {what} takes {size} bytes, over the store's blob limit "
                    f"max_blob_bytes={self.max_blob_bytes}",
                    limit="max_blob_bytes",
                )

    def insert(self, job_id: str, spec: bytes, progress: Progress) -> float:
        created = time.time()
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO jobs (id, spec, status, created, {PROGRESS}) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, spec, created, *_values(progress)),
            )
        return created

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
        """The job's state, the history of the steps it covers and its status in one
        transaction: none is ever seen without the others (`blob` None: the stored
        checkpoint is kept). With an `owner`, written only
        while it holds the job's lease (released with an ending status). False: nothing was
        written (the job was deleted, or its lease is another's)."""
        fence, lease = _fence(owner, status)
        with self._transaction() as db:
            found = db.execute(
                "UPDATE jobs SET checkpoint = COALESCE(?, checkpoint), status = ?, error = ?, "
                f"{lease}({PROGRESS}) = (?, ?, ?, ?, ?, ?, ?, ?) WHERE id = ?{fence}",
                (blob, status, error, *_values(progress), job_id, *_owner(owner)),
            ).rowcount
            if found:  # a deleted job's last writes change nothing
                db.executemany(
                    "INSERT OR REPLACE INTO history "
                    "(job_id, chunk, first, networks, steps, losses) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (job_id, s.chunk, s.first, *s.losses.shape, _f64(s.losses).tobytes())
                        for s in history
                    ],
                )
        return bool(found)

    def set_status(
        self, job_id: str, status: str, error: str = "", owner: str | None = None
    ) -> bool:
        """A status without a checkpoint: for a job that starts, or that failed before or
        while writing one. `owner` and the result as for `checkpoint`."""
        fence, lease = _fence(owner, status)
        with self._transaction() as db:
            return bool(
                db.execute(
                    f"UPDATE jobs SET {lease}status = ?, error = ? WHERE id = ?{fence}",
                    (status, error, job_id, *_owner(owner)),
                ).rowcount
            )

    # --- leases ----------------------------------------------------------------------------

    def claim(self, owner: str, now: float, until: float) -> JobSummary | None:
        """Take the lease of the oldest job that is not ended and whose lease is free or
        expired, for `owner` until `until`: the job taken, or None. One transaction (BEGIN
        IMMEDIATE: one writer at a time across processes), so each lease has one holder."""
        with self._transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE {CLAIMABLE} ORDER BY rowid LIMIT 1",
                (now, _far(now)),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET lease_owner = ?, lease_expires = ? WHERE id = ?",
                (owner, until, row[0]),
            )
            taken = db.execute(f"SELECT {SUMMARY} FROM jobs WHERE id = ?", row).fetchone()
        return _summary(taken)

    def renew(self, job_id: str, owner: str, until: float) -> Renewal:
        """The holder's heartbeat: its lease extended to `until`, and whether another process
        asked for the job to be cancelled."""
        with self._transaction() as db:
            found = db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ?",
                (until, job_id, owner),
            ).rowcount
            if not found:
                return Renewal.LOST
            asked = db.execute("SELECT cancel_asked FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Renewal.CANCEL if asked and asked[0] else Renewal.HELD

    def release(self, job_id: str, owner: str) -> None:
        """Give up a job's lease without ending it (a process stopping): any process may
        take it at once, resuming it from its last checkpoint."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET lease_owner = '', lease_expires = 0 "
                "WHERE id = ? AND lease_owner = ?",
                (job_id, owner),
            )

    def cancel(self, job_id: str, now: float) -> bool:
        """Cancel a job that no live process holds (pending, or its holder died) at once;
        for one that is held, ask its holder (its heartbeat sees it). False: it has ended or
        is not there."""
        with self._transaction() as db:
            ended = db.execute(
                "UPDATE jobs SET status = 'cancelled', error = '', lease_owner = '', "
                f"lease_expires = 0 WHERE id = ? AND {CLAIMABLE}",
                (job_id, now, _far(now)),
            ).rowcount
            if ended:
                return True
            return bool(
                db.execute(
                    "UPDATE jobs SET cancel_asked = 1 "
                    "WHERE id = ? AND status IN ('pending', 'running')",
                    (job_id,),
                ).rowcount
            )

    def pending(self, now: float) -> int:
        """Jobs waiting for a process to take them (pending, and no live process holds them)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT count(*) FROM jobs WHERE status = 'pending' AND {FREE_LEASE}",
                (now, _far(now)),
            ).fetchone()
        return int(row[0])

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM history WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {SUMMARY}, spec, checkpoint FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return JobRow(_summary(row), bytes(row[14]), None if row[15] is None else bytes(row[15]))

    def summary(self, job_id: str) -> JobSummary | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {SUMMARY} FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        return None if row is None else _summary(row)

    def summaries(self, oldest_first: bool = False) -> list[JobSummary]:
        """Every job, newest first (or in submission order)."""
        order = "ASC" if oldest_first else "DESC"
        with self._lock:
            rows = self._db.execute(f"SELECT {SUMMARY} FROM jobs ORDER BY rowid {order}").fetchall()
        return [_summary(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {str(status): int(n) for status, n in rows}

    def read_history(
        self, job_id: str, chunk: int, networks: int, steps: int, lo: int, hi: int, out: np.ndarray
    ) -> None:
        """Writes networks [lo, hi) of the chunk's history rows (of `networks` x `steps` in
        all) into `out` [hi - lo, steps]: one row's byte range at a time, so no more than
        `out` is ever held."""
        with self._lock:
            rows = self._db.execute(
                "SELECT first, networks, steps, length(losses), typeof(losses) FROM history "
                "WHERE job_id = ? AND chunk = ?",
                (job_id, chunk),
            ).fetchall()
        for first, n, k, size, kind in rows:
            if kind != "blob" or n != networks or size != 8 * n * k or not 0 <= first <= steps - k:
                raise ValueError(
                    f"history row ({chunk}, {first}) must hold {networks} networks x at most "
                    f"{steps - first} steps of float64, got {n}x{k} in {size} bytes ({kind})"
                )
            with self._lock:
                found = self._db.execute(
                    "SELECT substr(losses, ?, ?) FROM history "
                    "WHERE job_id = ? AND chunk = ? AND first = ?",
                    (8 * k * lo + 1, 8 * k * (hi - lo), job_id, chunk, first),
                ).fetchone()
            if found is None:
                raise ValueError(f"history row ({chunk}, {first}) was deleted while read")
            out[:, first : first + k] = np.frombuffer(found[0], "<f8").reshape(hi - lo, k)

    def close(self) -> None:
        self._db.close()


def _summary(row: Sequence[Any]) -> JobSummary:
    return JobSummary(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        _seconds(row[3]),
        _progress(row[4:12]),
        str(row[12]),
        _seconds(row[13]),
    )


def _fence(owner: str | None, status: str) -> tuple[str, str]:
    """(the WHERE clause that fences a holder's write by its lease, the SET clause that
    releases the lease with an ending status)."""
    if owner is None:
        return "", ""
    ended = status not in ("pending", "running")
    return " AND lease_owner = ?", "lease_owner = '', lease_expires = 0, " if ended else ""


def _owner(owner: str | None) -> tuple[str, ...]:
    return () if owner is None else (owner,)


def _values(p: Progress) -> tuple[object, ...]:
    return (
        p.steps_done,
        p.steps,
        p.networks,
        p.networks_done,
        p.loss_median,
        p.loss_best,
        p.loss_worst,
        p.networks_nonfinite,
    )


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype="<f8")
