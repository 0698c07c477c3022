"""Comparisons and arg-reductions: outputs that are not differentiable.

graphgrad has no boolean dtype: a comparison gives 1 where it holds and 0 elsewhere, in the
dtype of its inputs, so a mask multiplies floats directly (`x * (x > 0)`) and feeds `where`.
Their VJP rules give no gradient (None): the outputs are piecewise constant. argmax/argmin
give int64 indices, which no gradient flows through either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import (
    AttrKind,
    Attrs,
    AttrSpec,
    Op,
    ShapeError,
    TensorType,
    register,
)
from graphgrad.engine.ops.elementwise import batch_broadcasting, broadcast_type


def _comparison(name: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], what: str) -> None:
    def forward(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(fn(a, b)).astype(a.dtype)

    register(
        Op(
            name,
            2,
            broadcast_type,
            lambda xs, at: forward(xs[0], xs[1]),
            lambda g, xs, y, at, w: (None, None),
            doc=(
                f"1 where {what}, else 0, in the inputs' dtype (numpy.{name} as numbers), with "
                "numpy broadcasting. Not differentiable: no gradient flows through it."
            ),
            batch=batch_broadcasting(name),
            grad=lambda em, g, xs, y, at, w: (None, None),
            kernel=lambda at, tys: forward,
            inputs=("a", "b"),
            any_dtype=True,
        )
    )


_comparison("less", np.less, "a < b")
_comparison("less_equal", np.less_equal, "a <= b")
_comparison("greater", np.greater, "a > b")
_comparison("greater_equal", np.greater_equal, "a >= b")
_comparison("equal", np.equal, "a == b")
_comparison("not_equal", np.not_equal, "a != b")


def _arg_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    (x,) = ins
    axis, keep = attrs.get("axis"), attrs.get("keepdims", False)
    if x.size == 0:
        raise ShapeError(f"x {x.shape} is empty: it has no largest or smallest element")
    if axis is None:
        return TensorType((1,) * len(x.shape) if keep else (), "int64")
    if not -len(x.shape) <= axis < len(x.shape):
        raise ShapeError(f"axis {axis} is out of range for rank {len(x.shape)}", field="attrs.axis")
    a = axis % len(x.shape)
    shape = tuple(1 if i == a else n for i, n in enumerate(x.shape) if keep or i != a)
    return TensorType(shape, "int64")


def _arg_reduction(name: str, fn: Callable[..., Any], what: str) -> None:
    def forward(xs: Sequence[np.ndarray], at: Attrs) -> np.ndarray:
        return np.asarray(
            fn(xs[0], axis=at.get("axis"), keepdims=at.get("keepdims", False)), dtype=np.int64
        )

    def batch(
        em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
    ) -> str:
        x, t = ins[0].name, tys[0]
        keep = at.get("keepdims", False)
        if at.get("axis") is None:  # over each network's elements, flattened
            flat = em.emit("reshape", [x], {"shape": (em.n, t.size)})
            got = em.emit(name, [flat], {"axis": 1, "keepdims": keep})
            return str(em.emit("reshape", [got], {"shape": (em.n, *out.shape)}) if keep else got)
        axis = at["axis"] % len(t.shape) + 1
        return str(em.emit(name, [x], {"axis": axis, "keepdims": keep}))

    register(
        Op(
            name,
            1,
            _arg_infer,
            forward,
            lambda g, xs, y, at, w: (None,),
            attrs={
                "axis": AttrSpec(AttrKind.INT),
                "keepdims": AttrSpec(AttrKind.BOOL, default=False),
            },
            doc=(
                f"numpy.{name}: the int64 index of the {what} element along `axis` (absent: of "
                "x flattened); the first one where several tie. Not differentiable."
            ),
            batch=batch,
            grad=lambda em, g, xs, y, at, w: (None,),
            inputs=("x",),
            any_dtype=True,
        )
    )


_arg_reduction("argmax", np.argmax, "largest")
_arg_reduction("argmin", np.argmin, "smallest")
