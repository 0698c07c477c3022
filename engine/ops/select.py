"""`where` (choose elementwise between two tensors) and `astype` (convert the dtype)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphgrad.engine.ops._registry import (
    FLOAT_DTYPES,
    AttrKind,
    Attrs,
    AttrSpec,
    Op,
    ShapeError,
    TensorType,
    register,
)
from graphgrad.engine.ops.elementwise import batch_broadcasting, unbroadcast, unbroadcast_node


def _where_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    cond, x, y = ins
    if x.dtype != y.dtype:
        raise ShapeError(f"x and y must have one dtype, got {x.dtype} and {y.dtype}")
    try:
        shape = np.broadcast_shapes(cond.shape, x.shape, y.shape)
    except ValueError:
        raise ShapeError(f"shapes {cond.shape}, {x.shape} and {y.shape} do not broadcast") from None
    return TensorType(tuple(shape), x.dtype)


def _where_vjp(g, xs, y, at, w):
    cond, a, b = xs
    return (
        None,
        unbroadcast(np.where(cond, g, 0), a.shape) if w[1] else None,
        unbroadcast(np.where(cond, 0, g), b.shape) if w[2] else None,
    )


def _where_grad(em, g, xs, y, at, w):
    cond, a, b = xs
    zero = em.const(0, g)
    return (
        None,
        unbroadcast_node(em, em.emit("where", [cond, g, zero]), em.type(a).shape) if w[1] else None,
        unbroadcast_node(em, em.emit("where", [cond, zero, g]), em.type(b).shape) if w[2] else None,
    )


register(
    Op(
        "where",
        3,
        _where_infer,
        lambda xs, at: np.where(xs[0], xs[1], xs[2]),
        _where_vjp,
        doc=(
            "numpy.where: x where cond is nonzero, else y, with numpy broadcasting of all three. "
            "cond may be any dtype (comparisons give 1/0); x and y share one dtype. The "
            "gradient goes to x where cond holds and to y elsewhere; none to cond."
        ),
        batch=batch_broadcasting("where"),
        grad=_where_grad,
        kernel=lambda at, tys: np.where,
        inputs=("cond", "x", "y"),
        any_dtype=True,
    )
)


def _astype_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    return TensorType(ins[0].shape, attrs["dtype"])


def _floats(*dtypes: str) -> bool:
    return all(d in FLOAT_DTYPES for d in dtypes)


register(
    Op(
        "astype",
        1,
        _astype_infer,
        lambda xs, at: xs[0].astype(at["dtype"]),
        lambda g, xs, y, at, w: (
            g.astype(xs[0].dtype) if w[0] and _floats(xs[0].dtype.name, y.dtype.name) else None,
        ),
        attrs={"dtype": AttrSpec(AttrKind.DTYPE, required=True)},
        doc=(
            "x converted to `dtype` (numpy's astype: float to int truncates toward zero). "
            "Between float dtypes the gradient is converted back; none flows through an "
            "integer dtype."
        ),
        batch=lambda em, ins, tys, out, at: em.emit("astype", [ins[0].name], at),
        grad=lambda em, g, xs, y, at, w: (
            em.emit("astype", [g], {"dtype": em.type(xs[0]).dtype})
            if w[0] and _floats(em.type(xs[0]).dtype, em.type(y).dtype)
            else None,
        ),
        inputs=("x",),
        any_dtype=True,
    )
)
