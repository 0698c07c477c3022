"""Softmax family and losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrad.engine.ops._registry import (
    FLOAT_DTYPES,
    INT_DTYPES,
    AttrKind,
    Attrs,
    AttrSpec,
    BatchFn,
    Emitter,
    Op,
    ShapeError,
    TensorType,
    normalize_axes,
    register,
)
from graphgrad.engine.ops.elementwise import (
    batch_broadcasting,
    broadcast_type,
    unbroadcast,
    unbroadcast_node,
)
from graphgrad.engine.ops.indexing import _put_along_add, check_range
from graphgrad.engine.ops.reduce import REDUCTION_ATTRS, reduction_type

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
        doc="exp(x) / sum(exp(x), axis): probabilities along `axis` (computed shifted by the max)",
        inputs=("x",),
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
        doc="x - logsumexp(x, axis, keepdims=True): log-probabilities along `axis`, stably",
        inputs=("x",),
    )
)


def _sce_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    logits, labels = ins
    if logits.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"logits must be {' or '.join(FLOAT_DTYPES)}, got {logits.dtype}")
    x = _axis_type(ins, attrs)
    axis = attrs.get("axis", -1) % len(x.shape)
    out = x.shape[:axis] + x.shape[axis + 1 :]
    if x.shape[axis] == 0:
        raise ShapeError(f"logits {logits.shape} have no classes along axis {axis}")
    if labels.dtype in INT_DTYPES:  # class indices, one per example
        if labels.shape != out:
            raise ShapeError(
                f"integer labels (class indices) must have shape {out}: the logits' "
                f"{logits.shape} without axis {axis}; got {labels.shape}"
            )
    elif logits.shape != labels.shape or logits.dtype != labels.dtype:
        raise ShapeError(
            f"logits and labels must have the same shape and dtype, got "
            f"{logits.shape} {logits.dtype} and {labels.shape} {labels.dtype}"
        )
    return TensorType(out, x.dtype)


def _is_index(labels: np.ndarray) -> bool:
    return labels.dtype.kind == "i"


def _sce_forward(xs: Sequence[np.ndarray], at: Attrs) -> np.ndarray:
    logits, labels = xs
    axis = at.get("axis", -1) % logits.ndim
    logp = _log_softmax(logits, axis)
    if _is_index(labels):
        idx = np.expand_dims(labels, axis)
        check_range(idx, logits.shape[axis], axis)
        return np.asarray(-np.take_along_axis(logp, idx, axis=axis).squeeze(axis))
    return np.asarray(-(labels * logp).sum(axis=axis))


def _sce_vjp(g, xs, y, at, w):
    logits, labels = xs
    axis = at.get("axis", -1) % logits.ndim
    gk = np.expand_dims(g, axis)
    logp = _log_softmax(logits, axis)
    if _is_index(labels):
        if not w[0]:
            return None, None
        idx = np.expand_dims(labels, axis)
        return gk * np.exp(logp) - _put_along_add(gk, idx, axis, logits.shape[axis]), None
    dlogits = gk * (np.exp(logp) * labels.sum(axis=axis, keepdims=True) - labels) if w[0] else None
    return dlogits, (-gk * logp if w[1] else None)


def _sce_grad(em, g, xs, y, at, w):
    logits, labels = xs
    shape = em.type(logits).shape
    axis = at.get("axis", -1) % len(shape)
    kept = (*shape[:axis], 1, *shape[axis + 1 :])
    gk = em.emit("reshape", [g], {"shape": kept})
    logp = em.emit("log_softmax", [logits], {"axis": axis})
    if em.type(labels).dtype in INT_DTYPES:
        if not w[0]:
            return None, None
        idx = em.emit("reshape", [labels], {"shape": kept})
        hot = em.emit("put_along_axis_add", [gk, idx], {"axis": axis, "size": shape[axis]})
        return em.emit("sub", [em.emit("mul", [gk, em.emit("exp", [logp])]), hot]), None
    dlogits = None
    if w[0]:
        p_total = em.emit("mul", [em.emit("exp", [logp]), _keepsum(em, labels, axis)])
        dlogits = em.emit("mul", [gk, em.emit("sub", [p_total, labels])])
    dlabels = em.emit("mul", [em.emit("neg", [gk]), logp]) if w[1] else None
    return dlogits, dlabels


def _sce_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    rank = len(tys[0].shape)
    names = [em.lead(x, t, len(t.shape)) for x, t in zip(ins, tys, strict=True)]
    return str(em.emit("softmax_cross_entropy", names, {"axis": at.get("axis", -1) % rank + 1}))


register(
    Op(
        "softmax_cross_entropy",
        2,
        _sce_infer,
        _sce_forward,
        _sce_vjp,
        attrs=_AXIS,
        batch=_sce_batch,
        grad=_sce_grad,
        doc=(
            "-sum(labels * log_softmax(logits, axis), axis): one loss per example. `labels` "
            "are probabilities of the logits' shape and dtype, or int32/int64 class indices "
            "of the logits' shape without `axis` (the loss is then -log_softmax(logits) at "
            "each label; no gradient flows to integer labels)."
        ),
        inputs=("logits", "labels"),
        any_dtype=True,
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
        doc="mean((pred - target)**2) over every element, a scalar; pred and target broadcast",
        inputs=("pred", "target"),
        batch=_mse_batch,
        grad=_mse_grad,
    )
)


def _logsumexp(x: np.ndarray, at: Attrs) -> np.ndarray:
    axes = normalize_axes(at.get("axis"), x.ndim)
    m = np.max(x, axis=axes, keepdims=True) if x.size else np.zeros((1,) * x.ndim, x.dtype)
    m = np.where(np.isfinite(m), m, 0)  # all -inf (or an inf): no shift, log gives the answer
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(x - m).sum(axis=axes, keepdims=True)) + m
    return out if at.get("keepdims", False) else np.squeeze(out, axis=axes)


def _kept(shape: tuple[int, ...], at: Attrs) -> tuple[int, ...]:
    axes = normalize_axes(at.get("axis"), len(shape))
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _lse_vjp(g, xs, y, at, w):
    kept = _kept(xs[0].shape, at)
    return (g.reshape(kept) * np.exp(xs[0] - y.reshape(kept)),)


def _lse_grad(em, g, xs, y, at, w):
    kept = _kept(em.type(xs[0]).shape, at)
    gk = em.emit("reshape", [g], {"shape": kept})
    yk = em.emit("reshape", [y], {"shape": kept})
    return (em.emit("mul", [gk, em.emit("exp", [em.emit("sub", [xs[0], yk])])]),)


def _lse_batch(
    em: Any, ins: Sequence[Any], tys: Sequence[TensorType], out: TensorType, at: dict[str, Any]
) -> str:
    axes = normalize_axes(at.get("axis"), len(tys[0].shape))
    attrs = {"axis": tuple(a + 1 for a in axes), "keepdims": at.get("keepdims", False)}
    return str(em.emit("logsumexp", [ins[0].name], attrs))


register(
    Op(
        "logsumexp",
        1,
        reduction_type,
        lambda xs, at: _logsumexp(xs[0], at),
        _lse_vjp,
        attrs=REDUCTION_ATTRS,
        doc=(
            "log(sum(exp(x), axis)), computed without overflow (shifted by the max), like "
            "scipy.special.logsumexp; axis absent: over all elements. Its gradient is "
            "softmax(x) along the axes."
        ),
        batch=_lse_batch,
        grad=_lse_grad,
        inputs=("x",),
    )
)
