"""matmul with numpy semantics: vector, matrix and batched (broadcast batch dims) cases."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._registry import Attrs, Op, ShapeError, TensorType, register
from .elementwise import unbroadcast


def _infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    a, b = ins
    if a.dtype != b.dtype:
        raise ShapeError(f"dtype mismatch: {a.dtype} and {b.dtype}")
    if not a.shape or not b.shape:
        raise ShapeError(f"matmul needs inputs of rank >= 1, got {a.shape} and {b.shape}")
    ka = a.shape[-1]
    kb = b.shape[0] if len(b.shape) == 1 else b.shape[-2]
    if ka != kb:
        raise ShapeError(f"inner dimensions differ: {a.shape} @ {b.shape} ({ka} != {kb})")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError(f"batch dimensions of {a.shape} and {b.shape} do not broadcast") from None
    rows = a.shape[-2:-1] if len(a.shape) > 1 else ()
    cols = b.shape[-1:] if len(b.shape) > 1 else ()
    return TensorType(tuple(batch) + rows + cols, a.dtype)


def _vjp(
    g: np.ndarray, xs: Sequence[np.ndarray], y: np.ndarray, attrs: Attrs, wants: Sequence[bool]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    a, b = xs
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim, b.ndim) != (1, 1):
        return _vjp_2d(g, a, b, wants)
    # Promote vectors to matrices so one rule covers every case, then undo the promotion.
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    g2 = g
    if a.ndim == 1:
        g2 = np.expand_dims(g2, -2 if b.ndim > 1 else -1)
    if b.ndim == 1:
        g2 = np.expand_dims(g2, -1)
    da = db = None
    if wants[0]:
        da = unbroadcast(g2 @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
    if wants[1]:
        db = unbroadcast(np.swapaxes(a2, -1, -2) @ g2, b2.shape).reshape(b.shape)
    return da, db


def _vjp_2d(
    g: np.ndarray, a: np.ndarray, b: np.ndarray, wants: Sequence[bool]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Matrix and matrix-vector products, the common case, without the general rule's
    promotions (a few microseconds per node on small graphs)."""
    da = db = None
    if a.ndim == 1:  # (n) @ (n, k)
        if wants[0]:
            da = b @ g
        if wants[1]:
            db = np.outer(a, g)
    elif b.ndim == 1:  # (m, n) @ (n)
        if wants[0]:
            da = np.outer(g, b)
        if wants[1]:
            db = a.T @ g
    else:
        if wants[0]:
            da = g @ b.T
        if wants[1]:
            db = a.T @ g
    return da, db


def _flops(ins: Sequence[TensorType], out: TensorType, attrs: Attrs) -> float:
    return 2.0 * max(out.size, 1) * ins[0].shape[-1]


def _batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    # Vectors become matrices, batched operands get padded batch axes so that numpy's batch
    # broadcasting lines the network axis up; the result is reshaped to the template's.
    names, shapes = [], []
    for k, (x, t) in enumerate(zip(ins, tys, strict=True)):
        shape, name = t.shape, x.name
        if len(shape) == 1:
            shape = (1, shape[0]) if k == 0 else (shape[0], 1)
            name = em.emit("reshape", [name], {"shape": (em.n, *shape) if x.batched else shape})
        names.append(name)
        shapes.append(shape)
    rank = max(len(s) for s in shapes)
    for k, x in enumerate(ins):
        if x.batched and len(shapes[k]) < rank:
            pad = (em.n, *(1,) * (rank - len(shapes[k])), *shapes[k])
            names[k] = em.emit("reshape", [names[k]], {"shape": pad})
    y = em.emit("matmul", names)
    if em.types[y].shape != (em.n, *out.shape):
        y = em.emit("reshape", [y], {"shape": (em.n, *out.shape)})
    return str(y)


register(
    Op(
        "matmul",
        2,
        _infer,
        lambda xs, at: np.matmul(xs[0], xs[1]),
        _vjp,
        flops=_flops,
        batch=_batch,
    )
)
