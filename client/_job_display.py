"""How a training job shows itself, locally or remotely: an HTML summary, a progress bar and
a plot of its losses."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrad.engine import Progress


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
