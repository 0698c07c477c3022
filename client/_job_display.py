"""How a training job shows itself, locally or remotely: an HTML summary, a progress bar and
a plot of its losses."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrad.engine import Progress


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
