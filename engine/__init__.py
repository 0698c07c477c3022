"""graphgrad's engine: pure computation, no gRPC. Graph IR, op registry, autodiff, executors.

What the SDK, the wire and the server use is exported here; the rest is the engine's own.
"""

from graphgrad.engine.allocator import tune_unless_opted_out
from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.batching import batch_graph
from graphgrad.engine.calibration import CalibrationError, load_for_client
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.errors import (
    ERROR_DOMAIN,
    CancelledError,
    CancelReason,
    ExecutionError,
    FeedError,
    GraphError,
    LimitError,
    NotFoundError,
    RequestError,
    UnknownOpError,
    ValidationError,
    rebuild_error,
)
from graphgrad.engine.executor import (
    Cancellation,
    Executor,
    LocalExecutor,
    RunResult,
    RunStats,
    TaskStat,
)
from graphgrad.engine.grad import grad_graph
from graphgrad.engine.ir import Graph, Node
from graphgrad.engine.job_manager import JobManager, ManagedJob
from graphgrad.engine.job_reports import (
    NO_PROGRESS,
    JobView,
    ResultPart,
    join_parts,
    result_parts,
)
from graphgrad.engine.job_store import JobStore, MemoryJobStore
from graphgrad.engine.kinds import TERMINAL, ExecutorKind, JobStatus
from graphgrad.engine.lru import LRU
from graphgrad.engine.ops import (
    CONSTANT,
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    INPUT,
    INT_DTYPES,
    OPSET_VERSION,
    REGISTRY,
    Op,
    ShapeError,
    TensorType,
    check_attr,
    lookup,
    shape_problem,
)
from graphgrad.engine.ops.docs import AttrInfo, OpInfo, op_infos
from graphgrad.engine.planner import Explanation
from graphgrad.engine.prepared import FeedSpec, PreparedRun, check_seeds, feed_spec
from graphgrad.engine.session import Explained, LocalSpec, RunOptions, Session
from graphgrad.engine.simulator import Cluster, Prediction, cluster_from
from graphgrad.engine.training import (
    SGD,
    Adam,
    Optimizer,
    TrainSpec,
    check_settings,
    job_bytes,
    within,
)
from graphgrad.engine.training_run import Placement, Progress

__all__ = [
    "shape_problem",
    "ERROR_DOMAIN",
    "CalibrationError",
    "Cluster",
    "Prediction",
    "cluster_from",
    "load_for_client",
    "tune_unless_opted_out",
    "rebuild_error",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "INPUT",
    "INT_DTYPES",
    "OPSET_VERSION",
    "LRU",
    "AttrInfo",
    "OpInfo",
    "op_infos",
    "batch_graph",
    "CONSTANT",
    "DTYPES",
    "NO_PROGRESS",
    "REGISTRY",
    "SGD",
    "TERMINAL",
    "Adam",
    "Cancellation",
    "CancelledError",
    "CancelReason",
    "Dispatcher",
    "ExecutionError",
    "Executor",
    "ExecutorKind",
    "Explained",
    "Explanation",
    "FeedSpec",
    "feed_spec",
    "check_seeds",
    "PreparedRun",
    "FeedError",
    "Graph",
    "GraphError",
    "JobStatus",
    "JobView",
    "LimitError",
    "LocalExecutor",
    "LocalSpec",
    "JobManager",
    "JobStore",
    "ManagedJob",
    "MemoryJobStore",
    "NotFoundError",
    "Node",
    "Op",
    "Optimizer",
    "Placement",
    "Progress",
    "RequestError",
    "ResultPart",
    "RunOptions",
    "RunRequest",
    "RunResult",
    "RunStats",
    "Session",
    "ShapeError",
    "TaskStat",
    "TensorType",
    "TrainSpec",
    "UnknownOpError",
    "ValidationError",
    "check_attr",
    "check_settings",
    "grad_graph",
    "job_bytes",
    "join_parts",
    "lookup",
    "result_parts",
    "within",
]
