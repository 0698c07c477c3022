"""The durable job store: an embedded SQLite database in the server's data directory.

A job's spec is stored when it is submitted and its checkpoints as it trains, each written
(and committed) before the progress it carries is reported. Specs are protobuf bytes and
checkpoints .npz arrays: nothing read back is ever unpickled.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class JobRow:
    id: str
    spec: bytes
    status: str
    error: str
    created: float
    checkpoint: bytes | None
    steps_done: int


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a reported checkpoint survives a crash
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def insert(self, job_id: str, spec: bytes) -> float:
        created = time.time()
        self._write(
            "INSERT INTO jobs (id, spec, status, created) VALUES (?, ?, 'pending', ?)",
            (job_id, spec, created),
        )
        return created

    def checkpoint(
        self, job_id: str, blob: bytes, steps_done: int, status: str = "running", error: str = ""
    ) -> None:
        """The job's state and its status in one write: the last one (done, cancelled,
        failed) can never be seen without the other."""
        self._write(
            "UPDATE jobs SET checkpoint = ?, steps_done = ?, status = ?, error = ? WHERE id = ?",
            (blob, steps_done, status, error, job_id),
        )

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, spec, status, error, created, checkpoint, "
                "steps_done FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        return None if row is None else JobRow(*row)

    def ids(self, statuses: tuple[str, ...] | None = None) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id, status FROM jobs ORDER BY created DESC").fetchall()
        return [i for i, s in rows if statuses is None or s in statuses]

    def close(self) -> None:
        self._db.close()
