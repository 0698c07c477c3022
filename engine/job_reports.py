"""What a job reports, wherever it runs: its view (status, progress, error) and its results
cut into pieces by placement (which networks of which stacked group each submitted template
became)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine.kinds import JobStatus
from graphgrad.engine.training_run import Placement, Progress

NO_PROGRESS = Progress(0, 0, 0, 0, float("nan"), float("nan"), float("nan"))


@dataclass(frozen=True)
class JobView:
    id: str
    status: JobStatus
    progress: Progress
    error: str
    created: float
    worker: str = ""  # the server process running the job ("HOST:PID"), while it runs


@dataclass(frozen=True)
class ResultPart:
    """Networks [first, first + len(value)) of one template's parameter `name` (kind
    "params") or of its loss history (kind "history", name "")."""

    template: int
    kind: str
    name: str
    first: int
    value: np.ndarray


def result_parts(
    params: Sequence[Mapping[str, np.ndarray]],
    placement: Sequence[Placement],
    group_sizes: Sequence[int],
    steps: int,
    history: Callable[[int, int], np.ndarray],
    max_bytes: int = 4 << 20,
) -> Iterator[ResultPart]:
    """The results of each submitted template, in pieces of at most ~max_bytes (one network
    at least): `params` per group, `history(lo, hi)` the loss rows of flat networks
    [lo, hi) over every group."""
    offsets = np.cumsum([0, *group_sizes])
    per = max(1, max_bytes // (8 * steps))
    for t, (g, lo, hi) in enumerate(placement):
        for name, value in params[g].items():
            each = max(1, max_bytes // max(value[:1].nbytes, 1))
            for first in range(lo, hi, each):
                yield ResultPart(
                    t, "params", name, first - lo, value[first : min(hi, first + each)]
                )
        base = int(offsets[g])
        for first in range(lo, hi, per):
            end = min(hi, first + per)
            yield ResultPart(t, "history", "", first - lo, history(base + first, base + end))


def join_parts(
    parts: Iterator[ResultPart], templates: int
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """(params per template, history of every template's networks in order) from pieces."""
    pieces: list[dict[str, list[tuple[int, np.ndarray]]]] = [{} for _ in range(templates)]
    for p in parts:
        key = p.name if p.kind == "params" else "\0history"
        pieces[p.template].setdefault(key, []).append((p.first, p.value))
    joined = [
        {k: np.concatenate([v for _, v in sorted(ps, key=lambda p: p[0])]) for k, ps in t.items()}
        for t in pieces
    ]
    history = np.concatenate([t.pop("\0history") for t in joined])
    return joined, history
