"""Central finite differences for checking VJPs (float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_vjp(
    f: Callable[[list[np.ndarray]], np.ndarray],
    xs: list[np.ndarray],
    u: np.ndarray,
    eps: float = 1e-6,
) -> list[np.ndarray]:
    """d/dx_k of sum(u * f(xs)) for every input k, by central differences."""
    grads = []
    for k, x in enumerate(xs):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [v.copy() for v in xs]
            minus = [v.copy() for v in xs]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            g[idx] = (np.sum(u * f(plus)) - np.sum(u * f(minus))) / (2 * eps)
        grads.append(g)
    return grads
