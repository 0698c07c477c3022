"""Elementwise ops: unary maps and binary ops with numpy broadcasting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._registry import Attrs, BatchFn, Op, ShapeError, TensorType, register


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a broadcast gradient back down to `shape` (the inverse of numpy broadcasting)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


def same_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    return ins[0]


def broadcast_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    a, b = ins
    if a.dtype != b.dtype:
        raise ShapeError(f"dtype mismatch: {a.dtype} and {b.dtype}")
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"shapes {a.shape} and {b.shape} do not broadcast") from None
    return TensorType(tuple(shape), a.dtype)


UnaryGrad = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (g, x, y) -> dx


def _unary(name: str, fn: Callable[[np.ndarray], np.ndarray], grad: UnaryGrad, doc: str) -> None:
    register(
        Op(
            name,
            1,
            same_type,
            lambda xs, a: fn(xs[0]),
            lambda g, xs, y, a, w: (grad(g, xs[0], y),),
            doc=doc,
            batch=lambda em, ins, tys, out, at: em.emit(name, [ins[0].name], at),
        )
    )


def batch_broadcasting(name: str) -> BatchFn:
    """Batched operands get the network axis in front of as many axes as the output has;
    unbatched operands broadcast from the right as they are."""

    def rule(
        em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
    ) -> str:
        rank = len(out.shape)
        names = [
            em.lead(x, t, rank) if x.batched else x.name for x, t in zip(ins, tys, strict=True)
        ]
        return str(em.emit(name, names, at))

    return rule


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1)  # no overflow for large |x|


_unary("neg", np.negative, lambda g, x, y: -g, "-x")
_unary("exp", np.exp, lambda g, x, y: g * y, "e**x")
_unary("log", np.log, lambda g, x, y: g / x, "natural logarithm")
_unary("tanh", np.tanh, lambda g, x, y: g * (1 - y * y), "hyperbolic tangent")
_unary("sigmoid", _sigmoid, lambda g, x, y: g * y * (1 - y), "1 / (1 + e**-x)")
_unary("relu", lambda x: np.maximum(x, 0), lambda g, x, y: g * (x > 0), "max(x, 0)")
_unary("sin", np.sin, lambda g, x, y: g * np.cos(x), "sine")
_unary("cos", np.cos, lambda g, x, y: -g * np.sin(x), "cosine")
_unary("sqrt", np.sqrt, lambda g, x, y: g / (2 * y), "square root")
_unary("abs", np.abs, lambda g, x, y: g * np.sign(x), "|x|")


BinaryGrad = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, Sequence[bool]],
    tuple[np.ndarray | None, np.ndarray | None],
]


def _binary(
    name: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], grad: BinaryGrad
) -> None:
    def vjp(
        g: np.ndarray, xs: Sequence[np.ndarray], y: np.ndarray, attrs: Attrs, wants: Sequence[bool]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        a, b = xs
        da, db = grad(g, a, b, y, wants)
        return (
            None if da is None else unbroadcast(da, a.shape),
            None if db is None else unbroadcast(db, b.shape),
        )

    register(
        Op(
            name,
            2,
            broadcast_type,
            lambda xs, at: fn(xs[0], xs[1]),
            vjp,
            batch=batch_broadcasting(name),
        )
    )


def _if(want: bool, f: Callable[[], np.ndarray]) -> np.ndarray | None:
    return f() if want else None


def _pow_grad(g, a, b, y, w):
    def db() -> np.ndarray:
        # d(a**b)/db = log(a) * a**b; at a == 0 the limit used by JAX and PyTorch is 0.
        safe = np.where(a == 0, 1, a)
        return g * np.log(safe) * y

    return _if(w[0], lambda: g * b * a ** (b - 1)), _if(w[1], db)


def _select_grad(pick_a: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> BinaryGrad:
    # Where both inputs tie, the gradient is split evenly (as JAX does).
    def grad(g, a, b, y, w):
        share = (pick_a(a, b) + 0.5 * (a == b)).astype(g.dtype)
        return _if(w[0], lambda: g * share), _if(w[1], lambda: g * (1 - share))

    return grad


_binary("add", np.add, lambda g, a, b, y, w: (g, g))
_binary("sub", np.subtract, lambda g, a, b, y, w: (g, -g))
_binary(
    "mul", np.multiply, lambda g, a, b, y, w: (_if(w[0], lambda: g * b), _if(w[1], lambda: g * a))
)
_binary(
    "div",
    np.divide,
    lambda g, a, b, y, w: (_if(w[0], lambda: g / b), _if(w[1], lambda: -g * y / b)),
)
_binary("pow", np.power, _pow_grad)
_binary("maximum", np.maximum, _select_grad(np.greater))
_binary("minimum", np.minimum, _select_grad(np.less))
