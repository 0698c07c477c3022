"""SDK <-> wire: graphs and feeds to protobuf, responses to numpy (decoding is zero-copy)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .engine import Graph, RunStats, TaskStat, tensors
from .engine.ops import REGISTRY, AttrKind, opset_of
from .engine.ops.docs import AttrInfo, OpInfo
from .engine.planner import CutInfo, Explanation, PartitionInfo
from .engine.simulator import BOUND_NAMES, Cluster, Prediction, TaskTiming
from .v1 import graph_pb2, service_pb2, tensor_pb2

DTYPE_ENUMS = {
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float64": tensor_pb2.DTYPE_FLOAT64,
    "int32": tensor_pb2.DTYPE_INT32,
    "int64": tensor_pb2.DTYPE_INT64,
}
DTYPE_NAMES = {v: k for k, v in DTYPE_ENUMS.items()}
EXECUTORS = {
    "auto": service_pb2.EXECUTOR_AUTO,
    "local": service_pb2.EXECUTOR_LOCAL,
    "ray": service_pb2.EXECUTOR_RAY,
}


def fill_tensor(arr: np.ndarray, out: tensor_pb2.Tensor) -> None:
    dtype, shape, data = tensors.encode(arr)
    out.dtype = DTYPE_ENUMS[dtype]
    out.shape[:] = shape
    out.data = data


def read_tensor(t: tensor_pb2.Tensor) -> np.ndarray:
    """A read-only view on the message's bytes: no copy."""
    return tensors.decode(DTYPE_NAMES[t.dtype], t.shape, t.data)


def _fill_attr(value: object, kind: AttrKind, out: graph_pb2.AttrValue) -> None:
    if isinstance(value, np.ndarray):
        fill_tensor(value, out.tensor)
    elif isinstance(value, str):  # a dtype
        out.dtype = DTYPE_ENUMS[value]
    elif isinstance(value, tuple):
        out.ints.values[:] = value
    elif isinstance(value, bool):
        out.b = value
    elif isinstance(value, int):
        out.i = value
    elif isinstance(value, float):
        out.f = value
    else:
        raise TypeError(f"attribute value {value!r} of kind {kind.value} has no wire form")


def encode_graph(graph: Graph) -> graph_pb2.Graph:
    ops, dtypes = (n.op for n in graph.nodes), (t.dtype for t in graph.types)
    out = graph_pb2.Graph(opset_version=opset_of(ops, dtypes))
    for node in graph.nodes:
        n = out.nodes.add(name=node.name, op=node.op, inputs=node.inputs)
        for key, value in node.attrs.items():
            _fill_attr(value, REGISTRY[node.op].attrs[key].kind, n.attrs[key])
        if node.shape is not None:
            n.shape.dims[:] = node.shape
        if node.dtype is not None:
            n.dtype = DTYPE_ENUMS[node.dtype]
    return out


def wire_graph(graph: Graph) -> graph_pb2.Graph:
    """The graph's protobuf form, encoded once per graph."""
    wire: graph_pb2.Graph = graph.memo("wire", lambda: encode_graph(graph))
    return wire


def fill_tensors(arrays: Mapping[str, np.ndarray], out: object) -> None:
    for name, arr in arrays.items():
        fill_tensor(arr, out[name])  # type: ignore[index]


def read_stats(s: service_pb2.RunStats) -> RunStats:
    tasks = tuple(
        TaskStat(t.partition, t.phase, t.start, t.end, t.where, t.bytes_in, t.bytes_out)
        for t in s.tasks
    )
    return RunStats(s.executor, s.wall_time, s.partitions, s.bytes_moved, tasks)


def read_explanation(e: service_pb2.ExplainResponse) -> Explanation:
    return Explanation(
        e.executor,
        tuple(PartitionInfo(p.index, tuple(p.nodes), p.flops, p.bytes) for p in e.partitions),
        tuple(CutInfo(c.src, c.dst, c.node, c.bytes) for c in e.cuts),
        e.fingerprint,
    )


def read_prediction(p: service_pb2.Prediction) -> Prediction:
    c = p.cluster
    return Prediction(
        p.makespan,
        p.one_cpu,
        p.bound,
        tuple((name, p.bounds[name]) for name in BOUND_NAMES if name in p.bounds),
        tuple(p.critical_path),
        p.critical_seconds,
        tuple(TaskTiming(t.name, t.node, t.cpu, t.start, t.end) for t in p.timeline),
        p.tasks,
        Cluster(c.nodes, c.cpus_per_node, c.network_bytes_per_s),
        p.calibration,
        p.bytes_across_nodes,
    )


def read_op_infos(resp: service_pb2.ListOpsResponse) -> list[OpInfo]:
    return [
        OpInfo(
            op.name,
            op.signature,
            op.doc,
            tuple(op.inputs),
            tuple(AttrInfo(a.name, a.kind, a.required) for a in op.attrs),
            None if op.arity < 0 else op.arity,
            op.differentiable,
        )
        for op in resp.ops
    ]
