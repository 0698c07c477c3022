"""What a run returns: values and gradients as numpy arrays keyed by node name, and stats."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphgrad.engine import RunStats


@dataclass(frozen=True)
class Result:
    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    stats: RunStats | None = None

    @property
    def value(self) -> np.ndarray:
        """The value of the single output (a 0-d array for a scalar)."""
        if len(self.values) != 1:
            raise ValueError(
                f"this result has {len(self.values)} outputs "
                f"({', '.join(self.values)}); use .values[name]"
            )
        return next(iter(self.values.values()))

    def copy(self) -> Result:
        """The same result with arrays of its own, writable (a remote result's arrays are
        read-only views on the response bytes; copy to update them in place)."""
        return Result(
            {k: np.array(v) for k, v in self.values.items()},
            {k: np.array(v) for k, v in self.grads.items()},
            self.stats,
        )

    def trace_events(self) -> list[dict[str, object]]:
        """The run's tasks as Chrome trace events (chrome://tracing, Perfetto)."""
        if self.stats is None:
            return []
        return [
            {
                "name": f"P{t.partition} {t.phase}",
                "cat": t.phase,
                "ph": "X",
                "ts": t.start * 1e6,
                "dur": max(t.end - t.start, 0.0) * 1e6,
                "pid": t.where,
                "tid": t.partition,
                "args": {"bytes_in": t.bytes_in, "bytes_out": t.bytes_out},
            }
            for t in self.stats.tasks
        ]

    def write_trace(self, path: str | Path) -> Path:
        """Write the run's stats as a Chrome trace file; open it in chrome://tracing or Perfetto."""
        out = Path(path)
        out.write_text(json.dumps({"traceEvents": self.trace_events(), "displayTimeUnit": "ms"}))
        return out

    def _repr_html_(self) -> str:
        rows = [("value", k, v) for k, v in self.values.items()]
        rows += [("gradient", k, v) for k, v in self.grads.items()]
        body = "".join(
            f"<tr><td>{kind}</td><td><code>{html.escape(k)}</code></td><td>{v.shape}</td>"
            f"<td>{v.dtype}</td><td><code>{html.escape(_preview(v))}</code></td></tr>"
            for kind, k, v in rows
        )
        stats = ""
        if self.stats is not None:
            s = self.stats
            stats = (
                f"<p>{s.executor}, {s.partitions} partition(s), {s.wall_time * 1e3:.2f} ms"
                f", {s.bytes_moved} bytes moved</p>"
            )
        return (
            "<table><tr><th></th><th>name</th><th>shape</th><th>dtype</th><th></th></tr>"
            f"{body}</table>{stats}"
        )

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.values.items())
        grads = ", ".join(f"{k}: {v.shape}" for k, v in self.grads.items())
        return f"Result(values={{{vals}}}, grads={{{grads}}})"


def _preview(a: np.ndarray) -> str:
    with np.printoptions(precision=4, threshold=6, edgeitems=2, linewidth=60):
        return np.array2string(a) if a.size else "[]"
