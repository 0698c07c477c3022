"""graphgrad: build computation graphs in Python, get values and gradients, locally or remotely.

import graphgrad as gg
with gg.Graph():
    x = gg.input("x", shape=(3,))
    y = gg.sum(gg.tanh(x) ** 2)
gg.connect().run(y, {"x": [1.0, 2.0, 3.0]}, wrt=[x]).grads["x"]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphgrad import optim
from graphgrad._builder import (
    Graph,
    Tensor,
    abs,
    add,
    argmax,
    argmin,
    astype,
    broadcast_to,
    clip,
    concat,
    constant,
    cos,
    div,
    equal,
    exp,
    expand_dims,
    greater,
    greater_equal,
    input,
    less,
    less_equal,
    log,
    log_softmax,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    mse,
    mul,
    neg,
    not_equal,
    pow,
    relu,
    reshape,
    sigmoid,
    sin,
    softmax,
    softmax_cross_entropy,
    split,
    sqrt,
    squeeze,
    stack,
    sub,
    sum,
    take,
    take_along_axis,
    tanh,
    transpose,
    where,
)
from graphgrad._connect import connect
from graphgrad._transforms import grad, value_and_grad, vmap
from graphgrad.engine import FeedError, GraphError, RequestError, ValidationError

# Loaded on first use (PEP 562): the remote client brings gRPC and protobuf, which neither
# `import graphgrad.engine` (every Ray worker does it) nor an in-process user needs; so do
# saving and ONNX.
_LAZY = {
    "Job": "graphgrad._local_job",
    "LocalClient": "graphgrad._local",
    "Prepared": "graphgrad._prepared",
    "RemoteClient": "graphgrad._remote",
    "RemoteError": "graphgrad._remote",
    "RemoteJob": "graphgrad._remote_job",
    "Result": "graphgrad._result",
    "Saved": "graphgrad._saving",
    "from_onnx": "graphgrad._onnx_sdk",
    "to_onnx": "graphgrad._onnx_sdk",
    "SavedGraphError": "graphgrad._saving",
    "load": "graphgrad._saving",
    "save": "graphgrad._saving",
}

if TYPE_CHECKING:
    from graphgrad._local import LocalClient
    from graphgrad._local_job import Job
    from graphgrad._onnx_sdk import from_onnx, to_onnx
    from graphgrad._prepared import Prepared
    from graphgrad._remote import RemoteClient, RemoteError
    from graphgrad._remote_job import RemoteJob
    from graphgrad._result import Result
    from graphgrad._saving import Saved, SavedGraphError, load, save


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphgrad' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "FeedError",
    "Graph",
    "GraphError",
    "Job",
    "LocalClient",
    "Prepared",
    "RemoteClient",
    "RemoteError",
    "RemoteJob",
    "RequestError",
    "Result",
    "Saved",
    "SavedGraphError",
    "Tensor",
    "ValidationError",
    "__version__",
    "abs",
    "add",
    "argmax",
    "argmin",
    "astype",
    "broadcast_to",
    "clip",
    "concat",
    "connect",
    "constant",
    "cos",
    "div",
    "equal",
    "exp",
    "expand_dims",
    "from_onnx",
    "grad",
    "greater",
    "greater_equal",
    "input",
    "less",
    "less_equal",
    "load",
    "log",
    "log_softmax",
    "logsumexp",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "mse",
    "mul",
    "neg",
    "not_equal",
    "optim",
    "pow",
    "relu",
    "reshape",
    "save",
    "sigmoid",
    "sin",
    "softmax",
    "softmax_cross_entropy",
    "split",
    "sqrt",
    "squeeze",
    "stack",
    "sub",
    "sum",
    "take",
    "take_along_axis",
    "tanh",
    "to_onnx",
    "transpose",
    "value_and_grad",
    "vmap",
    "where",
]
