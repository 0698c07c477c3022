"""Training jobs in the SDK: `client.train(...)` returns a `Job` to watch, cancel and read."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphgrad._aio import AsyncJob
from graphgrad._builder import Tensor
from graphgrad.engine import (
    Graph,
    JobStatus,
    Optimizer,
    Progress,
    RequestError,
    Session,
    TrainSpec,
    check_settings,
    join_parts,
    within,
)

ArrayMap = Mapping[str, Any]


def build_specs(
    loss: Tensor | Sequence[Tensor],
    params: ArrayMap | Sequence[ArrayMap],
    data: ArrayMap | Sequence[ArrayMap] | None,
    optimizer: Optimizer,
    steps: int,
    batch_size: int | None,
    seed: int,
) -> list[TrainSpec]:
    """One spec per template; `params`/`data` are given per template (or data once for all)."""
    losses = [loss] if isinstance(loss, Tensor) else list(loss)
    param_list = [params] if isinstance(params, Mapping) else list(params)
    data_list = (
        [data or {}] * len(losses) if data is None or isinstance(data, Mapping) else list(data)
    )
    if not len(losses) == len(param_list) == len(data_list):
        raise RequestError(
            f"{len(losses)} losses but {len(param_list)} params and "
            f"{len(data_list)} data mappings: give one per template",
            field="templates",
        )
    check_settings(optimizer, steps, batch_size, seed)
    specs = []
    for k, (L, p, d) in enumerate(zip(losses, param_list, data_list, strict=True)):
        graph = L.graph.freeze()
        with within(f"templates[{k}]"):
            specs.append(
                TrainSpec.build(
                    graph,
                    L.name,
                    {n: _array(graph, "params", n, v) for n, v in p.items()},
                    {n: _array(graph, "data", n, v) for n, v in d.items()},
                    optimizer,
                    steps,
                    batch_size,
                    seed,
                )
            )
    return specs


def _array(graph: Graph, kind: str, name: str, value: Any) -> np.ndarray:
    """Arrays as given; anything else (lists, numbers) in the dtype of the input it feeds."""
    if isinstance(value, np.ndarray):
        return value
    i = graph.index.get(name)
    try:
        return np.asarray(value, dtype=None if i is None else graph.types[i].dtype)
    except (TypeError, ValueError) as e:
        raise RequestError(
            f"{kind} '{name}' is not an array of numbers: {e}", field=f"{kind}['{name}']"
        ) from e


class Job(AsyncJob):
    """A training job: many networks trained together, in the background (a handle on a
    job of the client's Session).

    `status` is "running", "done", "cancelled" or "failed"; `params` and `history` are the
    results ([N, ...] per parameter, and the loss [N, steps]); with several templates,
    `params` is a list with one mapping per template, in the order given.
    """

    def __init__(self, session: Session, job_id: str) -> None:
        self.id = job_id
        self._session = session
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
        return self._session.job(self.id).chunks

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
        bar = progress_bar(job.run.steps, self.id) if progress else None
        try:
            for view in self._session.watch(self.id):
                if bar is not None:
                    show_progress(bar, view.progress)
                if deadline is not None and time.monotonic() > deadline and not job.ended.is_set():
                    raise TimeoutError(f"job {self.id} still running after {timeout}s")
        finally:
            if bar is not None:
                bar.close()
        if job.error is not None:
            raise job.error
        return self

    def _fetch(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        if self._results is None:
            job = self._session.job(self.id)
            results = join_parts(self._session.results(self.id), job.templates)
            if not job.ended.is_set():  # still training: read again next time
                return results
            self._results = results
        return self._results

    @property
    def params(self) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        params = self._fetch()[0]
        return params[0] if len(params) == 1 else params

    @property
    def history(self) -> np.ndarray:
        return self._fetch()[1]

    def plot(self, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
        """Loss curves: the median and the 10-90% band across networks, or chosen networks.
        Needs matplotlib (pip install graphgrad[plot])."""
        return plot_history(self.history, networks, ax)

    def _repr_html_(self) -> str:
        view = self._session.job(self.id).view()
        return job_html(self.id, view.status, view.progress)

    def __repr__(self) -> str:
        view = self._session.job(self.id).view()
        p = view.progress
        return (
            f"<graphgrad.Job {self.id} {view.status}: step {p.steps_done}/{p.steps}, "
            f"{p.networks} networks, median loss {p.loss_median:.4g}>"
        )


def job_html(job_id: str, status: str, p: Progress) -> str:
    pct = 100 * p.steps_done / max(p.steps, 1)
    return (
        f"<div><b>job {html.escape(job_id)}</b>: {html.escape(status)}, {p.networks} "
        f"networks<div style='background:#eee;width:240px;height:10px'><div style='"
        f"background:#4c9be8;width:{pct:.0f}%;height:10px'></div></div>"
        f"step {p.steps_done}/{p.steps} · median loss {p.loss_median:.4g} · best "
        f"{p.loss_best:.4g} · worst {p.loss_worst:.4g}</div>"
    )


def plot_history(h: np.ndarray, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("Job.plot needs matplotlib: pip install 'graphgrad[plot]'") from e
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    steps = np.arange(1, h.shape[1] + 1)
    if networks is None:
        lo, med, hi = np.nanpercentile(h, [10, 50, 90], axis=0)
        ax.fill_between(steps, lo, hi, alpha=0.3, label="10-90% of networks")
        ax.plot(steps, med, label=f"median of {len(h)} networks")
    else:
        for j in networks:
            ax.plot(steps, h[j], label=f"network {j}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    return ax


def progress_bar(total: int, job_id: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc=f"job {job_id}")


def show_progress(bar: Any, p: Progress) -> None:
    bar.update(p.steps_done - bar.n)
    if np.isfinite(p.loss_median):
        bar.set_postfix(loss=f"{p.loss_median:.4g}", refresh=False)


__all__ = ["Job", "build_specs"]
