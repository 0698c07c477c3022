"""Elementwise ops: unary maps and binary ops with numpy broadcasting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import (
    Attrs,
    BatchFn,
    Emitter,
    Op,
    ShapeError,
    TensorType,
    register,
)


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a broadcast gradient back down to `shape` (the inverse of numpy broadcasting)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


def unbroadcast_node(em: Emitter, g: str, shape: tuple[int, ...]) -> str:
    """`unbroadcast` as graph nodes: a keepdims sum over the broadcast axes, then a reshape."""
    have = em.type(g).shape
    if have == shape:
        return g
    lead = len(have) - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and have[lead + i] != 1
    )
    if axes:
        g = em.emit("sum", [g], {"axis": axes, "keepdims": True})
    return g if em.type(g).shape == shape else em.emit("reshape", [g], {"shape": shape})


def same_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    return ins[0]


def broadcast_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    a, b = ins
    if a.dtype != b.dtype:
        raise ShapeError(f"dtype mismatch: {a.dtype} and {b.dtype}")
    if a.shape == b.shape:
        return a  # the common case; nodes alike share their type (engine/eager.py keys on it)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"shapes {a.shape} and {b.shape} do not broadcast") from None
    return TensorType(tuple(shape), a.dtype)


UnaryGrad = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (g, x, y) -> dx
UnaryRule = Callable[[Emitter, str, str, str], str | None]  # (em, g, x, y) -> dx node


def _unary(
    name: str,
    fn: Callable[[np.ndarray], np.ndarray],
    grad: UnaryGrad,
    rule: UnaryRule,
    doc: str,
    inplace: bool = False,
) -> None:
    register(
        Op(
            name,
            1,
            same_type,
            lambda xs, a: fn(xs[0]),
            lambda g, xs, y, a, w: (grad(g, xs[0], y),),
            doc=doc,
            batch=lambda em, ins, tys, out, at: em.emit(name, [ins[0].name], at),
            grad=lambda em, g, xs, y, a, w: (rule(em, g, xs[0], y),),
            kernel=lambda at, tys: fn,
            inplace=inplace,
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


def _one_minus(em: Emitter, v: str) -> str:
    return em.emit("sub", [em.const(1, v), v])


def _zero(g: np.ndarray, x: np.ndarray, y: np.ndarray) -> Any:
    return None  # no gradient flows through a piecewise constant op


# Each rule emits the same numpy operations, in the same order, as the numeric VJP beside it.
_unary(
    "neg",
    np.negative,
    lambda g, x, y: -g,
    lambda em, g, x, y: em.emit("neg", [g]),
    "-x",
    inplace=True,
)
_unary("exp", np.exp, lambda g, x, y: g * y, lambda em, g, x, y: em.emit("mul", [g, y]), "e**x")
_unary(
    "log",
    np.log,
    lambda g, x, y: g / x,
    lambda em, g, x, y: em.emit("div", [g, x]),
    "natural logarithm",
)
_unary(
    "tanh",
    np.tanh,
    lambda g, x, y: g * (1 - y * y),
    lambda em, g, x, y: em.emit("mul", [g, _one_minus(em, em.emit("mul", [y, y]))]),
    "hyperbolic tangent",
)
_unary(
    "sigmoid",
    _sigmoid,
    lambda g, x, y: g * y * (1 - y),
    lambda em, g, x, y: em.emit("mul", [em.emit("mul", [g, y]), _one_minus(em, y)]),
    "1 / (1 + e**-x)",
)
_unary(
    "relu",
    lambda x: np.maximum(x, 0),
    lambda g, x, y: g * (x > 0),
    lambda em, g, x, y: em.emit("mul", [g, em.emit("step", [x])]),
    "max(x, 0)",
)
_unary(
    "sin",
    np.sin,
    lambda g, x, y: g * np.cos(x),
    lambda em, g, x, y: em.emit("mul", [g, em.emit("cos", [x])]),
    "sine",
)
_unary(
    "cos",
    np.cos,
    lambda g, x, y: -g * np.sin(x),
    lambda em, g, x, y: em.emit("mul", [em.emit("neg", [g]), em.emit("sin", [x])]),
    "cosine",
)
_unary(
    "sqrt",
    np.sqrt,
    lambda g, x, y: g / (2 * y),
    lambda em, g, x, y: em.emit("div", [g, em.emit("mul", [em.const(2, y), y])]),
    "square root",
)
_unary(
    "abs",
    np.abs,
    lambda g, x, y: g * np.sign(x),
    lambda em, g, x, y: em.emit("mul", [g, em.emit("sign", [x])]),
    "|x|",
)
# Helpers that gradient rules emit (piecewise constant: no gradient flows through them).
_unary(
    "step",
    lambda x: (x > 0).astype(x.dtype),
    _zero,
    lambda em, g, x, y: None,
    "1 where x > 0, else 0 (the derivative of relu)",
)
_unary("sign", np.sign, _zero, lambda em, g, x, y: None, "-1, 0 or 1")
_unary(
    "safe_log",
    lambda x: np.log(np.where(x == 0, 1, x)),
    lambda g, x, y: g / x,
    lambda em, g, x, y: em.emit("div", [g, x]),
    "log(x), with 0 where x == 0 (the derivative of a**b in b)",
)


BinaryGrad = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, Sequence[bool]],
    tuple[np.ndarray | None, np.ndarray | None],
]
# (em, g, a, b, y, wants) -> (da, db) nodes before unbroadcasting
BinaryRule = Callable[[Emitter, str, str, str, str, Sequence[bool]], tuple[str | None, str | None]]


def _binary(
    name: str,
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    grad: BinaryGrad,
    rule: BinaryRule,
    inplace: bool = False,
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

    def graph_rule(
        em: Emitter, g: str, xs: Sequence[str], y: str, attrs: Attrs, wants: Sequence[bool]
    ) -> tuple[str | None, str | None]:
        a, b = xs
        da, db = rule(em, g, a, b, y, wants)
        return (
            None if da is None else unbroadcast_node(em, da, em.type(a).shape),
            None if db is None else unbroadcast_node(em, db, em.type(b).shape),
        )

    register(
        Op(
            name,
            2,
            broadcast_type,
            lambda xs, at: fn(xs[0], xs[1]),
            vjp,
            batch=batch_broadcasting(name),
            grad=graph_rule,
            kernel=lambda at, tys: fn,
            inplace=inplace,
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


def _when(want: bool, f: Callable[[], str]) -> str | None:
    return f() if want else None


def _pow_rule(em, g, a, b, y, w):
    def da() -> str:
        gb = em.emit("mul", [g, b])
        return em.emit("mul", [gb, em.emit("pow", [a, em.emit("sub", [b, em.const(1, b)])])])

    def db() -> str:
        return em.emit("mul", [em.emit("mul", [g, em.emit("safe_log", [a])]), y])

    return _when(w[0], da), _when(w[1], db)


def _select_rule(a_first: bool) -> BinaryRule:
    def rule(em, g, a, b, y, w):
        share = em.emit("select_share", [a, b] if a_first else [b, a])
        return (
            _when(w[0], lambda: em.emit("mul", [g, share])),
            _when(w[1], lambda: em.emit("mul", [g, _one_minus(em, share)])),
        )

    return rule


_binary(
    "add",
    np.add,
    lambda g, a, b, y, w: (g, g),
    lambda em, g, a, b, y, w: (g, g),
    inplace=True,
)
_binary(
    "sub",
    np.subtract,
    lambda g, a, b, y, w: (g, -g),
    lambda em, g, a, b, y, w: (g, _when(w[1], lambda: em.emit("neg", [g]))),
    inplace=True,
)
_binary(
    "mul",
    np.multiply,
    lambda g, a, b, y, w: (_if(w[0], lambda: g * b), _if(w[1], lambda: g * a)),
    lambda em, g, a, b, y, w: (
        _when(w[0], lambda: em.emit("mul", [g, b])),
        _when(w[1], lambda: em.emit("mul", [g, a])),
    ),
    inplace=True,
)
_binary(
    "div",
    np.divide,
    lambda g, a, b, y, w: (_if(w[0], lambda: g / b), _if(w[1], lambda: -g * y / b)),
    lambda em, g, a, b, y, w: (
        _when(w[0], lambda: em.emit("div", [g, b])),
        _when(w[1], lambda: em.emit("div", [em.emit("mul", [em.emit("neg", [g]), y]), b])),
    ),
    inplace=True,
)
_binary("pow", np.power, _pow_grad, _pow_rule)
_binary("maximum", np.maximum, _select_grad(np.greater), _select_rule(True))
_binary("minimum", np.minimum, _select_grad(np.less), _select_rule(False))


def _share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.greater(a, b) + 0.5 * (a == b)).astype(a.dtype)


register(
    Op(
        "select_share",
        2,
        broadcast_type,
        lambda xs, at: _share(xs[0], xs[1]),
        lambda g, xs, y, at, w: (None, None),
        doc="1 where a > b, 0.5 where a == b, else 0: the share of a in maximum(a, b)",
        batch=batch_broadcasting("select_share"),
        grad=lambda em, g, xs, y, at, w: (None, None),
    )
)
