"""The handle of an in-process training job: `LocalClient.train(...)` returns a `Job` to
watch, cancel and read (the job itself runs in the client's engine Session)."""

from __future__ import annotations

import time

import numpy as np

from graphgrad._aio import AsyncJob
from graphgrad._job_display import ProgressBar, job_html, job_repr
from graphgrad.engine import (
    JobStatus,
    Progress,
    Session,
    join_parts,
)


class Job(AsyncJob):
    """A training job: many networks trained together, in the background (a handle on a
    job of the client's Session).

    `status` is "pending" (until its thread has built it: a moment), "running", "done",
    "cancelled" or "failed"; `params` and `history` are the results ([N, ...] per parameter,
    and the loss [N, steps]; while it runs, the parameters now and the history as of its
    last segment); with several templates, `params` is a list with one mapping per
    template, in the order given. A job that failed raises its own exception from `wait`.
    """

    def __init__(self, session: Session, job_id: str, templates: int) -> None:
        self.id = job_id
        self._session = session
        self._templates = templates
        self._results: tuple[list[dict[str, np.ndarray]], np.ndarray] | None = None

    @property
    def status(self) -> JobStatus:
        return self._session.job(self.id).status

    @property
    def progress(self) -> Progress:
        return self._session.job(self.id).view().progress

    @property
    def done(self) -> bool:
        return self._session.job(self.id).ended.is_set()

    @property
    def chunks(self) -> list[int]:
        """How many chunks each stacked group of networks was cut into (networks of
        templates that differ only in their arrays are stacked in one group)."""
        return list(self._session.job(self.id).layout)

    def cancel(self) -> None:
        """Stop the job (its tasks are cancelled); `wait` then returns with status cancelled."""
        self._session.cancel(self.id)

    def delete(self) -> None:
        """Cancel the job if it runs and drop its results (as DeleteJob does on a server)."""
        self._session.delete(self.id)
        self._results = None

    def wait(self, progress: bool = True, timeout: float | None = None) -> Job:
        """Block until the job ends, with a progress bar (tqdm.auto) unless progress=False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._session.job(self.id)
        bar = ProgressBar(job.view().progress.steps, self.id) if progress else None
        try:
            for view in self._session.watch(self.id, interval=0.1):
                if bar is not None:
                    bar.show(view.progress)
                if deadline is not None and time.monotonic() > deadline and not job.ended.is_set():
                    raise TimeoutError(f"job {self.id} still running after {timeout}s")
        finally:
            if bar is not None:
                bar.close(job.status, job.view().progress)
        if job.exception is not None:
            raise job.exception
        return self

    def _fetch(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        if self._results is None:
            job = self._session.job(self.id)
            results = join_parts(self._session.results(self.id), self._templates)
            if not job.ended.is_set():  # still training: read again next time
                return results
            self._results = results
        return self._results

    def _repr_html_(self) -> str:
        view = self._session.job(self.id).view()
        return job_html(self.id, view.status, view.progress)

    def __repr__(self) -> str:
        view = self._session.job(self.id).view()
        return job_repr("Job", self.id, view.status, view.progress)
