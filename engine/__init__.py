"""graphgrad's engine: pure computation, no gRPC. Graph IR, op registry, autodiff, executors."""

from .autodiff import RunRequest
from .errors import (
    CancelledError,
    ExecutionError,
    FeedError,
    GraphError,
    LimitError,
    RequestError,
    UnknownOpError,
    ValidationError,
)
from .executor import Cancellation, Executor, LocalExecutor, RunResult, RunStats, TaskStat
from .ir import Graph, Node
from .ops import DTYPES, REGISTRY, Op, TensorType

__all__ = [
    "DTYPES",
    "REGISTRY",
    "Cancellation",
    "CancelledError",
    "ExecutionError",
    "Executor",
    "FeedError",
    "Graph",
    "GraphError",
    "LimitError",
    "LocalExecutor",
    "Node",
    "Op",
    "RequestError",
    "RunRequest",
    "RunResult",
    "RunStats",
    "TaskStat",
    "TensorType",
    "UnknownOpError",
    "ValidationError",
]
