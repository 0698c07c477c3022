"""Central finite differences for checking VJPs (float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_vjp(
    f: Callable[[list[np.ndarray]], np.ndarray],
    xs: list[np.ndarray],
    u: np.ndarray,
    eps: float = 1e-6,
) -> list[np.ndarray | None]:
    """d/dx_k of sum(u * f(xs)) for every input k, by central differences (None for an
    integer input: indices and labels are not differentiated)."""
    grads: list[np.ndarray | None] = []
    for k, x in enumerate(xs):
        if x.dtype.kind != "f":
            grads.append(None)
            continue
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [v.copy() for v in xs]
            minus = [v.copy() for v in xs]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            g[idx] = (np.sum(u * f(plus)) - np.sum(u * f(minus))) / (2 * eps)
        grads.append(g)
    return grads
