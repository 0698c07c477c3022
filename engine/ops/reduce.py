"""Reductions over axes: sum, mean, max (axis: None for all, an int or a tuple; keepdims)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import (
    AttrKind,
    Attrs,
    AttrSpec,
    BatchFn,
    Emitter,
    GradFn,
    Op,
    TensorType,
    VjpFn,
    normalize_axes,
    register,
)

REDUCTION_ATTRS = {
    "axis": AttrSpec(AttrKind.AXES),
    "keepdims": AttrSpec(AttrKind.BOOL, default=False),
}


def reduction_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    axes = normalize_axes(attrs.get("axis"), len(x.shape))
    keep = attrs.get("keepdims", False)
    shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape) if keep or i not in axes)
    return TensorType(shape, x.dtype)


def _axes(x: np.ndarray, attrs: Attrs) -> tuple[int, ...]:
    return normalize_axes(attrs.get("axis"), x.ndim)


def _expand(g: np.ndarray, x: np.ndarray, attrs: Attrs) -> np.ndarray:
    """Bring a reduced gradient back to a shape that broadcasts against x."""
    return g if attrs.get("keepdims", False) else np.expand_dims(g, _axes(x, attrs))


def _count(x: np.ndarray, attrs: Attrs) -> int:
    return int(np.prod([x.shape[i] for i in _axes(x, attrs)], dtype=np.int64))


def _sum_vjp(g, xs, y, attrs, wants):
    return (np.broadcast_to(_expand(g, xs[0], attrs), xs[0].shape),)


def _mean_vjp(g, xs, y, attrs, wants):
    scale = 1.0 / max(_count(xs[0], attrs), 1)
    return (np.broadcast_to(_expand(g, xs[0], attrs) * scale, xs[0].shape),)


def _max_vjp(g, xs, y, attrs, wants):
    x = xs[0]
    mask = x == _expand(y, x, attrs)
    # Ties share the gradient equally, so the VJP stays the transpose of a linear map.
    share = mask / mask.sum(axis=_axes(x, attrs), keepdims=True)
    return (_expand(g, x, attrs) * share.astype(x.dtype),)


def _expand_node(em: Emitter, g: str, x: str, attrs: Attrs) -> str:
    """`_expand` as a node: the reduced gradient reshaped with the reduced axes kept as 1."""
    if attrs.get("keepdims", False):
        return g
    shape = em.type(x).shape
    axes = normalize_axes(attrs.get("axis"), len(shape))
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
    return g if em.type(g).shape == kept else em.emit("reshape", [g], {"shape": kept})


def _broadcast_node(em: Emitter, v: str, shape: tuple[int, ...]) -> str:
    return v if em.type(v).shape == shape else em.emit("broadcast_to", [v], {"shape": shape})


def _sum_grad(em, g, xs, y, attrs, wants):
    return (_broadcast_node(em, _expand_node(em, g, xs[0], attrs), em.type(xs[0]).shape),)


def _mean_grad(em, g, xs, y, attrs, wants):
    shape = em.type(xs[0]).shape
    axes = normalize_axes(attrs.get("axis"), len(shape))
    count = int(np.prod([shape[i] for i in axes], dtype=np.int64))
    scaled = em.emit("mul", [_expand_node(em, g, xs[0], attrs), em.const(1.0 / max(count, 1), g)])
    return (_broadcast_node(em, scaled, shape),)


def _max_grad(em, g, xs, y, attrs, wants):
    share = em.emit("max_share", [xs[0]], {"axis": attrs.get("axis")})
    return (em.emit("mul", [_expand_node(em, g, xs[0], attrs), share]),)


def _max_share(xs: Sequence[np.ndarray], attrs: Attrs) -> np.ndarray:
    x = xs[0]
    axes = _axes(x, attrs)
    mask = x == np.max(x, axis=axes, keepdims=True)
    return (mask / mask.sum(axis=axes, keepdims=True)).astype(x.dtype)


def _flops(ins: Sequence[TensorType], out: TensorType, attrs: Attrs) -> float:
    return float(ins[0].size)


def _batch(name: str) -> BatchFn:
    def rule(
        em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
    ) -> str:
        rank = len(tys[0].shape)
        axes = normalize_axes(at.get("axis"), rank)
        attrs = {"axis": tuple(a + 1 for a in axes), "keepdims": at.get("keepdims", False)}
        return str(em.emit(name, [ins[0].name], attrs))

    return rule


def _reduction(name: str, fn: Callable[..., Any], vjp: VjpFn, grad: GradFn) -> None:
    register(
        Op(
            name,
            1,
            reduction_type,
            lambda xs, at: np.asarray(
                fn(xs[0], axis=_axes(xs[0], at), keepdims=at.get("keepdims", False))
            ),
            vjp,
            attrs=REDUCTION_ATTRS,
            flops=_flops,
            batch=_batch(name),
            grad=grad,
            kernel=lambda at, tys: functools.partial(
                fn,
                axis=normalize_axes(at.get("axis"), len(tys[0].shape)),
                keepdims=at.get("keepdims", False),
            ),
        )
    )


_reduction("sum", np.add.reduce, _sum_vjp, _sum_grad)  # np.sum's own loop, without its wrapper
_reduction("mean", np.mean, _mean_vjp, _mean_grad)
_reduction("max", np.max, _max_vjp, _max_grad)


def _share_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    normalize_axes(attrs.get("axis"), len(ins[0].shape))  # raises ShapeError when bad
    return ins[0]


def _share_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    axes = normalize_axes(at.get("axis"), len(tys[0].shape))
    return str(em.emit("max_share", [ins[0].name], {"axis": tuple(a + 1 for a in axes)}))


register(
    Op(
        "max_share",
        1,
        _share_infer,
        _max_share,
        lambda g, xs, y, at, w: (None,),
        attrs={"axis": AttrSpec(AttrKind.AXES)},
        flops=_flops,
        doc="each element's share of max(x, axis): 1/k for the k elements equal to the max",
        batch=_share_batch,
        grad=lambda em, g, xs, y, at, w: (None,),
    )
)
