"""Nodes with no inputs: graph inputs (fed at run time) and constants (values in the graph)."""

from __future__ import annotations

from collections.abc import Sequence

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


def _no_forward(xs: Sequence[np.ndarray], at: Attrs) -> np.ndarray:
    raise AssertionError("graph inputs are fed, never computed")


def _input_infer(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
    raise ShapeError("an input's type is its declared shape and dtype")


INPUT = register(Op("input", 0, _input_infer, _no_forward, None, doc="a value fed at run time"))

CONSTANT = register(
    Op(
        "constant",
        0,
        lambda ins, at: TensorType(tuple(at["value"].shape), at["value"].dtype.name),
        lambda xs, at: at["value"],
        None,
        attrs={"value": AttrSpec(AttrKind.TENSOR, required=True)},
        flops=lambda ins, out, at: 0.0,
        doc="a value stored in the graph",
    )
)
