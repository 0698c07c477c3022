"""Training jobs in the SDK: `client.train(...)` returns a `Job` to watch, cancel and read."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._aio import AsyncJob
from ._builder import Tensor
from .engine import Cancellation, CancelledError, Graph, RequestError
from .engine.jobs import Placement, Progress, SegmentRunner, TrainingRun, group_specs
from .engine.training import SGD, Optimizer, TrainSpec, check_settings, within

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
    """A training job: many networks trained together, in the background.

    `status` is "running", "done", "cancelled" or "failed"; `params` and `history` are the
    results ([N, ...] per parameter, and the loss [N, steps]); with several templates,
    `params` is a list with one mapping per template, in the order given.
    """

    def __init__(self, run: TrainingRun, placement: list[Placement], job_id: str) -> None:
        self.id = job_id
        self._run = run
        self._placement = placement
        self._cancel = Cancellation()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._status = "running"
        self._deleted = False
        self._thread = threading.Thread(target=self._work, name=f"job-{job_id}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._run.run(self._cancel)
            self._status = "done"
        except CancelledError:
            self._status = "cancelled"
        except BaseException as e:  # reported through .status and .wait()
            self._error = e
            self._status = "failed"
        finally:
            self._done.set()

    @property
    def status(self) -> str:
        return self._status

    @property
    def progress(self) -> Progress:
        return self._run.progress()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the job (its tasks are cancelled); `wait` then returns with status cancelled."""
        self._cancel.cancel()

    def delete(self) -> None:
        """Cancel the job if it runs and drop its results (as DeleteJob does on a server)."""
        self._cancel.cancel()
        self._thread.join()
        self._deleted = True

    def _results(self) -> TrainingRun:
        if self._deleted:
            raise RequestError(f"job {self.id} was deleted: it has no results", field="id")
        return self._run

    def wait(self, progress: bool = True, timeout: float | None = None) -> Job:
        """Block until the job ends, with a progress bar (tqdm.auto) unless progress=False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(self._run.steps, self.id) if progress else None
        try:
            while not self._done.wait(0.1):
                if bar is not None:
                    bar.show(self._run.progress())
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still running after {timeout}s")
        finally:
            if bar is not None:
                bar.close(self._status, self._run.progress())
        if self._error is not None:
            raise self._error
        return self

    def _slices(self) -> list[tuple[int, slice]]:
        return [(g, slice(lo, hi)) for g, lo, hi in self._placement]

    @property
    def params(self) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        groups = self._results().params()
        per_spec = [{k: v[s] for k, v in groups[g].items()} for g, s in self._slices()]
        return per_spec[0] if len(per_spec) == 1 else per_spec

    @property
    def history(self) -> np.ndarray:
        offsets = np.cumsum([0] + [g.n for g in self._run.groups])
        full = self._results().history()
        return np.concatenate(
            [full[offsets[g] + s.start : offsets[g] + s.stop] for g, s in self._slices()]
        )

    def plot(self, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
        """Loss curves: the median and the 10-90% band across networks, or chosen networks.
        Needs matplotlib (pip install graphgrad[plot])."""
        return plot_history(self.history, networks, ax)

    def _repr_html_(self) -> str:
        return job_html(self.id, self._status, self._run.progress())

    def __repr__(self) -> str:
        return job_repr("Job", self.id, self._status, self._run.progress())


def nonfinite_note(p: Progress) -> str:
    """What a job's progress says of its diverged networks; empty when there are none."""
    if not p.networks_nonfinite:
        return ""
    return f"loss NaN or infinite in {p.networks_nonfinite} of {p.networks} networks"


def job_repr(kind: str, job_id: str, status: str, p: Progress) -> str:
    note = nonfinite_note(p)
    return (
        f"<graphgrad.{kind} {job_id} {status}: step {p.steps_done}/{p.steps}, "
        f"{p.networks} networks, median loss {p.loss_median:.4g}{', ' + note if note else ''}>"
    )


def job_html(job_id: str, status: str, p: Progress) -> str:
    pct = 100 * p.steps_done / max(p.steps, 1)
    note = nonfinite_note(p)
    return (
        f"<div><b>job {html.escape(job_id)}</b>: {html.escape(status)}, {p.networks} "
        f"networks<div style='background:#eee;width:240px;height:10px'><div style='"
        f"background:#4c9be8;width:{pct:.0f}%;height:10px'></div></div>"
        f"step {p.steps_done}/{p.steps} · median loss {p.loss_median:.4g} · best "
        f"{p.loss_best:.4g} · worst {p.loss_worst:.4g}"
        + (f"<div style='color:#b02a37'>{note}</div>" if note else "")
        + "</div>"
    )


def plot_history(h: np.ndarray, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("Job.plot needs matplotlib: pip install 'graphgrad[plot]'") from e
    # A constrained layout makes room for the labels, which would be clipped otherwise.
    ax = ax or plt.subplots(figsize=(6, 3.5), layout="constrained")[1]
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


class ProgressBar:
    """The bar `wait()` shows (tqdm.auto). In a notebook tqdm's widget is shown through a
    display handle, and when the bar closes the output is replaced by its final state: a
    saved notebook would otherwise keep the text the widget had when first shown ("0%")."""

    def __init__(self, total: int, job_id: str) -> None:
        from tqdm.auto import tqdm
        from tqdm.notebook import tqdm as notebook_tqdm

        self.job_id = job_id
        self._handle: Any = None
        options: dict[str, Any] = dict(total=total, unit="step", desc=f"job {job_id}")
        if issubclass(tqdm, notebook_tqdm):
            from IPython.display import display

            self._bar = tqdm(**options, display=False)
            self._handle = display(self._bar.container, display_id=True)
        else:
            self._bar = tqdm(**options)

    def show(self, p: Progress) -> None:
        self._bar.update(p.steps_done - self._bar.n)
        median = f"loss={p.loss_median:.4g}" if np.isfinite(p.loss_median) else ""
        postfix = ", ".join(x for x in (median, nonfinite_note(p)) if x)
        if postfix:
            self._bar.set_postfix_str(postfix, refresh=False)

    def close(self, status: str, p: Progress) -> None:
        self.show(p)
        self._bar.close()
        if self._handle is not None:
            bundle = dict(self._bar.container._repr_mimebundle_())
            bundle["text/html"] = job_html(self.job_id, status, p)  # for viewers of saved files
            self._handle.update(bundle, raw=True)


def start_job(specs: list[TrainSpec], runner: SegmentRunner, cpus: int, job_id: str) -> Job:
    groups, placement = group_specs(specs)
    return Job(TrainingRun(groups, cpus=cpus, runner=runner), placement, job_id)


__all__ = ["SGD", "Job", "build_specs", "start_job"]
