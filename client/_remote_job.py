"""Training jobs on a graphgrad server: the same Job API, over the JobService."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from graphgrad import wire
from graphgrad._aio import AsyncJob
from graphgrad._job_display import ProgressBar, job_html, job_repr
from graphgrad.engine import GraphError, JobStatus, JobView, Progress, ResultPart, join_parts
from graphgrad.v1 import jobs_pb2


class JobCalls(Protocol):
    """What a handle needs of its connection (RemoteClient has it): JobService calls, with
    errors as RemoteError."""

    def job_call(self, method: str, request: Any, timeout: float | None = None) -> Any: ...

    def job_stream(self, method: str, request: Any, timeout: float | None = None) -> Any: ...


class RemoteJob(AsyncJob):
    """A job on a graphgrad server (it keeps running, and survives, without this handle)."""

    def __init__(self, client: JobCalls, job_id: str, templates: int) -> None:
        self.id = job_id
        self._client = client
        self._templates = templates
        self._results: tuple[list[dict[str, np.ndarray]], np.ndarray] | None = None

    def _info(self) -> JobView:
        return wire.decode_job_info(
            self._client.job_call("GetJob", jobs_pb2.GetJobRequest(id=self.id)).job
        )

    @property
    def status(self) -> JobStatus:
        return self._info().status

    @property
    def progress(self) -> Progress:
        return self._info().progress

    @property
    def done(self) -> bool:
        return self.status.terminal

    def cancel(self) -> None:
        self._client.job_call("CancelJob", jobs_pb2.CancelJobRequest(id=self.id))

    def delete(self) -> None:
        """Remove the job from the server (cancelled first if it runs), with its results."""
        self._client.job_call("DeleteJob", jobs_pb2.DeleteJobRequest(id=self.id))
        self._results = None

    def wait(self, progress: bool = True, timeout: float | None = None) -> RemoteJob:
        """Follow the job's progress stream until it ends (a progress bar unless disabled)."""
        info = self._info()
        bar = ProgressBar(info.progress.steps, self.id) if progress else None
        try:
            request = jobs_pb2.WatchJobRequest(id=self.id)
            for event in self._client.job_stream("WatchJob", request, timeout):
                info = wire.decode_job_info(event.job)
                if bar is not None:
                    bar.show(info.progress)
        finally:
            if bar is not None:
                bar.close(info.status, info.progress)
        if info.status == JobStatus.FAILED:
            raise GraphError(f"job {self.id} failed: {info.error}")
        return self

    def _parts(self) -> Iterator[ResultPart]:
        request = jobs_pb2.GetJobResultsRequest(id=self.id)
        for msg in self._client.job_stream("GetJobResults", request):
            yield wire.decode_result_part(msg)

    def _fetch(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        if self._results is None:
            self._results = join_parts(self._parts(), self._templates)
        return self._results

    def _repr_html_(self) -> str:
        info = self._info()
        return job_html(self.id, info.status, info.progress)

    def __repr__(self) -> str:
        info = self._info()
        return job_repr("RemoteJob", self.id, info.status, info.progress)
