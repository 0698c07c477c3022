"""What a run returns: values and gradients as numpy arrays keyed by node name, and stats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import RunStats


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

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.values.items())
        grads = ", ".join(f"{k}: {v.shape}" for k, v in self.grads.items())
        return f"Result(values={{{vals}}}, grads={{{grads}}})"
