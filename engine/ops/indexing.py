"""Indexing: strided slices (`x[1:5:2, -1]`), gathers by integer tensors (`x[idx]`, `take`,
`take_along_axis`) and, as their VJPs, the scatter-adds that put a gradient back in place.

Each gather and its scatter-add are each other's transpose, so the VJP of one is the other
and second derivatives come for free. Indices are int32/int64 tensors; negative indices
count from the end, as in numpy; an index out of range fails the run naming the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import (
    INT_DTYPES,
    AttrKind,
    Attrs,
    AttrSpec,
    Op,
    ShapeError,
    TensorType,
    register,
)

# ---------------------------------------------------------------- strided slices


def _slices(begin: Sequence[int], size: Sequence[int], stride: Sequence[int]) -> tuple[slice, ...]:
    """numpy slices taking `size[d]` elements from `begin[d]` every `stride[d]` on each axis."""
    out = []
    for b, n, s in zip(begin, size, stride, strict=True):
        if n == 0:
            out.append(slice(0, 0))
            continue
        stop = b + (n - 1) * s + (1 if s > 0 else -1)
        out.append(slice(b, None if stop < 0 else stop, s))
    return tuple(out)


def _check_strides(shape: tuple[int, ...], attrs: Attrs, sizes: Sequence[int]) -> None:
    begin, stride = attrs["begin"], attrs["stride"]
    if not len(begin) == len(stride) == len(sizes) == len(shape):
        raise ShapeError(
            f"begin, size and stride need one entry per axis ({len(shape)}), got "
            f"{len(begin)}, {len(sizes)} and {len(stride)}",
            field="attrs.begin",
        )
    for d, (n, b, k, s) in enumerate(zip(shape, begin, sizes, stride, strict=True)):
        if s == 0:
            raise ShapeError(f"stride of axis {d} is 0", field="attrs.stride")
        if k < 0:
            raise ShapeError(f"size of axis {d} is {k}, a negative size", field="attrs.size")
        if k and not (0 <= b < n and 0 <= b + (k - 1) * s < n):
            raise ShapeError(
                f"axis {d}: {k} elements from {b} every {s} do not fit in size {n}",
                field="attrs.begin",
            )


def _strided_slice_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    _check_strides(x.shape, attrs, attrs["size"])
    return TensorType(tuple(attrs["size"]), x.dtype)


def _strided_slice(x: np.ndarray, at: Attrs) -> np.ndarray:
    return x[_slices(at["begin"], at["size"], at["stride"])]


def _pad_slice_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (g,) = ins
    shape = tuple(attrs["shape"])
    _check_strides(shape, attrs, g.shape)
    return TensorType(shape, g.dtype)


def _pad_slice(g: np.ndarray, at: Attrs) -> np.ndarray:
    out = np.zeros(at["shape"], g.dtype)
    out[_slices(at["begin"], g.shape, at["stride"])] = g
    return out


_STRIDES = {
    "begin": AttrSpec(AttrKind.INTS, required=True),
    "stride": AttrSpec(AttrKind.INTS, required=True),
}


def _lead_attrs(at: Attrs, n: int, **extra: Any) -> dict[str, Any]:
    """Strided-slice attributes with the network axis in front, taken whole."""
    return {**extra, "begin": (0, *at["begin"]), "stride": (1, *at["stride"])}


register(
    Op(
        "strided_slice",
        1,
        _strided_slice_infer,
        lambda xs, at: _strided_slice(xs[0], at),
        lambda g, xs, y, at, w: (_pad_slice(g, {**at, "shape": xs[0].shape}) if w[0] else None,),
        attrs={**_STRIDES, "size": AttrSpec(AttrKind.INTS, required=True)},
        doc=(
            "`size[d]` elements of each axis d, from `begin[d]` every `stride[d]` (a negative "
            "stride walks backwards): what `x[b:e:s, i]` builds, with a reshape dropping an "
            "integer-indexed axis. Indices are normalized: 0 <= begin < x.shape[d]."
        ),
        batch=lambda em, ins, tys, out, at: em.emit(
            "strided_slice",
            [ins[0].name],
            _lead_attrs(at, em.n, size=(em.n, *at["size"])),
        ),
        grad=lambda em, g, xs, y, at, w: (
            em.emit(
                "pad_slice",
                [g],
                {"shape": em.type(xs[0]).shape, "begin": at["begin"], "stride": at["stride"]},
            )
            if w[0]
            else None,
        ),
        inputs=("x",),
        any_dtype=True,
    )
)
register(
    Op(
        "pad_slice",
        1,
        _pad_slice_infer,
        lambda xs, at: _pad_slice(xs[0], at),
        lambda g, xs, y, at, w: (_strided_slice(g, {**at, "size": xs[0].shape}) if w[0] else None,),
        attrs={**_STRIDES, "shape": AttrSpec(AttrKind.INTS, required=True)},
        doc=(
            "zeros of `shape` with x placed at the strided slice (begin, stride): the "
            "transpose of strided_slice, and its VJP"
        ),
        batch=lambda em, ins, tys, out, at: em.emit(
            "pad_slice", [ins[0].name], _lead_attrs(at, em.n, shape=(em.n, *at["shape"]))
        ),
        grad=lambda em, g, xs, y, at, w: (
            em.emit(
                "strided_slice",
                [g],
                {"begin": at["begin"], "stride": at["stride"], "size": em.type(xs[0]).shape},
            )
            if w[0]
            else None,
        ),
        inputs=("x",),
        any_dtype=True,
    )
)

# ---------------------------------------------------------------- take / scatter_add


def _int_indices(t: TensorType, what: str = "indices") -> None:
    if t.dtype not in INT_DTYPES:
        raise ShapeError(f"{what} must be {' or '.join(INT_DTYPES)}, got {t.dtype}")


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for rank {ndim}", field="attrs.axis")
    return axis % ndim


def check_range(idx: np.ndarray, n: int, axis: int) -> None:
    """Indices within [-n, n) (numpy's rule), else a ValueError the run reports for the node."""
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)].flat[0]
        raise ValueError(f"index {bad} is out of range for axis {axis} of size {n}")


def _take_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    x, idx = ins
    _int_indices(idx)
    a = _axis(attrs.get("axis", 0), len(x.shape))
    return TensorType((*x.shape[:a], *idx.shape, *x.shape[a + 1 :]), x.dtype)


def _take(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    axis %= x.ndim
    check_range(idx, x.shape[axis], axis)
    return np.take(x, idx, axis=axis)


def _scatter_add(g: np.ndarray, idx: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Zeros with `size` along `axis`, and each slice of g added at its index (repeats add)."""
    shape = (*g.shape[:axis], size, *g.shape[axis + idx.ndim :])
    out = np.zeros(shape, g.dtype)
    check_range(idx, size, axis)
    np.add.at(out, (slice(None),) * axis + (idx,), g)  # type: ignore[arg-type]
    return out


def _scatter_add_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    g, idx = ins
    _int_indices(idx)
    axis, size = attrs.get("axis", 0), attrs["size"]
    k = len(idx.shape)
    if not 0 <= axis <= len(g.shape) - k:
        raise ShapeError(f"axis {axis} is out of range", field="attrs.axis")
    if g.shape[axis : axis + k] != idx.shape:
        raise ShapeError(
            f"updates {g.shape} do not hold indices {idx.shape} at axis {axis}", field="inputs"
        )
    if size < 0:
        raise ShapeError(f"size {size} is negative", field="attrs.size")
    return TensorType((*g.shape[:axis], size, *g.shape[axis + k :]), g.dtype)


def _take_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    x, idx = ins
    xt, it = tys
    a = at.get("axis", 0) % len(xt.shape)
    if not idx.batched:
        return str(em.emit("take", [x.name, idx.name], {"axis": a + 1}))
    # Each network has its own indices: a take_along_axis over the indices flattened.
    pre, post = xt.shape[:a], xt.shape[a + 1 :]
    k = int(np.prod(it.shape, dtype=np.int64))
    xl = em.lead(x, xt, len(xt.shape))
    il = em.lead(idx, it, len(it.shape))
    ir = em.emit("reshape", [il], {"shape": (em.n, *(1,) * len(pre), k, *(1,) * len(post))})
    got = em.emit("take_along_axis", [xl, ir], {"axis": a + 1})
    return str(em.emit("reshape", [got], {"shape": (em.n, *out.shape)}))


def _scatter_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    g, idx = ins
    gt, it = tys
    a = at.get("axis", 0)
    if not idx.batched:
        return str(em.emit("scatter_add", [g.name, idx.name], {**at, "axis": a + 1}))
    pre, post = gt.shape[:a], gt.shape[a + len(it.shape) :]
    k = int(np.prod(it.shape, dtype=np.int64))
    gl = em.emit("reshape", [em.lead(g, gt, len(gt.shape))], {"shape": (em.n, *pre, k, *post)})
    il = em.lead(idx, it, len(it.shape))
    ir = em.emit("reshape", [il], {"shape": (em.n, *(1,) * len(pre), k, *(1,) * len(post))})
    return str(em.emit("put_along_axis_add", [gl, ir], {"axis": a + 1, "size": at["size"]}))


register(
    Op(
        "take",
        2,
        _take_infer,
        lambda xs, at: _take(xs[0], xs[1], at.get("axis", 0)),
        lambda g, xs, y, at, w: (
            _scatter_add(g, xs[1], at.get("axis", 0) % xs[0].ndim, xs[0].shape[at.get("axis", 0)])
            if w[0]
            else None,
            None,
        ),
        attrs={"axis": AttrSpec(AttrKind.INT, default=0)},
        doc=(
            "numpy.take: the slices of x at `indices` (an int tensor of any shape) along "
            "`axis`; the result's shape is x.shape[:axis] + indices.shape + x.shape[axis+1:]. "
            "`x[idx]` builds it. Its VJP is scatter_add (repeated indices add up)."
        ),
        batch=_take_batch,
        grad=lambda em, g, xs, y, at, w: (
            em.emit(
                "scatter_add",
                [g, xs[1]],
                {
                    "axis": at.get("axis", 0) % len(em.type(xs[0]).shape),
                    "size": em.type(xs[0]).shape[at.get("axis", 0)],
                },
            )
            if w[0]
            else None,
            None,
        ),
        inputs=("x", "indices"),
        any_dtype=True,
    )
)
register(
    Op(
        "scatter_add",
        2,
        _scatter_add_infer,
        lambda xs, at: _scatter_add(xs[0], xs[1], at.get("axis", 0), at["size"]),
        lambda g, xs, y, at, w: (_take(g, xs[1], at.get("axis", 0)) if w[0] else None, None),
        attrs={"axis": AttrSpec(AttrKind.INT, default=0), "size": AttrSpec(AttrKind.INT, True)},
        doc=(
            "zeros with `size` entries along `axis`, each slice of `updates` added at its "
            "index in `indices` (repeats add up): the transpose of take, and its VJP"
        ),
        batch=_scatter_batch,
        grad=lambda em, g, xs, y, at, w: (
            em.emit("take", [g, xs[1]], {"axis": at.get("axis", 0)}) if w[0] else None,
            None,
        ),
        inputs=("updates", "indices"),
        any_dtype=True,
    )
)

# ---------------------------------------------------------------- along an axis


def _along_check(x: TensorType, idx: TensorType, attrs: Attrs) -> int:
    _int_indices(idx)
    if len(idx.shape) != len(x.shape):
        raise ShapeError(f"indices {idx.shape} and x {x.shape} must have the same rank")
    a = _axis(attrs.get("axis", -1), len(x.shape))
    for d, (n, m) in enumerate(zip(x.shape, idx.shape, strict=True)):
        if d != a and m not in (1, n):
            raise ShapeError(f"indices {idx.shape} do not broadcast to x {x.shape} along axis {d}")
    return a


def _take_along_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    x, idx = ins
    a = _along_check(x, idx, attrs)
    return TensorType((*x.shape[:a], idx.shape[a], *x.shape[a + 1 :]), x.dtype)


def _put_along_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    g, idx = ins
    a = _along_check(g, idx, attrs)
    if idx.shape[a] != g.shape[a]:
        raise ShapeError(f"updates {g.shape} and indices {idx.shape} differ along axis {a}")
    if attrs["size"] < 0:
        raise ShapeError(f"size {attrs['size']} is negative", field="attrs.size")
    return TensorType((*g.shape[:a], attrs["size"], *g.shape[a + 1 :]), g.dtype)


def _take_along(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    axis %= x.ndim
    check_range(idx, x.shape[axis], axis)
    return np.take_along_axis(x, idx, axis=axis)


def _put_along_add(g: np.ndarray, idx: np.ndarray, axis: int, size: int) -> np.ndarray:
    axis %= g.ndim
    check_range(idx, size, axis)
    out = np.zeros((*g.shape[:axis], size, *g.shape[axis + 1 :]), g.dtype)
    where = list(np.ogrid[tuple(slice(n) for n in g.shape)])
    where[axis] = idx
    np.add.at(out, tuple(where), g)
    return out


def _along_batch(name: str) -> Any:
    def rule(
        em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
    ) -> str:
        rank = len(tys[0].shape)
        names = [em.lead(x, t, rank) for x, t in zip(ins, tys, strict=True)]
        return str(em.emit(name, names, {**at, "axis": at.get("axis", -1) % rank + 1}))

    return rule


register(
    Op(
        "take_along_axis",
        2,
        _take_along_infer,
        lambda xs, at: _take_along(xs[0], xs[1], at.get("axis", -1)),
        lambda g, xs, y, at, w: (
            _put_along_add(g, xs[1], at.get("axis", -1), xs[0].shape[at.get("axis", -1)])
            if w[0]
            else None,
            None,
        ),
        attrs={"axis": AttrSpec(AttrKind.INT, default=-1)},
        doc=(
            "numpy.take_along_axis: x's elements at `indices` along `axis`; indices has x's "
            "rank and, off `axis`, x's sizes or 1 (broadcast). E.g. the logit of each label: "
            "take_along_axis(logits, labels[:, None], axis=1)."
        ),
        batch=_along_batch("take_along_axis"),
        grad=lambda em, g, xs, y, at, w: (
            em.emit(
                "put_along_axis_add",
                [g, xs[1]],
                {
                    "axis": at.get("axis", -1),
                    "size": em.type(xs[0]).shape[at.get("axis", -1)],
                },
            )
            if w[0]
            else None,
            None,
        ),
        inputs=("x", "indices"),
        any_dtype=True,
    )
)
register(
    Op(
        "put_along_axis_add",
        2,
        _put_along_infer,
        lambda xs, at: _put_along_add(xs[0], xs[1], at.get("axis", -1), at["size"]),
        lambda g, xs, y, at, w: (
            _take_along(g, xs[1], at.get("axis", -1)) if w[0] else None,
            None,
        ),
        attrs={"axis": AttrSpec(AttrKind.INT, default=-1), "size": AttrSpec(AttrKind.INT, True)},
        doc=(
            "zeros with `size` entries along `axis`, `updates` added at `indices` along it "
            "(repeats add up): the transpose of take_along_axis, and its VJP"
        ),
        batch=_along_batch("put_along_axis_add"),
        grad=lambda em, g, xs, y, at, w: (
            em.emit("take_along_axis", [g, xs[1]], {"axis": at.get("axis", -1)}) if w[0] else None,
            None,
        ),
        inputs=("updates", "indices"),
        any_dtype=True,
    )
)
