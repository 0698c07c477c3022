"""The server's job manager: the engine's one job lifecycle (engine/job_manager.py) on the
durable SQLite store, with every change of a job's state logged (server/logs.py) and its
durable training steps counted (server/metrics.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.job_manager import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_QUEUED,
    TERMINAL,
    Decoder,
)
from graphgrad.engine.job_manager import JobManager as EngineJobManager
from graphgrad.server import metrics
from graphgrad.server.limits import one_per_cpu
from graphgrad.server.logs import log_job_change, worker_id
from graphgrad.server.store import JobStore

__all__ = ["DEFAULT_LEASE_SECONDS", "DEFAULT_MAX_QUEUED", "TERMINAL", "JobManager"]


class JobManager(EngineJobManager[bytes]):
    """Jobs whose specs are SubmitJobRequest bytes, run by this server process (named as the
    wire names it, "HOST:PID") and any other sharing its store."""

    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        decode: Decoder[bytes],
        max_running: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        read: Decoder[bytes] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            store,
            dispatcher,
            decode,
            max_running or one_per_cpu(),
            max_queued,
            read,
            lease_seconds,
            owner or worker_id(),
            clock,
            on_change=log_job_change,
            on_steps=metrics.add_training_steps,
            logger=logging.getLogger("graphgrad.jobs"),
        )
        self.store: JobStore = store
