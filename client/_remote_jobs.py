"""Training jobs on a graphgrad server: the same Job API, over the JobService."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _wire
from ._aio import AsyncJob
from ._jobs import ProgressBar, job_html, job_repr, plot_history
from .engine import GraphError
from .engine.dispatch import check_executor
from .engine.jobs import Progress
from .engine.training import SGD, Optimizer, TrainSpec
from .v1 import jobs_pb2

if TYPE_CHECKING:
    from ._remote import RemoteClient

STATUS = {
    jobs_pb2.JOB_STATUS_PENDING: "pending",
    jobs_pb2.JOB_STATUS_RUNNING: "running",
    jobs_pb2.JOB_STATUS_DONE: "done",
    jobs_pb2.JOB_STATUS_CANCELLED: "cancelled",
    jobs_pb2.JOB_STATUS_FAILED: "failed",
}


def encode_job(
    specs: Sequence[TrainSpec],
    optimizer: Optimizer,
    steps: int,
    batch_size: int | None,
    seed: int,
    executor: str,
) -> jobs_pb2.SubmitJobRequest:
    check_executor(executor, field="executor")
    req = jobs_pb2.SubmitJobRequest(
        steps=steps, batch_size=batch_size or 0, seed=seed, executor=_wire.EXECUTORS[executor]
    )
    if isinstance(optimizer, SGD):
        req.optimizer.sgd.lr, req.optimizer.sgd.momentum = optimizer.lr, optimizer.momentum
    else:
        a = req.optimizer.adam
        a.lr, a.beta1, a.beta2, a.eps = (
            optimizer.lr,
            optimizer.beta1,
            optimizer.beta2,
            optimizer.eps,
        )
    for spec in specs:
        t = req.templates.add(loss=spec.loss)
        t.graph.CopyFrom(_wire.wire_graph(spec.template))
        _wire.fill_tensors(spec.params, t.params)
        _wire.fill_tensors(spec.data, t.data)
    return req


def read_progress(info: jobs_pb2.JobInfo) -> Progress:
    return Progress(
        info.steps_done,
        info.steps,
        info.networks,
        info.networks_done,
        info.loss_median,
        info.loss_best,
        info.loss_worst,
        info.networks_nonfinite,
    )


class RemoteJob(AsyncJob):
    """A job on a graphgrad server (it keeps running, and survives, without this handle)."""

    def __init__(self, client: RemoteClient, job_id: str, templates: int) -> None:
        self.id = job_id
        self._client = client
        self._templates = templates
        self._results: tuple[list[dict[str, np.ndarray]], np.ndarray] | None = None

    def _info(self) -> jobs_pb2.JobInfo:
        return self._client.job_call("GetJob", jobs_pb2.GetJobRequest(id=self.id)).job

    @property
    def status(self) -> str:
        return STATUS.get(self._info().status, "unknown")

    @property
    def progress(self) -> Progress:
        return read_progress(self._info())

    @property
    def done(self) -> bool:
        return self.status in ("done", "cancelled", "failed")

    def cancel(self) -> None:
        self._client.job_call("CancelJob", jobs_pb2.CancelJobRequest(id=self.id))

    def delete(self) -> None:
        """Remove the job from the server (cancelled first if it runs), with its results."""
        self._client.job_call("DeleteJob", jobs_pb2.DeleteJobRequest(id=self.id))
        self._results = None

    def wait(self, progress: bool = True, timeout: float | None = None) -> RemoteJob:
        """Follow the job's progress stream until it ends (a progress bar unless disabled)."""
        info = self._info()
        bar = ProgressBar(info.steps, self.id) if progress else None
        try:
            request = jobs_pb2.WatchJobRequest(id=self.id)
            for event in self._client.job_stream("WatchJob", request, timeout):
                info = event.job
                if bar is not None:
                    bar.show(read_progress(info))
        finally:
            if bar is not None:
                bar.close(STATUS.get(info.status, "unknown"), read_progress(info))
        if info.status == jobs_pb2.JOB_STATUS_FAILED:
            raise GraphError(f"job {self.id} failed: {info.error}")
        return self

    def _fetch(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        if self._results is None:
            parts: list[dict[str, list[tuple[int, np.ndarray]]]] = [
                {} for _ in range(self._templates)
            ]
            request = jobs_pb2.GetJobResultsRequest(id=self.id)
            for part in self._client.job_stream("GetJobResults", request):
                key = part.name if part.kind == "params" else "\\0history"
                parts[part.template].setdefault(key, []).append(
                    (part.first, _wire.read_tensor(part.value))
                )
            joined = [
                {
                    k: np.concatenate([v for _, v in sorted(pieces, key=lambda p: p[0])])
                    for k, pieces in t.items()
                }
                for t in parts
            ]
            history = np.concatenate([t.pop("\\0history") for t in joined])
            self._results = (joined, history)
        return self._results

    @property
    def params(self) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        params = self._fetch()[0]
        return params[0] if len(params) == 1 else params

    @property
    def history(self) -> np.ndarray:
        return self._fetch()[1]

    def plot(self, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
        return plot_history(self.history, networks, ax)

    def _repr_html_(self) -> str:
        info = self._info()
        return job_html(self.id, STATUS.get(info.status, "unknown"), read_progress(info))

    def __repr__(self) -> str:
        info = self._info()
        return job_repr(
            "RemoteJob", self.id, STATUS.get(info.status, "unknown"), read_progress(info)
        )
