"""matmul with numpy semantics: vector, matrix and batched (broadcast batch dims) cases."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import Attrs, Emitter, Op, ShapeError, TensorType, register
from graphgrad.engine.ops.elementwise import unbroadcast, unbroadcast_node


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
    batch = a.shape[:-2]
    if batch != b.shape[:-2]:  # equal (the common case, none at all): nothing to broadcast
        try:
            batch = tuple(np.broadcast_shapes(batch, b.shape[:-2]))
        except ValueError:
            msg = f"batch dimensions of {a.shape} and {b.shape} do not broadcast"
            raise ShapeError(msg) from None
    rows = a.shape[-2:-1] if len(a.shape) > 1 else ()
    cols = b.shape[-1:] if len(b.shape) > 1 else ()
    return TensorType(batch + rows + cols, a.dtype)


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


def _shape_of(shape: tuple[int, ...], view: Any) -> tuple[int, ...]:
    """The shape a numpy view function gives an array of `shape` (no data is touched)."""
    return tuple(view(np.broadcast_to(np.empty((), bool), shape)).shape)


def _grad(
    em: Emitter, g: str, xs: Sequence[str], y: str, attrs: Attrs, wants: Sequence[bool]
) -> tuple[str | None, str | None]:
    """`_vjp` as graph nodes: the same products of the same views, case by case."""
    a, b = xs
    sa, sb = em.type(a).shape, em.type(b).shape
    da = db = None

    def t(x: str) -> str:
        return em.emit("transpose", [x])

    def reshape(x: str, shape: tuple[int, ...]) -> str:
        return x if em.type(x).shape == shape else em.emit("reshape", [x], {"shape": shape})

    def outer(u: str, v: str) -> str:  # np.outer(u, v): one product per element
        cols = reshape(u, (em.type(u).shape[0], 1))
        return em.emit("mul", [cols, reshape(v, (1, em.type(v).shape[0]))])

    if len(sa) <= 2 and len(sb) <= 2 and (len(sa), len(sb)) != (1, 1):
        if len(sa) == 1:
            da = em.emit("matmul", [b, g]) if wants[0] else None
            db = outer(a, g) if wants[1] else None
        elif len(sb) == 1:
            da = outer(g, b) if wants[0] else None
            db = em.emit("matmul", [t(a), g]) if wants[1] else None
        else:
            da = em.emit("matmul", [g, t(b)]) if wants[0] else None
            db = em.emit("matmul", [t(a), g]) if wants[1] else None
        return da, db
    a2 = reshape(a, (1, sa[0])) if len(sa) == 1 else a
    b2 = reshape(b, (sb[0], 1)) if len(sb) == 1 else b
    g2 = g
    if len(sa) == 1:
        axis = -2 if len(sb) > 1 else -1
        g2 = reshape(g2, _shape_of(em.type(g2).shape, lambda v: np.expand_dims(v, axis)))
    if len(sb) == 1:
        g2 = reshape(g2, _shape_of(em.type(g2).shape, lambda v: np.expand_dims(v, -1)))

    def swap(x: str) -> str:
        n = len(em.type(x).shape)
        return em.emit("transpose", [x], {"axes": (*range(n - 2), n - 1, n - 2)})

    if wants[0]:
        da = reshape(unbroadcast_node(em, em.emit("matmul", [g2, swap(b2)]), em.type(a2).shape), sa)
    if wants[1]:
        db = reshape(unbroadcast_node(em, em.emit("matmul", [swap(a2), g2]), em.type(b2).shape), sb)
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
        grad=_grad,
        kernel=lambda at, tys: np.matmul,
    )
)
