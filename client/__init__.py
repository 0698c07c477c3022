"""graphgrad: build computation graphs in Python, get values and gradients, locally or remotely.

import graphgrad as gg
with gg.Graph():
    x = gg.input("x", shape=(3,))
    y = gg.sum(gg.tanh(x) ** 2)
gg.connect().run(y, {"x": [1.0, 2.0, 3.0]}, wrt=[x]).grads["x"]
"""

from . import optim
from ._builder import (
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
from ._connect import connect
from ._jobs import Job
from ._local import LocalClient
from ._remote import RemoteClient, RemoteError
from ._remote_jobs import RemoteJob
from ._result import Result
from ._saving import Saved, SavedGraphError, load, save
from ._transforms import grad, value_and_grad, vmap
from .engine.errors import FeedError, GraphError, RequestError, ValidationError

__version__ = "0.1.0"

__all__ = [
    "FeedError",
    "Graph",
    "Job",
    "GraphError",
    "LocalClient",
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
    "broadcast_to",
    "concat",
    "connect",
    "constant",
    "cos",
    "div",
    "exp",
    "grad",
    "input",
    "load",
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
    "save",
    "sigmoid",
    "sin",
    "softmax",
    "softmax_cross_entropy",
    "sqrt",
    "sub",
    "sum",
    "tanh",
    "transpose",
    "value_and_grad",
    "vmap",
]
