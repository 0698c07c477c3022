"""Shape ops: reshape, transpose, broadcast_to, concat."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import numpy as np

from graphgrad.engine.ops._registry import (
    AttrKind,
    Attrs,
    AttrSpec,
    Emitter,
    Op,
    ShapeError,
    TensorType,
    check_shape,
    register,
)
from graphgrad.engine.ops.elementwise import unbroadcast, unbroadcast_node


def _reshape_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    shape = attrs["shape"]
    if sum(d == -1 for d in shape) > 1:
        raise ShapeError(f"shape {shape} may hold at most one -1", field="attrs.shape")
    check_shape([max(d, 0) for d in shape], "shape", field="attrs.shape")
    known = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if known == 0 or x.size % known:
            raise ShapeError(f"cannot reshape {x.shape} into {shape}")
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    elif known != x.size:
        raise ShapeError(f"cannot reshape {x.shape} ({x.size} elements) into {shape}")
    return TensorType(tuple(shape), x.dtype)


register(
    Op(
        "reshape",
        1,
        _reshape_infer,
        lambda xs, at: xs[0].reshape(at["shape"]),
        lambda g, xs, y, at, w: (g.reshape(xs[0].shape),),
        attrs={"shape": AttrSpec(AttrKind.INTS, required=True)},
        batch=lambda em, ins, tys, out, at: em.emit(
            "reshape", [ins[0].name], {"shape": (em.n, *out.shape)}
        ),
        grad=lambda em, g, xs, y, at, w: (
            em.emit("reshape", [g], {"shape": em.type(xs[0]).shape}),
        ),
        kernel=lambda at, tys: operator.methodcaller("reshape", at["shape"]),
        inputs=("x",),
        any_dtype=True,  # moves values: any dtype
    )
)


def _perm(attrs: Attrs, ndim: int) -> tuple[int, ...]:
    axes = attrs.get("axes")
    return tuple(reversed(range(ndim))) if axes is None else tuple(axes)


def _transpose_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    perm = _perm(attrs, len(x.shape))
    if sorted(perm) != list(range(len(x.shape))):
        raise ShapeError(
            f"axes {perm} are not a permutation of {len(x.shape)} axes", field="attrs.axes"
        )
    return TensorType(tuple(x.shape[i] for i in perm), x.dtype)


register(
    Op(
        "transpose",
        1,
        _transpose_infer,
        lambda xs, at: np.transpose(xs[0], _perm(at, xs[0].ndim)),
        lambda g, xs, y, at, w: (np.transpose(g, np.argsort(_perm(at, xs[0].ndim))),),
        attrs={"axes": AttrSpec(AttrKind.INTS)},
        batch=lambda em, ins, tys, out, at: em.emit(
            "transpose",
            [ins[0].name],
            {"axes": (0, *(p + 1 for p in _perm(at, len(tys[0].shape))))},
        ),
        grad=lambda em, g, xs, y, at, w: (
            em.emit(
                "transpose",
                [g],
                {"axes": tuple(int(k) for k in np.argsort(_perm(at, len(em.type(g).shape))))},
            ),
        ),
        inputs=("x",),
        any_dtype=True,  # moves values: any dtype
        kernel=lambda at, tys: operator.methodcaller("transpose", _perm(at, len(tys[0].shape))),
    )
)


def _broadcast_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    shape = check_shape(attrs["shape"], "shape", field="attrs.shape")
    try:
        ok = np.broadcast_shapes(x.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(f"cannot broadcast {x.shape} to {shape}")
    return TensorType(shape, x.dtype)


register(
    Op(
        "broadcast_to",
        1,
        _broadcast_infer,
        lambda xs, at: np.broadcast_to(xs[0], at["shape"]),
        lambda g, xs, y, at, w: (unbroadcast(g, xs[0].shape),),
        attrs={"shape": AttrSpec(AttrKind.INTS, required=True)},
        batch=lambda em, ins, tys, out, at: em.emit(
            "broadcast_to", [em.lead(ins[0], tys[0], len(out.shape))], {"shape": (em.n, *out.shape)}
        ),
        grad=lambda em, g, xs, y, at, w: (unbroadcast_node(em, g, em.type(xs[0]).shape),),
        kernel=lambda at, tys: functools.partial(np.broadcast_to, shape=at["shape"]),
        inputs=("x",),
        any_dtype=True,  # moves values: any dtype
    )
)


def _concat_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    first = ins[0]
    nd = len(first.shape)
    if nd == 0:
        raise ShapeError("cannot concatenate scalars")
    axis = attrs.get("axis", 0)
    if not -nd <= axis < nd:
        raise ShapeError(f"axis {axis} is out of range for rank {nd}", field="attrs.axis")
    axis %= nd
    for t in ins[1:]:
        if t.dtype != first.dtype:
            raise ShapeError(f"dtype mismatch: {first.dtype} and {t.dtype}")
        if len(t.shape) != nd or any(
            a != b for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=True)) if i != axis
        ):
            raise ShapeError(f"shapes {first.shape} and {t.shape} differ outside axis {axis}")
    total = sum(t.shape[axis] for t in ins)
    return TensorType((*first.shape[:axis], total, *first.shape[axis + 1 :]), first.dtype)


def _concat_vjp(g, xs, y, attrs, wants):
    axis = attrs.get("axis", 0) % g.ndim
    cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]
    return tuple(np.split(g, cuts, axis=axis))


register(
    Op(
        "concat",
        None,
        _concat_infer,
        lambda xs, at: np.concatenate(list(xs), axis=at.get("axis", 0)),
        _concat_vjp,
        attrs={"axis": AttrSpec(AttrKind.INT, default=0)},
        batch=lambda em, ins, tys, out, at: em.emit(
            "concat",
            [em.lead(x, t, len(t.shape)) for x, t in zip(ins, tys, strict=True)],
            {"axis": at.get("axis", 0) % len(out.shape) + 1},
        ),
        grad=lambda em, g, xs, y, at, w: _concat_grad(em, g, xs, at, w),
        inputs=("xs",),
        any_dtype=True,  # moves values: any dtype
    )
)


def _concat_grad(
    em: Emitter, g: str, xs: Sequence[str], attrs: Attrs, wants: Sequence[bool]
) -> list[str | None]:
    """`np.split` as graph nodes: one slice per input."""
    axis = attrs.get("axis", 0) % len(em.type(g).shape)
    out: list[str | None] = []
    start = 0
    for x, want in zip(xs, wants, strict=True):
        stop = start + em.type(x).shape[axis]
        out.append(
            em.emit("slice", [g], {"axis": axis, "start": start, "stop": stop}) if want else None
        )
        start = stop
    return out


def _slice_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    nd = len(x.shape)
    axis = attrs["axis"]
    if not -nd <= axis < nd:
        raise ShapeError(f"axis {axis} is out of range for rank {nd}", field="attrs.axis")
    axis %= nd
    start, stop = attrs["start"], attrs["stop"]
    if not 0 <= start <= stop <= x.shape[axis]:
        raise ShapeError(
            f"slice {start}:{stop} is not within axis {axis} of size {x.shape[axis]}",
            field="attrs.start",
        )
    return TensorType((*x.shape[:axis], stop - start, *x.shape[axis + 1 :]), x.dtype)


def _slice(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    axis = attrs["axis"] % x.ndim
    return x[(slice(None),) * axis + (slice(attrs["start"], attrs["stop"]),)]


def _slice_vjp(g, xs, y, at, w):
    out = np.zeros_like(xs[0])
    out[(slice(None),) * (at["axis"] % out.ndim) + (slice(at["start"], at["stop"]),)] = g
    return (out,)


def _slice_grad(em, g, xs, y, at, w):
    shape = em.type(xs[0]).shape
    axis = at["axis"] % len(shape)
    pieces = []
    for lo, hi in ((0, at["start"]), (at["stop"], shape[axis])):
        if hi > lo:
            zeros_shape = (*shape[:axis], hi - lo, *shape[axis + 1 :])
            pieces.append(em.emit("broadcast_to", [em.const(0, g)], {"shape": zeros_shape}))
    if not pieces:
        return (g,)
    parts = [pieces[0], g, *pieces[1:]] if at["start"] > 0 else [g, *pieces]
    return (em.emit("concat", parts, {"axis": axis}),)


register(
    Op(
        "slice",
        1,
        _slice_infer,
        lambda xs, at: _slice(xs[0], at),
        _slice_vjp,
        attrs={
            "axis": AttrSpec(AttrKind.INT, required=True),
            "start": AttrSpec(AttrKind.INT, required=True),
            "stop": AttrSpec(AttrKind.INT, required=True),
        },
        doc="x[start:stop] along axis (the gradient of concat)",
        batch=lambda em, ins, tys, out, at: em.emit(
            "slice",
            [em.lead(ins[0], tys[0], len(tys[0].shape))],
            {**at, "axis": at["axis"] % len(tys[0].shape) + 1},
        ),
        grad=_slice_grad,
        inputs=("x",),
        any_dtype=True,  # moves values: any dtype
    )
)
