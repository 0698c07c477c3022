"""graphgrad.wire: the one place that converts between protobuf messages and engine objects.

The SDK and the server both use it (as Temporal's SDK shares one data converter between
client and worker): an `encode_*`/`decode_*` pair per type that crosses the wire, each enum
mapped once, the opset one constant. Decoding is zero-copy for tensors and checks what it
reads: a bad field raises FieldError (or the engine's ValidationError/RequestError) naming it.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import TypeVar

import numpy as np

from graphgrad.engine import (
    RunOptions,
    RunRequest,
    RunResult,
    RunStats,
    TaskStat,
    ValidationError,
    tensors,
)
from graphgrad.engine.errors import RequestError
from graphgrad.engine.ir import Graph, Node
from graphgrad.engine.job_reports import JobView, ResultPart
from graphgrad.engine.kinds import ExecutorKind, JobStatus
from graphgrad.engine.lru import LRU
from graphgrad.engine.ops import OPSET_VERSION, REGISTRY, AttrKind, opset_of
from graphgrad.engine.ops.docs import AttrInfo, OpInfo, op_infos
from graphgrad.engine.planner import CutInfo, Explanation, PartitionInfo
from graphgrad.engine.prepared import FeedSpec
from graphgrad.engine.simulator import BOUND_NAMES, Cluster, Prediction, TaskTiming, cluster_from
from graphgrad.engine.training import SGD, Adam, Optimizer, TrainSpec, check_settings, within
from graphgrad.engine.training_run import Progress
from graphgrad.v1 import graph_pb2, jobs_pb2, service_pb2, tensor_pb2

E = TypeVar("E")


class FieldError(ValueError):
    """A message field that cannot be decoded; `field` is its path in the message."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


class _EnumMap:
    """One engine enum <-> one protobuf enum; an unknown value is an error naming the field.
    `default` is what the protobuf's UNSPECIFIED (0) decodes to, if anything."""

    def __init__(self, pairs: Mapping[E, int], proto: object, default: E | None = None) -> None:
        self.to_wire = dict(pairs)
        self.from_wire = {v: k for k, v in pairs.items()}
        if default is not None:
            self.from_wire[0] = default
        self.proto = proto

    def encode(self, value: object) -> int:
        return self.to_wire[value]  # type: ignore[index]

    def decode(self, value: int, field: str) -> object:
        try:
            return self.from_wire[value]
        except KeyError:
            names = self.proto.Name  # type: ignore[attr-defined]
            known = ", ".join(names(k) for k in sorted(self.from_wire))
            raise FieldError(
                f"{field} must be one of {known}, got enum value {value}", field
            ) from None


DTYPES = _EnumMap(
    {
        "float32": tensor_pb2.DTYPE_FLOAT32,
        "float64": tensor_pb2.DTYPE_FLOAT64,
        "int32": tensor_pb2.DTYPE_INT32,
        "int64": tensor_pb2.DTYPE_INT64,
    },
    tensor_pb2.Dtype,
)
EXECUTORS = _EnumMap(
    {
        ExecutorKind.AUTO: service_pb2.EXECUTOR_AUTO,
        ExecutorKind.LOCAL: service_pb2.EXECUTOR_LOCAL,
        ExecutorKind.RAY: service_pb2.EXECUTOR_RAY,
    },
    service_pb2.Executor,
    default=ExecutorKind.AUTO,
)
JOB_STATUSES = _EnumMap(
    {
        JobStatus.PENDING: jobs_pb2.JOB_STATUS_PENDING,
        JobStatus.RUNNING: jobs_pb2.JOB_STATUS_RUNNING,
        JobStatus.DONE: jobs_pb2.JOB_STATUS_DONE,
        JobStatus.CANCELLED: jobs_pb2.JOB_STATUS_CANCELLED,
        JobStatus.FAILED: jobs_pb2.JOB_STATUS_FAILED,
    },
    jobs_pb2.JobStatus,
)


def encode_executor(kind: ExecutorKind) -> service_pb2.Executor.ValueType:
    return EXECUTORS.encode(ExecutorKind.parse(kind))  # type: ignore[return-value]


def decode_executor(value: int, field: str) -> ExecutorKind:
    """An unknown value is the sender's error (RequestError on `field`)."""
    try:
        return EXECUTORS.decode(value, field)  # type: ignore[return-value]
    except FieldError as e:
        raise RequestError(str(e), field=field) from None


def encode_status(status: JobStatus) -> jobs_pb2.JobStatus.ValueType:
    return JOB_STATUSES.encode(status)  # type: ignore[return-value]


def decode_status(value: int, field: str = "status") -> JobStatus:
    return JOB_STATUSES.decode(value, field)  # type: ignore[return-value]


D = TypeVar("D")


def _from_fields(cls: type[D], msg: object) -> D:
    """A dataclass `cls` from the fields of `msg` of the same names."""
    return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


# --- tensors -------------------------------------------------------------------------------


# Native dtypes that are the wire's own (little-endian machines): arrays of them go as they are.
_NATIVE_WIRE: dict[np.dtype, int] = (
    {np.dtype(str(name)): int(v) for name, v in DTYPES.to_wire.items()}
    if sys.byteorder == "little"
    else {}
)


# Entries of each table below that keeps what a signature or a response's layout needs; past
# it a table forgets them all and works them out again (a bound on memory).
_MOST_KEPT = 4096


def encode_tensor(arr: np.ndarray, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    out = tensor_pb2.Tensor() if out is None else out
    wire_dtype = _NATIVE_WIRE.get(arr.dtype)
    if wire_dtype is not None and arr.flags.c_contiguous:  # the common case: one copy
        out.dtype = wire_dtype  # type: ignore[assignment]
        out.shape[:] = arr.shape
        out.data = arr.tobytes()
        return out
    dtype, shape, data = tensors.encode(arr)
    out.dtype = DTYPES.encode(dtype)  # type: ignore[assignment]
    out.shape[:] = shape
    out.data = data
    return out


def decode_tensor(
    t: tensor_pb2.Tensor, field: str = "tensor", max_bytes: int | None = None
) -> np.ndarray:
    """A read-only view on the message's bytes: no copy."""
    dtype = DTYPES.decode(t.dtype, f"{field}.dtype")
    try:
        return tensors.decode(str(dtype), t.shape, t.data, max_bytes=max_bytes, what=field)
    except tensors.TensorFormatError as e:
        raise FieldError(str(e), f"{field}.{e.part}") from e


def encode_tensors(
    arrays: Mapping[str, np.ndarray], out: MutableMapping[str, tensor_pb2.Tensor]
) -> None:
    for name, arr in arrays.items():
        encode_tensor(arr, out[name])


def decode_tensors(
    msgs: Mapping[str, tensor_pb2.Tensor], field: str, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    return {k: decode_tensor(v, f"{field}['{k}']", max_bytes) for k, v in msgs.items()}


def decode_as(
    msgs: Mapping[str, tensor_pb2.Tensor],
    specs: Sequence[FeedSpec],
    field: str = "feeds",
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Tensors checked against a prepared run's signature (`specs`, in its order): read-only
    views on the message's bytes when they match it exactly (decode_exact), else
    decode_tensors, whose errors, or the engine's feed check after it, name what is wrong."""
    out = decode_exact(msgs, specs, max_bytes)
    return decode_tensors(msgs, field, max_bytes) if out is None else out


def decode_exact(
    msgs: Mapping[str, tensor_pb2.Tensor], specs: Sequence[FeedSpec], max_bytes: int | None = None
) -> dict[str, np.ndarray] | None:
    """When each spec has its tensor, of its dtype, shape and byte count, and nothing else was
    sent: each a read-only view on the message's bytes, with no other check to repeat. None
    otherwise (a wrong shape or dtype, a missing, extra or oversized tensor)."""
    if len(msgs) != len(specs):
        return None
    expected = _expected(specs, max_bytes)
    if expected is None:
        return None
    out = {}
    get = msgs.get
    for name, wire_dtype, shape_list, nbytes, shape, dtype in expected:
        t = get(name)
        if t is None or t.dtype != wire_dtype or t.shape != shape_list:
            return None
        data = t.data
        if len(data) != nbytes:
            return None
        out[name] = np.ndarray(shape, dtype, data)  # a view: read-only
    return out


# What decode_exact checks of each spec, worked out once per signature (by its identity: a
# prepared run's, which it keeps), with the largest tensor allowed: None where a spec's dtype
# is not the wire's own or its bytes are over that bound.
_Expected = tuple[tuple[str, int, list[int], int, tuple[int, ...], np.dtype], ...]
_EXPECTED: dict[tuple[int, int | None], tuple[Sequence[FeedSpec], _Expected | None]] = {}


def _expected(specs: Sequence[FeedSpec], max_bytes: int | None) -> _Expected | None:
    key = (id(specs), max_bytes)
    held = _EXPECTED.get(key)
    if held is not None and held[0] is specs:
        return held[1]
    expected: _Expected | None = None
    if all(s.dtype in _NATIVE_WIRE and (max_bytes is None or s.nbytes <= max_bytes) for s in specs):
        expected = tuple(
            (s.name, _NATIVE_WIRE[s.dtype], s.shape_list, s.nbytes, s.shape, s.dtype) for s in specs
        )
    global _expected_feeds
    if len(_EXPECTED) >= _MOST_KEPT or _expected_feeds + len(specs) > _MOST_FEEDS_KEPT:
        _EXPECTED.clear()  # bounded by feeds, not entries: a graph may have thousands of inputs
        _expected_feeds = 0
    _EXPECTED[key] = (specs, expected)  # the specs held: their id is not reused meanwhile
    _expected_feeds += len(specs)
    return expected


_MOST_FEEDS_KEPT = 1 << 16  # feeds whose expectations _EXPECTED keeps, in all (~128 B each)
_expected_feeds = 0  # how many it keeps now


# --- graphs --------------------------------------------------------------------------------


def _encode_attr(value: object, kind: AttrKind, out: graph_pb2.AttrValue) -> None:
    if isinstance(value, np.ndarray):
        encode_tensor(value, out.tensor)
    elif isinstance(value, str):  # a dtype
        out.dtype = DTYPES.encode(value)  # type: ignore[assignment]
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


def _decode_attr(node: str, key: str, v: graph_pb2.AttrValue, max_bytes: int | None) -> object:
    kind = v.WhichOneof("value")
    if kind is None:
        raise ValidationError(f"attribute '{key}' has no value", node=node, field=f"attrs.{key}")
    if kind == "ints":
        return tuple(v.ints.values)
    if kind == "tensor":
        return decode_tensor(v.tensor, f"attrs.{key}", max_bytes)
    if kind == "dtype":  # an unknown enum value stays visible to the attribute check
        return DTYPES.from_wire.get(v.dtype, f"enum value {v.dtype}")
    return getattr(v, kind)


def _encode_graph(graph: Graph) -> graph_pb2.Graph:
    # The oldest opset that has every op and dtype used: older servers take the graph.
    ops, dtypes = (n.op for n in graph.nodes), (t.dtype for t in graph.types)
    out = graph_pb2.Graph(opset_version=opset_of(ops, dtypes))
    for node in graph.nodes:
        n = out.nodes.add(name=node.name, op=node.op, inputs=node.inputs)
        for key, value in node.attrs.items():
            _encode_attr(value, REGISTRY[node.op].attrs[key].kind, n.attrs[key])
        if node.shape is not None:
            n.shape.dims[:] = node.shape
        if node.dtype is not None:
            n.dtype = DTYPES.encode(node.dtype)  # type: ignore[assignment]
    return out


# Encoded graphs by fingerprint: a graph run many times is encoded once. The messages are
# shared, so callers copy them into requests (protobuf's assignment does) and never mutate.
ENCODED_GRAPHS: LRU[str, graph_pb2.Graph] = LRU(64, 64 << 20, lambda m: m.ByteSize())


def encode_graph(graph: Graph) -> graph_pb2.Graph:
    """The graph's protobuf form (from a small cache keyed by fingerprint)."""
    return ENCODED_GRAPHS.get_or_make(graph.fingerprint, lambda: _encode_graph(graph))


def decode_graph(
    g: graph_pb2.Graph,
    max_tensor_bytes: int | None = None,
    check_node_count: Callable[[int], None] | None = None,
) -> list[Node]:
    """The graph's nodes (validated when built into a Graph); `check_node_count` runs before
    any node is decoded."""
    if check_node_count is not None:
        check_node_count(len(g.nodes))
    if g.opset_version > OPSET_VERSION:  # each opset extends the one before
        raise FieldError(
            f"opset_version {g.opset_version} is not supported (this side: {OPSET_VERSION})",
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
            # An unknown dtype is left for validation, which names the node.
            dtype = str(DTYPES.from_wire.get(n.dtype, f"enum value {n.dtype}"))
        shape = tuple(n.shape.dims) if n.HasField("shape") else None
        nodes.append(Node(n.name, n.op, tuple(n.inputs), attrs, shape=shape, dtype=dtype))
    return nodes


# --- requests ------------------------------------------------------------------------------


def encode_run_request(
    request: RunRequest, options: RunOptions, fingerprint: str = ""
) -> service_pb2.RunRequest:
    msg = service_pb2.RunRequest(
        outputs=request.outputs,
        wrt=request.wrt,
        options=service_pb2.RunOptions(
            executor=encode_executor(options.executor),
            check_numerics=options.check_numerics,
            exact=options.exact,
        ),
    )
    if fingerprint:
        msg.fingerprint = fingerprint
    encode_tensors(request.feeds, msg.feeds)
    encode_tensors(request.grad_outputs or {}, msg.grad_outputs)
    return msg


def decode_run_request(
    msg: service_pb2.RunRequest,
    max_tensor_bytes: int | None = None,
    *,
    with_feeds: bool = True,
    with_seeds: bool = True,
) -> tuple[RunRequest, RunOptions]:
    """The request and its options; the graph it names (graph_ref) is the caller's. Without
    feeds (`with_feeds=False`) the request names what to run: a prepared run's feeds are
    decoded against its signature (decode_as); without seeds, it has none."""
    feeds = decode_tensors(msg.feeds, "feeds", max_tensor_bytes) if with_feeds else {}
    seeds = decode_tensors(msg.grad_outputs, "grad_outputs", max_tensor_bytes) if with_seeds else {}
    request = RunRequest(tuple(msg.outputs), feeds, tuple(msg.wrt), seeds or None)
    executor = decode_executor(msg.options.executor, "options.executor")
    return request, RunOptions(executor, msg.options.check_numerics, msg.options.exact)


def encode_explain_request(
    request: RunRequest, executor: ExecutorKind, cluster: Cluster | None = None
) -> service_pb2.ExplainRequest:
    msg = service_pb2.ExplainRequest(
        outputs=request.outputs,
        wrt=request.wrt,
        options=service_pb2.RunOptions(executor=encode_executor(executor)),
    )
    if cluster is not None:
        msg.cluster.nodes, msg.cluster.cpus_per_node = cluster.nodes, cluster.cpus_per_node
        msg.cluster.network_bytes_per_s = cluster.network_bytes_per_s
    return msg


def decode_explain_request(
    msg: service_pb2.ExplainRequest,
) -> tuple[RunRequest, ExecutorKind, Cluster | None]:
    """The request, its executor, and the cluster to predict it on (None: not asked)."""
    request = RunRequest(tuple(msg.outputs), {}, tuple(msg.wrt))
    c = msg.cluster
    cluster = cluster_from(
        nodes=c.nodes or None,
        cpus_per_node=c.cpus_per_node or None,
        network_bytes_per_s=c.network_bytes_per_s or None,
    )
    return request, decode_executor(msg.options.executor, "options.executor"), cluster


# --- results and plans ---------------------------------------------------------------------


def encode_stats(s: RunStats, out: service_pb2.RunStats) -> None:
    out.executor = s.executor
    out.wall_time = s.wall_time
    out.partitions = s.partitions
    out.bytes_moved = s.bytes_moved
    out.batch_size = s.batch_size
    out.worker = s.worker
    for t in s.tasks:  # TaskStat's fields are the message's (not asdict: it deep-copies)
        out.tasks.add(**{name: getattr(t, name) for name in _TASK_FIELDS})


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskStat))


def decode_stats(s: service_pb2.RunStats) -> RunStats:
    tasks = tuple(TaskStat(*[getattr(t, name) for name in _TASK_FIELDS]) for t in s.tasks)
    batch_size = s.batch_size or 1  # 0: a server without dynamic batching
    return RunStats(
        s.executor, s.wall_time, s.partitions, s.bytes_moved, tasks, batch_size, s.worker
    )


def encode_result(res: RunResult, fingerprint: str) -> service_pb2.RunResponse:
    out = service_pb2.RunResponse(fingerprint=fingerprint)
    encode_tensors(res.values, out.values)
    encode_tensors(res.grads, out.grads)
    encode_stats(res.stats, out.stats)
    return out


# A RunResponse's bytes written directly (encode_result_bytes): protobuf's wire format is a
# concatenation of fields, so a response need not be built as a message and serialized. Each
# tensor's field is a prefix fixed by its name, dtype and shape (made once, kept here) and the
# array's bytes, joined in one copy; the stats, small and varied, are built as a message and
# serialized (upb is quicker than Python at that).


def varint(n: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """A bytes, string or message field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


class TensorFields:
    """The fields of a map<string, Tensor> (`field` of the enclosing message), entry by
    entry: the entry's bytes up to its tensor's data, by (name, dtype, shape)."""

    def __init__(self, field: int, wire_dtypes: dict[np.dtype, int]) -> None:
        self.field, self.wire_dtypes = field, wire_dtypes
        self._prefixes: dict[tuple[str, np.dtype, tuple[int, ...]], bytes] = {}

    def prefix(self, name: str, arr: np.ndarray) -> bytes | None:
        """The bytes before `arr`'s data in its entry, or None where its bytes are not the
        wire's as they are (a dtype the wire does not carry natively, or not C-contiguous)."""
        key = (name, arr.dtype, arr.shape)
        out = self._prefixes.get(key)
        if out is not None:
            return out
        wire_dtype = self.wire_dtypes.get(arr.dtype)
        if wire_dtype is None:
            return None
        if len(self._prefixes) >= _MOST_KEPT:
            self._prefixes.clear()
        out = self._prefixes[key] = self._entry_prefix(name, wire_dtype, arr.shape, arr.nbytes)
        return out

    def _entry_prefix(self, name: str, dtype: int, shape: tuple[int, ...], nbytes: int) -> bytes:
        # Tensor: dtype = 1 (never 0), shape = 2 (packed; absent when empty), data = 3
        # (absent when empty): proto3 writes no field that holds its default.
        head = b"\x08" + varint(dtype)
        if shape:
            head += length_delimited(2, b"".join(varint(d) for d in shape))
        if nbytes:
            head += varint(3 << 3 | 2) + varint(nbytes)
        tensor_len = len(head) + nbytes
        key = length_delimited(1, name.encode())
        value_head = varint(2 << 3 | 2) + varint(tensor_len)
        entry_len = len(key) + len(value_head) + tensor_len
        return varint(self.field << 3 | 2) + varint(entry_len) + key + value_head + head

    def parts(self, arrays: Mapping[str, np.ndarray], out: list[bytes | np.ndarray]) -> bool:
        """Append each entry's prefix and array to `out` (bytes.join reads a C-contiguous
        array's bytes as they are: one copy); False (`out` then half-written) where an array
        is not the wire's as it is: not a plain ndarray, not C-contiguous, or of a dtype the
        wire does not carry natively."""
        for name, arr in arrays.items():
            if arr.__class__ is not np.ndarray or not arr.flags.c_contiguous:
                return False
            prefix = self.prefix(name, arr)
            if prefix is None:
                return False
            out.append(prefix)
            out.append(arr)
        return True


_VALUE_FIELDS = TensorFields(1, _NATIVE_WIRE)  # RunResponse.values
_GRAD_FIELDS = TensorFields(2, _NATIVE_WIRE)  # RunResponse.grads


def encode_result_bytes(res: RunResult, fingerprint: str, worker: str = "") -> bytes:
    """encode_result(res, fingerprint) serialized, its stats naming `worker`: the tensors'
    fields written directly (TensorFields), each array's bytes copied once, and the stats of
    a one-task run packed into a layout kept per run kind (_RunTail)."""
    parts: list[bytes | np.ndarray] = []
    if not (_VALUE_FIELDS.parts(res.values, parts) and _GRAD_FIELDS.parts(res.grads, parts)):
        out = encode_result(res, fingerprint)  # an array not as the wire has it
        out.stats.worker = worker or out.stats.worker
        return out.SerializeToString()
    parts.append(_run_tail(res.stats, fingerprint, worker or res.stats.worker))
    return b"".join(parts)  # type: ignore[arg-type]  # an ndarray is a buffer


# Stand-ins for the three times of a one-task run's stats (wall time, the task's start and
# end) in the layout _RunTail finds them in: each encoding found once, or no layout is kept.
_TIMES = (1.25, 2.375, 3.4375)
_DOUBLE = struct.Struct("<d")


class _RunTail:
    """RunResponse's stats and fingerprint (fields 3 and 4) of runs of one task that differ
    only in their three times: a double's encoding has a fixed size, so upb serializes the
    message once with stand-ins (_TIMES) and each run packs its times between the bytes
    around them."""

    def __init__(self, serialized: bytes) -> None:
        marks = [_DOUBLE.pack(t) for t in _TIMES]
        at = [serialized.find(m) for m in marks]
        if any(serialized.count(m) != 1 for m in marks) or at != sorted(at):
            raise ValueError("the stand-in times are not each found once, in order")
        edges = [0, *(e for a in at for e in (a, a + 8)), len(serialized)]
        self.pieces = [serialized[edges[i] : edges[i + 1]] for i in range(0, len(edges), 2)]
        p = self.pieces
        self.pack = struct.Struct(f"<{len(p[0])}sd{len(p[1])}sd{len(p[2])}sd{len(p[3])}s").pack

    def __call__(self, wall: float, start: float, end: float) -> bytes:
        p = self.pieces
        return self.pack(p[0], wall, p[1], start, p[2], end, p[3])


_TAILS: dict[tuple[object, ...], _RunTail | None] = {}  # None: no layout for that kind
_NO_LAYOUT_YET = object()


def _run_tail(stats: RunStats, fingerprint: str, worker: str) -> bytes:
    """Fields 3 and 4 of a RunResponse: packed where the run had one task and non-zero times
    (proto3 writes no zero), else built as a message and serialized."""
    s = stats
    if len(s.tasks) == 1 and s.wall_time and (t := s.tasks[0]).start and t.end:
        kind = (fingerprint, worker, s.executor, s.partitions, s.bytes_moved, s.batch_size)
        key = (*kind, t.partition, t.phase, t.where, t.bytes_in, t.bytes_out)
        tail = _TAILS.get(key, _NO_LAYOUT_YET)
        if tail is _NO_LAYOUT_YET:
            tail = _TAILS[key] = _layout(s, fingerprint, worker)
        if isinstance(tail, _RunTail):
            return tail(s.wall_time, t.start, t.end)
    return _serialized_tail(s, fingerprint, worker)


def _serialized_tail(stats: RunStats, fingerprint: str, worker: str) -> bytes:
    out = service_pb2.RunResponse(fingerprint=fingerprint)
    encode_stats(stats, out.stats)
    out.stats.worker = worker
    return out.SerializeToString()


def _layout(stats: RunStats, fingerprint: str, worker: str) -> _RunTail | None:
    if len(_TAILS) >= _MOST_KEPT:
        _TAILS.clear()
    t = dataclasses.replace(stats.tasks[0], start=_TIMES[1], end=_TIMES[2])
    stand_in = dataclasses.replace(stats, wall_time=_TIMES[0], tasks=(t,))
    try:
        return _RunTail(_serialized_tail(stand_in, fingerprint, worker))
    except ValueError:  # a stand-in's bytes also in a string field: serialized each time
        return None


def decode_result(
    msg: service_pb2.RunResponse,
    values: Sequence[FeedSpec] = (),
    grads: Sequence[FeedSpec] = (),
) -> RunResult:
    """The result; given what each value and gradient should be (a prepared run's outputs and
    wrt), those are decoded as views without further checks (decode_as)."""
    return RunResult(
        decode_as(msg.values, values, "values"),
        decode_as(msg.grads, grads, "grads"),
        decode_stats(msg.stats),
    )


def encode_explanation(e: Explanation) -> service_pb2.ExplainResponse:
    out = service_pb2.ExplainResponse(
        executor=e.executor, fingerprint=e.fingerprint, total_flops=e.total_flops
    )
    for p in e.partitions:
        out.partitions.add(index=p.index, nodes=p.nodes, flops=p.flops, bytes=p.bytes)
    for c in e.cuts:
        out.cuts.add(src=c.src, dst=c.dst, node=c.node, bytes=c.bytes)
    return out


def decode_explanation(e: service_pb2.ExplainResponse) -> Explanation:
    return Explanation(
        e.executor,
        tuple(PartitionInfo(p.index, tuple(p.nodes), p.flops, p.bytes) for p in e.partitions),
        tuple(CutInfo(c.src, c.dst, c.node, c.bytes) for c in e.cuts),
        e.fingerprint,
    )


def encode_prediction(p: Prediction, out: service_pb2.Prediction) -> None:
    out.makespan, out.one_cpu, out.bound = p.makespan, p.one_cpu, p.bound
    out.critical_path.extend(p.critical_path)
    out.critical_seconds, out.tasks, out.calibration = p.critical_seconds, p.tasks, p.calibration
    out.bytes_across_nodes, out.choice = p.bytes_across_nodes, p.choice
    out.bounds.update(dict(p.bounds))
    c = p.cluster
    out.cluster.nodes, out.cluster.cpus_per_node = c.nodes, c.cpus_per_node
    out.cluster.network_bytes_per_s = c.network_bytes_per_s
    for t in p.timeline:  # TaskTiming's fields are the message's
        out.timeline.add(**dataclasses.asdict(t))


def decode_prediction(p: service_pb2.Prediction) -> Prediction:
    c = p.cluster
    return Prediction(
        p.makespan,
        p.one_cpu,
        p.bound,
        tuple((name, p.bounds[name]) for name in BOUND_NAMES if name in p.bounds),
        tuple(p.critical_path),
        p.critical_seconds,
        tuple(_from_fields(TaskTiming, t) for t in p.timeline),
        p.tasks,
        Cluster(c.nodes, c.cpus_per_node, c.network_bytes_per_s),
        p.calibration,
        p.bytes_across_nodes,
        p.choice,
    )


def encode_ops(ops: Iterable[OpInfo] | None = None) -> service_pb2.ListOpsResponse:
    """The ops (default: every registered one) as ListOps reports them."""
    out = service_pb2.ListOpsResponse(opset_version=OPSET_VERSION)
    for op in op_infos() if ops is None else ops:
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


def decode_ops(msg: service_pb2.ListOpsResponse) -> list[OpInfo]:
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
        for op in msg.ops
    ]


# --- jobs ----------------------------------------------------------------------------------


def encode_optimizer(optimizer: Optimizer, out: jobs_pb2.Optimizer) -> None:
    if isinstance(optimizer, SGD):
        out.sgd.lr, out.sgd.momentum = optimizer.lr, optimizer.momentum
    else:
        a = out.adam
        a.lr, a.beta1, a.beta2, a.eps = (
            optimizer.lr,
            optimizer.beta1,
            optimizer.beta2,
            optimizer.eps,
        )


def decode_optimizer(o: jobs_pb2.Optimizer) -> Optimizer:
    kind = o.WhichOneof("kind")
    if kind is None:
        raise RequestError(
            "the job names no optimizer: set `optimizer.sgd` or `optimizer.adam`",
            field="optimizer",
        )
    with within(f"optimizer.{kind}"):  # the optimizers check their hyper-parameters
        if kind == "sgd":
            return SGD(lr=o.sgd.lr, momentum=o.sgd.momentum)
        default, a = Adam(), o.adam  # fields not set take Adam's defaults; 0 is a value
        return Adam(
            lr=a.lr,
            beta1=a.beta1 if a.HasField("beta1") else default.beta1,
            beta2=a.beta2 if a.HasField("beta2") else default.beta2,
            eps=a.eps if a.HasField("eps") else default.eps,
        )


def encode_job(specs: Sequence[TrainSpec], executor: ExecutorKind) -> jobs_pb2.SubmitJobRequest:
    """A job of one template per spec; the settings (optimizer, steps, batch size, seed) are
    those every spec shares."""
    first = specs[0]
    req = jobs_pb2.SubmitJobRequest(
        steps=first.steps,
        batch_size=first.batch_size or 0,
        seed=first.seed,
        executor=encode_executor(executor),
    )
    encode_optimizer(first.optimizer, req.optimizer)
    for spec in specs:
        t = req.templates.add(loss=spec.loss)
        t.graph.CopyFrom(encode_graph(spec.template))
        encode_tensors(spec.params, t.params)
        encode_tensors(spec.data, t.data)
    return req


def decode_job(
    req: jobs_pb2.SubmitJobRequest,
    max_tensor_bytes: int | None = None,
    make_graph: Callable[[list[Node]], Graph] = Graph,
    check_node_count: Callable[[int], None] | None = None,
    check_steps: Callable[[int], None] | None = None,
) -> tuple[list[TrainSpec], ExecutorKind]:
    """The job's specs, each checked by the engine (TrainSpec.build), and its executor.
    `make_graph` builds each template (a server registers it as well); `check_steps` adds
    the receiver's bound on steps, after the settings' own checks."""
    if not req.templates:
        raise RequestError("the job has no templates", field="templates")
    executor = decode_executor(req.executor, "executor")
    optimizer = decode_optimizer(req.optimizer)
    batch_size = req.batch_size if req.batch_size != 0 else None  # 0: every sample
    check_settings(optimizer, req.steps, batch_size, req.seed)
    if check_steps is not None:
        check_steps(req.steps)
    specs = []
    for k, t in enumerate(req.templates):
        where = f"templates[{k}]"
        graph = make_graph(decode_graph(t.graph, max_tensor_bytes, check_node_count))
        params = decode_tensors(t.params, f"{where}.params", max_tensor_bytes)
        data = decode_tensors(t.data, f"{where}.data", max_tensor_bytes)
        with within(where):
            specs.append(
                TrainSpec.build(
                    graph, t.loss, params, data, optimizer, req.steps, batch_size, req.seed
                )
            )
    return specs, executor


def encode_job_info(v: JobView) -> jobs_pb2.JobInfo:
    return jobs_pb2.JobInfo(  # Progress's fields are the message's
        id=v.id,
        status=encode_status(v.status),
        error=v.error,
        created=v.created,
        worker=v.worker,
        **dataclasses.asdict(v.progress),
    )


def decode_job_info(info: jobs_pb2.JobInfo) -> JobView:
    progress = _from_fields(Progress, info)
    status = decode_status(info.status)
    return JobView(info.id, status, progress, info.error, info.created, info.worker)


def encode_result_part(part: ResultPart) -> jobs_pb2.GetJobResultsResponse:
    out = jobs_pb2.GetJobResultsResponse(
        template=part.template, kind=part.kind, name=part.name, first=part.first
    )
    encode_tensor(part.value, out.value)
    return out


def decode_result_part(msg: jobs_pb2.GetJobResultsResponse) -> ResultPart:
    value = decode_tensor(msg.value, "value")
    return ResultPart(msg.template, msg.kind, msg.name, msg.first, value)
