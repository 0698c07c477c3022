"""`gg.from_onnx` / `gg.to_onnx`: ONNX models as builder graphs, builder graphs as ONNX models.

Thin wrappers of `graphgrad.onnx` (the wire-layer converter) giving and taking builder tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphgrad import onnx as onnx_convert
from graphgrad._builder import Tensor
from graphgrad._saving import Saved, graph_and_params
from graphgrad._transforms import builder_graph


def from_onnx(
    model: Any,
    dims: Mapping[str, int] | None = None,
    feeds: Mapping[str, Any] | None = None,
) -> Saved:
    """An ONNX model (a path, its bytes or an `onnx.ModelProto`) as a graph: `.graph`,
    `.outputs` (the model's outputs, under their ONNX names) and `.params` (the float
    initializers by name, which are inputs of the graph, so gradients come back by name).
    A dynamic dimension takes its size from `dims` (dimension parameter -> size) or from the
    shapes of `feeds` (input name -> array). Needs the extra `graphgrad[onnx]`."""
    shapes = {k: np.shape(v) for k, v in (feeds or {}).items()}
    imported = onnx_convert.from_onnx(model, dims, shapes)
    name = Path(model).stem if isinstance(model, str | os.PathLike) else "onnx"
    builder = builder_graph(imported.graph, name)
    return Saved(builder, [builder[o] for o in imported.outputs], imported.params)


def to_onnx(
    outputs: Tensor | Sequence[Tensor],
    params: Mapping[str | Tensor, Any] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """The forward pass of the graph of `outputs` as an ONNX model (`onnx.ModelProto`, checked
    by `onnx.checker`): inputs given in `params` become initializers holding those values.
    Written to `path` too when given."""
    builder, outs, arrays = graph_and_params(outputs, params, "gg.to_onnx")
    model = onnx_convert.to_onnx(builder.freeze(), [o.name for o in outs], arrays, builder.name)
    if path is not None:
        Path(path).write_bytes(model.SerializeToString())
    return model
