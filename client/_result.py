"""What a run returns: values and gradients as numpy arrays keyed by node name, and stats."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.values.items())
        grads = ", ".join(f"{k}: {v.shape}" for k, v in self.grads.items())
        return f"Result(values={{{vals}}}, grads={{{grads}}})"
