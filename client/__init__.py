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
    broadcast_to,
    concat,
    constant,
    cos,
    div,
    exp,
    grad,
    input,
    log,
    log_softmax,
    matmul,
    max,
    maximum,
    mean,
    minimum,
    mse,
    mul,
    neg,
    pow,
    relu,
    reshape,
    sigmoid,
    sin,
    softmax,
    softmax_cross_entropy,
    sqrt,
    sub,
    sum,
    tanh,
    transpose,
)
from graphgrad._connect import connect
from graphgrad.engine import FeedError, GraphError, RequestError, ValidationError

# Loaded on first use (PEP 562): the remote client brings gRPC and protobuf, which neither
# `import graphgrad.engine` (every Ray worker does it) nor an in-process user needs.
_LAZY = {
    "Job": "graphgrad._jobs",
    "LocalClient": "graphgrad._local",
    "RemoteClient": "graphgrad._remote",
    "RemoteError": "graphgrad._remote",
    "RemoteJob": "graphgrad._remote_jobs",
    "Result": "graphgrad._result",
}

if TYPE_CHECKING:
    from graphgrad._jobs import Job
    from graphgrad._local import LocalClient
    from graphgrad._remote import RemoteClient, RemoteError
    from graphgrad._remote_jobs import RemoteJob
    from graphgrad._result import Result


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
    "RemoteClient",
    "RemoteError",
    "RemoteJob",
    "RequestError",
    "Result",
    "Tensor",
    "ValidationError",
    "__version__",
    "abs",
    "add",
    "broadcast_to",
    "concat",
    "connect",
    "constant",
    "cos",
    "div",
    "exp",
    "grad",
    "input",
    "log",
    "log_softmax",
    "matmul",
    "max",
    "maximum",
    "mean",
    "minimum",
    "mse",
    "mul",
    "neg",
    "optim",
    "pow",
    "relu",
    "reshape",
    "sigmoid",
    "sin",
    "softmax",
    "softmax_cross_entropy",
    "sqrt",
    "sub",
    "sum",
    "tanh",
    "transpose",
]
