"""Protobuf <-> domain objects for the server. No protobuf type goes below this layer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphgrad.engine import RunResult, ValidationError, tensors
from graphgrad.engine.ir import Node
from graphgrad.engine.ops import OPSET_VERSION
from graphgrad.engine.ops.docs import op_infos as registry_ops
from graphgrad.engine.planner import Explanation
from graphgrad.engine.simulator import Prediction
from graphgrad.v1 import graph_pb2, service_pb2, tensor_pb2

DTYPE_NAMES = {
    tensor_pb2.DTYPE_FLOAT32: "float32",
    tensor_pb2.DTYPE_FLOAT64: "float64",
    tensor_pb2.DTYPE_INT32: "int32",
    tensor_pb2.DTYPE_INT64: "int64",
}
DTYPE_ENUMS = {v: k for k, v in DTYPE_NAMES.items()}


class FieldError(ValueError):
    """A request field that cannot be decoded; `field` is its path in the request."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


def decode_tensor(t: tensor_pb2.Tensor, field: str, max_bytes: int | None = None) -> np.ndarray:
    dtype = DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise FieldError(
            f"{field}: dtype must be one of "
            f"{', '.join(tensor_pb2.Dtype.Name(k) for k in DTYPE_NAMES)}, got enum value {t.dtype}",
            f"{field}.dtype",
        )
    try:
        return tensors.decode(dtype, t.shape, t.data, max_bytes=max_bytes, what=field)
    except tensors.TensorFormatError as e:
        raise FieldError(str(e), f"{field}.{e.part}") from e


def encode_tensor(arr: np.ndarray, out: tensor_pb2.Tensor) -> None:
    dtype, shape, data = tensors.encode(arr)
    out.dtype = DTYPE_ENUMS[dtype]
    out.shape[:] = shape
    out.data = data


def decode_tensors(
    msgs: Mapping[str, tensor_pb2.Tensor], field: str, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    return {k: decode_tensor(v, f"{field}['{k}']", max_bytes) for k, v in msgs.items()}


def _decode_attr(node: str, key: str, v: graph_pb2.AttrValue, max_bytes: int | None) -> object:
    kind = v.WhichOneof("value")
    if kind is None:
        raise ValidationError(f"attribute '{key}' has no value", node=node, field=f"attrs.{key}")
    if kind == "ints":
        return tuple(v.ints.values)
    if kind == "tensor":
        return decode_tensor(v.tensor, f"attrs.{key}", max_bytes)
    if kind == "dtype":  # an unknown enum value stays visible to the attribute check
        return DTYPE_NAMES.get(v.dtype, f"enum value {v.dtype}")
    return getattr(v, kind)


def decode_graph(g: graph_pb2.Graph, max_tensor_bytes: int | None = None) -> list[Node]:
    if g.opset_version > OPSET_VERSION:  # each opset extends the one before
        raise FieldError(
            f"opset_version {g.opset_version} is not supported (this server: {OPSET_VERSION})",
            "graph.opset_version",
        )
    nodes = []
    for n in g.nodes:
        try:
            attrs = {k: _decode_attr(n.name, k, v, max_tensor_bytes) for k, v in n.attrs.items()}
        except FieldError as e:
            raise ValidationError(str(e), node=n.name, field=e.field) from e
        dtype = None
        if n.dtype != tensor_pb2.DTYPE_UNSPECIFIED:
            dtype = DTYPE_NAMES.get(n.dtype, f"enum value {n.dtype}")
        shape = tuple(n.shape.dims) if n.HasField("shape") else None
        nodes.append(Node(n.name, n.op, tuple(n.inputs), attrs, shape=shape, dtype=dtype))
    return nodes


def encode_result(res: RunResult, fingerprint: str) -> service_pb2.RunResponse:
    out = service_pb2.RunResponse(fingerprint=fingerprint)
    for name, arr in res.values.items():
        encode_tensor(arr, out.values[name])
    for name, arr in res.grads.items():
        encode_tensor(arr, out.grads[name])
    s = res.stats
    out.stats.executor = s.executor
    out.stats.wall_time = s.wall_time
    out.stats.partitions = s.partitions
    out.stats.bytes_moved = s.bytes_moved
    for t in s.tasks:
        out.stats.tasks.add(
            partition=t.partition,
            phase=t.phase,
            start=t.start,
            end=t.end,
            where=t.where,
            bytes_in=t.bytes_in,
            bytes_out=t.bytes_out,
        )
    return out


def encode_explanation(e: Explanation) -> service_pb2.ExplainResponse:
    out = service_pb2.ExplainResponse(
        executor=e.executor, fingerprint=e.fingerprint, total_flops=e.total_flops
    )
    for p in e.partitions:
        out.partitions.add(index=p.index, nodes=p.nodes, flops=p.flops, bytes=p.bytes)
    for c in e.cuts:
        out.cuts.add(src=c.src, dst=c.dst, node=c.node, bytes=c.bytes)
    return out


def encode_prediction(p: Prediction, out: service_pb2.Prediction) -> None:
    out.makespan, out.one_cpu, out.bound = p.makespan, p.one_cpu, p.bound
    out.critical_path.extend(p.critical_path)
    out.critical_seconds, out.tasks, out.calibration = p.critical_seconds, p.tasks, p.calibration
    out.bytes_across_nodes = p.bytes_across_nodes
    out.bounds.update(dict(p.bounds))
    c = p.cluster
    out.cluster.nodes, out.cluster.cpus_per_node = c.nodes, c.cpus_per_node
    out.cluster.network_bytes_per_s = c.network_bytes_per_s
    for t in p.timeline:
        out.timeline.add(name=t.name, node=t.node, cpu=t.cpu, start=t.start, end=t.end)


def op_infos() -> service_pb2.ListOpsResponse:
    out = service_pb2.ListOpsResponse(opset_version=OPSET_VERSION)
    for op in registry_ops():
        info = out.ops.add(
            name=op.name,
            arity=-1 if op.arity is None else op.arity,
            signature=op.signature,
            differentiable=op.differentiable,
            doc=op.doc,
            inputs=op.inputs,
        )
        for a in op.attrs:
            info.attrs.add(name=a.name, kind=a.kind, required=a.required)
    return out
