"""Softmax family and losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._registry import (
    AttrKind,
    Attrs,
    AttrSpec,
    BatchFn,
    Emitter,
    Op,
    ShapeError,
    TensorType,
    register,
)
from .elementwise import batch_broadcasting, broadcast_type, unbroadcast, unbroadcast_node

_AXIS = {"axis": AttrSpec(AttrKind.INT, default=-1)}


def _axis_type(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    x = ins[0]
    axis = attrs.get("axis", -1)
    if not -len(x.shape) <= axis < len(x.shape):
        raise ShapeError(f"axis {axis} is out of range for rank {len(x.shape)}", field="attrs.axis")
    return x


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_vjp(g, xs, y, at, w):
    axis = at.get("axis", -1)
    return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)


def _log_softmax_vjp(g, xs, y, at, w):
    axis = at.get("axis", -1)
    return (g - np.exp(y) * g.sum(axis=axis, keepdims=True),)


def _keepsum(em: Emitter, x: str, axis: int) -> str:
    return em.emit("sum", [x], {"axis": axis, "keepdims": True})


def _softmax_grad(em, g, xs, y, at, w):
    inner = em.emit("sub", [g, _keepsum(em, em.emit("mul", [g, y]), at.get("axis", -1))])
    return (em.emit("mul", [y, inner]),)


def _log_softmax_grad(em, g, xs, y, at, w):
    scaled = em.emit("mul", [em.emit("exp", [y]), _keepsum(em, g, at.get("axis", -1))])
    return (em.emit("sub", [g, scaled]),)


def _axis_batch(name: str) -> BatchFn:
    def rule(
        em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
    ) -> str:
        rank = len(tys[0].shape)
        names = [em.lead(x, t, rank) for x, t in zip(ins, tys, strict=True)]
        return str(em.emit(name, names, {"axis": at.get("axis", -1) % rank + 1}))

    return rule


def _mse_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    # One loss per network: the mean over every axis but the network axis.
    diff_type = TensorType(tuple(np.broadcast_shapes(tys[0].shape, tys[1].shape)), out.dtype)
    d = batch_broadcasting("sub")(em, ins, tys, diff_type, {})
    sq = em.emit("mul", [d, d])
    return str(em.emit("mean", [sq], {"axis": tuple(range(1, len(diff_type.shape) + 1))}))


register(
    Op(
        "softmax",
        1,
        _axis_type,
        lambda xs, at: _softmax(xs[0], at.get("axis", -1)),
        _softmax_vjp,
        attrs=_AXIS,
        batch=_axis_batch("softmax"),
        grad=_softmax_grad,
    )
)
register(
    Op(
        "log_softmax",
        1,
        _axis_type,
        lambda xs, at: _log_softmax(xs[0], at.get("axis", -1)),
        _log_softmax_vjp,
        attrs=_AXIS,
        batch=_axis_batch("log_softmax"),
        grad=_log_softmax_grad,
    )
)


def _sce_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    logits, labels = ins
    if logits.shape != labels.shape or logits.dtype != labels.dtype:
        raise ShapeError(
            f"logits and labels must have the same shape and dtype, got "
            f"{logits.shape} {logits.dtype} and {labels.shape} {labels.dtype}"
        )
    x = _axis_type(ins, attrs)
    axis = attrs.get("axis", -1) % len(x.shape)
    return TensorType(x.shape[:axis] + x.shape[axis + 1 :], x.dtype)


def _sce_forward(xs: Sequence[np.ndarray], at: Attrs) -> np.ndarray:
    logits, labels = xs
    return np.asarray(
        -(labels * _log_softmax(logits, at.get("axis", -1))).sum(axis=at.get("axis", -1))
    )


def _sce_vjp(g, xs, y, at, w):
    logits, labels = xs
    axis = at.get("axis", -1) % logits.ndim
    gk = np.expand_dims(g, axis)
    logp = _log_softmax(logits, axis)
    dlogits = gk * (np.exp(logp) * labels.sum(axis=axis, keepdims=True) - labels) if w[0] else None
    return dlogits, (-gk * logp if w[1] else None)


def _sce_grad(em, g, xs, y, at, w):
    logits, labels = xs
    shape = em.type(logits).shape
    axis = at.get("axis", -1) % len(shape)
    gk = em.emit("reshape", [g], {"shape": (*shape[:axis], 1, *shape[axis + 1 :])})
    logp = em.emit("log_softmax", [logits], {"axis": axis})
    dlogits = None
    if w[0]:
        p_total = em.emit("mul", [em.emit("exp", [logp]), _keepsum(em, labels, axis)])
        dlogits = em.emit("mul", [gk, em.emit("sub", [p_total, labels])])
    dlabels = em.emit("mul", [em.emit("neg", [gk]), logp]) if w[1] else None
    return dlogits, dlabels


register(
    Op(
        "softmax_cross_entropy",
        2,
        _sce_infer,
        _sce_forward,
        _sce_vjp,
        attrs=_AXIS,
        batch=_axis_batch("softmax_cross_entropy"),
        grad=_sce_grad,
        doc="-sum(labels * log_softmax(logits), axis): one loss per example",
    )
)


def _mse_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    return TensorType((), broadcast_type(ins, attrs).dtype)


def _mse_vjp(g, xs, y, at, w):
    pred, target = xs
    diff = pred - target
    d = (2.0 / max(diff.size, 1)) * g * diff
    return (
        unbroadcast(d, pred.shape) if w[0] else None,
        unbroadcast(-d, target.shape) if w[1] else None,
    )


def _mse_grad(em, g, xs, y, at, w):
    pred, target = xs
    diff = em.emit("sub", [pred, target])
    size = max(em.type(diff).size, 1)
    d = em.emit("mul", [em.emit("mul", [em.const(2.0 / size, g), g]), diff])
    return (
        unbroadcast_node(em, d, em.type(pred).shape) if w[0] else None,
        unbroadcast_node(em, em.emit("neg", [d]), em.type(target).shape) if w[1] else None,
    )


register(
    Op(
        "mse",
        2,
        _mse_infer,
        lambda xs, at: np.asarray(np.mean((xs[0] - xs[1]) ** 2), dtype=xs[0].dtype),
        _mse_vjp,
        doc="mean((pred - target)**2), a scalar",
        batch=_mse_batch,
        grad=_mse_grad,
    )
)
