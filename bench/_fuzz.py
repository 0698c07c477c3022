"""Structured fuzzing of the graphgrad.v1 API, shared by tests/test_fuzz.py and bench/soak.py.

Requests come from the service descriptors: any RPC, every field of its input type (nested
messages, repeated and map fields, oneofs, enums with unknown values), boundary numbers and
shapes, odd strings and random bytes; a share are structurally valid requests (a small real
graph, a tiny training job) with a few random mutations, so the fuzz reaches deep code; a
share are raw bytes that may not parse at all. Everything is sent as bytes through a plain
gRPC channel, so nothing here depends on the SDK.
"""

from __future__ import annotations

import base64
import random
import re
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory, text_format
from google.protobuf.message import Message

from graphgrad.v1 import graph_pb2, jobs_pb2, service_pb2, tensor_pb2

FD = descriptor.FieldDescriptor
INT_BOUNDS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
}
BOUNDARY_INTS = (0, 1, -1, 2, 3, 7, 64, 2**25, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, -(2**63))
DIMS = (0, 1, 2, 3, 4, 10, 64, 2**25, 2**31 - 1, 2**63 - 1, -1)
FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-8, 1e308, -1e308, 5e-324, float("nan"), float("inf"))
FLOATS += (float("-inf"), 0.9, 0.999, 1.0 + 1e-12)
STRINGS = ("", " ", "\x00", "名前", "é" * 300, "a" * 257, "x" * 100_000, "../../etc/passwd")
STRINGS += ("0" * 64, "f" * 64, "DTYPE_FLOAT64", "graphgrad.v1.Graph")
JUNK_OPS = ("", "nope", "INPUT", "__import__", "matmul ", "input\x00")
TIMEOUT = 5.0
STREAM_TIMEOUT = 2.0
# RPCs that reach deep code are drawn more often; the rest once each.
WEIGHTS = {"Run": 4, "Explain": 2, "RegisterGraph": 2, "SubmitJob": 3}
FOLLOWUPS = ("WatchJob", "GetJob", "GetJobResults", "CancelJob", "DeleteJob")
STREAM_MESSAGES = 4  # a stream is read this far, then cancelled
LONG_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.){80,}"')  # a quoted text-format string
LOST = ("Stream removed", "Socket closed", "Connection reset")  # the client's transport errors


@dataclass(frozen=True)
class Method:
    path: str  # "/graphgrad.v1.GraphService/Run"
    name: str  # "Run"
    request: type[Message]
    streaming: bool


def api_methods() -> list[Method]:
    """Every RPC of every graphgrad.v1 service, from the descriptors (new RPCs join by
    themselves)."""
    out = []
    for module in (service_pb2, jobs_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                request = message_factory.GetMessageClass(m.input_type)
                path = f"/{service.full_name}/{m.name}"
                out.append(Method(path, m.name, request, m.server_streaming))
    return out


@dataclass
class Call:
    method: Method
    body: bytes
    label: str  # "random", "valid", "mutated", "raw": how it was made
    message: Message | None = None  # None when the body is raw bytes

    def describe(self, exact: bool = False) -> str:
        """The request as text, long tensor data and strings elided; `exact` adds the whole
        body in base64, to replay it."""
        head = f"{self.method.path} [{self.label}]"
        replay = f"\nbody (base64): {base64.b64encode(self.body).decode()}" if exact else ""
        if self.message is None:
            return f"{head} raw bytes {self.body[:200]!r}{replay}"
        text = text_format.MessageToString(self.message, as_utf8=True)
        text = LONG_LITERAL.sub(
            lambda m: f'"{m.group(0)[1:40]}..." ({len(m.group(0))} chars)', text
        )
        if len(text) > 6000:
            text = text[:6000] + f"... ({len(text)} characters)"
        return f"{head}\n{text}{replay}"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: bytes | None  # the unary response, or the first message of a stream


def send(channel: grpc.Channel, call: Call) -> Outcome:
    """One call with a deadline; a stream is read for a few messages and then cancelled."""
    if not call.method.streaming:
        rpc = channel.unary_unary(call.method.path)
        try:
            return Outcome(grpc.StatusCode.OK, "", rpc(call.body, timeout=TIMEOUT))
        except grpc.RpcError as e:
            return Outcome(e.code(), e.details() or "", None)  # type: ignore[attr-defined]
    stream = channel.unary_stream(call.method.path)(call.body, timeout=STREAM_TIMEOUT)
    first = None
    try:
        for k, msg in enumerate(stream):
            first = msg if first is None else first
            if k + 1 >= STREAM_MESSAGES:
                stream.cancel()  # our own cancel is not the server's answer
                break
        return Outcome(grpc.StatusCode.OK, "", first)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", first)  # type: ignore[attr-defined]


def failure(outcome: Outcome) -> str | None:
    """Why an answer is a defect, or None: an UNKNOWN or INTERNAL status, or the server's status
    lost on the way (the client then reports a transport error in its place, e.g. an error
    message too long for gRPC metadata, or a server that went away)."""
    if outcome.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return outcome.code.name
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # our own deadline
        return None
    if outcome.code == grpc.StatusCode.UNAVAILABLE or outcome.details.startswith(LOST):
        return "LOST"
    return None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- tensors and the small real graphs the structured requests start from ------------------


def tensor(values: list[float], shape: tuple[int, ...], dtype: int = 2) -> tensor_pb2.Tensor:
    code = "d" if dtype == tensor_pb2.DTYPE_FLOAT64 else "f"
    data = struct.pack(f"<{len(values)}{code}", *values)
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def node(name: str, op: str, *inputs: str, shape: tuple[int, ...] | None = None) -> graph_pb2.Node:
    n = graph_pb2.Node(name=name, op=op, inputs=list(inputs))
    if shape is not None:
        n.shape.dims.extend(shape)
        n.dtype = tensor_pb2.DTYPE_FLOAT64
    return n


# The README's two-layer network: L = 0.5 * sum((V tanh(W x + b) + a - t)^2).
SEED_INPUTS = {"x": (64,), "t": (10,), "W": (128, 64), "b": (128,), "V": (10, 128), "a": (10,)}


def seed_graph() -> graph_pb2.Graph:
    nodes = [node(k, "input", shape=s) for k, s in SEED_INPUTS.items()]
    half = node("half", "constant")
    half.attrs["value"].tensor.CopyFrom(tensor([0.5], ()))
    nodes += [
        node("Wx", "matmul", "W", "x"),
        node("z", "add", "Wx", "b"),
        node("h", "tanh", "z"),
        node("Vh", "matmul", "V", "h"),
        node("y", "add", "Vh", "a"),
        node("d", "sub", "y", "t"),
        node("sq", "mul", "d", "d"),
        node("s", "sum", "sq"),
        half,
        node("L", "mul", "half", "s"),
    ]
    return graph_pb2.Graph(nodes=nodes)


def seed_run(rng: random.Random) -> service_pb2.RunRequest:
    req = service_pb2.RunRequest(graph=seed_graph(), outputs=["L"], wrt=["W", "b", "V", "a"])
    for k, s in SEED_INPUTS.items():
        req.feeds[k].CopyFrom(tensor([rng.gauss(0, 0.3) for _ in range(_size(s))], s))
    return req


# Requests whose declared shapes need far more memory than any one tensor: each value fits
# --max-tensor-bytes (16 MiB here), the request does not, so the server must refuse it from
# the shapes (RESOURCE_EXHAUSTED) before it allocates anything.
BIG = 1 << 21  # float64 elements: 16 MiB
UNARY_CHAIN = ("tanh", "sin", "exp", "neg", "cos", "sigmoid")


def bomb_run(rng: random.Random) -> service_pb2.RunRequest:
    """A scalar broadcast to BIG elements through a chain of elementwise ops, differentiated
    (every value is kept for the backward), or unfed BIG inputs in `wrt` (zero gradients)."""
    g = graph_pb2.Graph(nodes=[node("x", "input", shape=())])
    big = node("big", "broadcast_to", "x")
    big.attrs["shape"].ints.values.append(BIG)
    g.nodes.append(big)
    last = "big"
    for k in range(rng.choice((4, 20, 40))):
        g.nodes.append(node(f"u{k}", rng.choice(UNARY_CHAIN), last))
        last = f"u{k}"
    g.nodes.append(node("L", "sum", last))
    wrt = ["x"]
    if rng.random() < 0.5:
        for k in range(rng.choice((2, 6, 16))):
            g.nodes.append(node(f"unfed{k}", "input", shape=(BIG,)))
            wrt.append(f"unfed{k}")
    req = service_pb2.RunRequest(graph=g, outputs=["L"], wrt=wrt)
    req.feeds["x"].CopyFrom(tensor([0.5], ()))
    return req


# A tiny regression template: x [B, 3] @ W [3, 2] + b [2] against t [B, 2].
JOB_N, JOB_S = 2, 4


def job_graph() -> graph_pb2.Graph:
    return graph_pb2.Graph(
        nodes=[
            node("x", "input", shape=(JOB_S, 3)),
            node("t", "input", shape=(JOB_S, 2)),
            node("W", "input", shape=(3, 2)),
            node("b", "input", shape=(2,)),
            node("xW", "matmul", "x", "W"),
            node("y", "add", "xW", "b"),
            node("d", "sub", "y", "t"),
            node("sq", "mul", "d", "d"),
            node("L", "sum", "sq"),
        ]
    )


def job_request(rng: random.Random) -> jobs_pb2.SubmitJobRequest:
    t = jobs_pb2.TrainTemplate(graph=job_graph(), loss="L")
    shapes = {"W": (JOB_N, 3, 2), "b": (JOB_N, 2)}
    for k, s in shapes.items():
        t.params[k].CopyFrom(tensor([rng.gauss(0, 1) for _ in range(_size(s))], s))
    for k, s in {"x": (JOB_S, 3), "t": (JOB_S, 2)}.items():
        t.data[k].CopyFrom(tensor([rng.gauss(0, 1) for _ in range(_size(s))], s))
    req = jobs_pb2.SubmitJobRequest(templates=[t], steps=rng.randint(1, 5), seed=rng.randint(0, 9))
    if rng.random() < 0.5:
        req.optimizer.sgd.lr = 0.05
    else:
        req.optimizer.adam.lr = 0.01
    return req


# -- the generator -------------------------------------------------------------------------


@dataclass
class Known:
    """What the server told us, so later requests can name real things."""

    ops: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # op -> (attr, kind)
    fingerprints: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    followups: deque[str] = field(default_factory=deque)  # job ids to look at soon


class Generator:
    """Random requests for any RPC, from a seed. `observe` feeds answers back."""

    def __init__(self, seed: int, ops: service_pb2.ListOpsResponse | None = None) -> None:
        self.rng = random.Random(seed)
        self.methods = api_methods()
        self.by_name = {m.name: m for m in self.methods}
        self.weights = [WEIGHTS.get(m.name, 1) for m in self.methods]
        self.known = Known()
        if ops is not None:
            self.known.ops = {o.name: [(a.name, a.kind) for a in o.attrs] for o in ops.ops}
        self.names = sorted({n.name for n in seed_graph().nodes} | {"L", "W", "x", "xW"})

    # ---- public

    def next(self) -> Call:
        rng = self.rng
        if self.known.followups and rng.random() < 0.5:
            return self._followup(self.known.followups.popleft())
        method = rng.choices(self.methods, self.weights)[0]
        r = rng.random()
        if r < 0.12:
            return self._raw(method)
        if r < 0.45:
            msg = method.request()
            self.fill(msg, depth=0)
            return Call(method, msg.SerializeToString(), "random", msg)
        msg = self.structured(method)
        label = "valid"
        if rng.random() < 0.8:
            for _ in range(rng.randint(1, 3)):
                self.mutate(msg)
            label = "mutated"
        return Call(method, msg.SerializeToString(), label, msg)

    def valid(self, name: str) -> Call:
        """A structurally valid request for the RPC `name`, unmutated."""
        method = self.by_name[name]
        msg = self.structured(method, pure=True)
        return Call(method, msg.SerializeToString(), "valid", msg)

    def observe(self, call: Call, outcome: Outcome) -> None:
        if outcome.code != grpc.StatusCode.OK or outcome.response is None:
            return
        name = call.method.name
        if name == "SubmitJob":
            job_id = jobs_pb2.SubmitJobResponse.FromString(outcome.response).id
            self.known.jobs.append(job_id)
            self.known.followups.append(job_id)
        elif name == "RegisterGraph":
            fp = service_pb2.RegisterGraphResponse.FromString(outcome.response).fingerprint
            if fp not in self.known.fingerprints:
                self.known.fingerprints.append(fp)

    # ---- generic messages from descriptors

    def fill(self, msg: Message, depth: int) -> None:
        for fd in msg.DESCRIPTOR.fields:
            if self.rng.random() < (0.35 if depth < 3 else 0.1):
                continue
            self._fill_field(msg, fd, depth)

    def _fill_field(self, msg: Message, fd: descriptor.FieldDescriptor, depth: int) -> None:
        container: Any = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd = fd.message_type.fields_by_name["key"]
            value_fd = fd.message_type.fields_by_name["value"]
            for _ in range(self._count()):
                key = self.scalar(key_fd)
                if value_fd.message_type is not None:
                    self._fill_message(container[key], depth + 1)
                else:
                    container[key] = self.scalar(value_fd)
        elif fd.is_repeated:
            for _ in range(self._count()):
                if fd.message_type is not None:
                    self._fill_message(container.add(), depth + 1)
                else:
                    container.append(self.scalar(fd))
        elif fd.message_type is not None:
            if depth < 5:
                self._fill_message(container, depth + 1)
        else:
            setattr(msg, fd.name, self.scalar(fd))

    def _fill_message(self, msg: Message, depth: int) -> None:
        name = msg.DESCRIPTOR.full_name
        if name == "graphgrad.v1.Tensor" and self.rng.random() < 0.6:
            msg.CopyFrom(self.random_tensor())
        elif name == "graphgrad.v1.Graph" and self.rng.random() < 0.5:
            msg.CopyFrom(self.random_graph())
        else:
            self.fill(msg, depth)
            msg.SetInParent()

    def _count(self) -> int:
        r = self.rng.random()
        return 0 if r < 0.2 else 1 if r < 0.55 else self.rng.randint(2, 4) if r < 0.95 else 40

    def scalar(self, fd: descriptor.FieldDescriptor) -> Any:
        rng = self.rng
        t = fd.type
        if t in INT_BOUNDS:
            lo, hi = INT_BOUNDS[t]
            v = rng.choice(BOUNDARY_INTS) if rng.random() < 0.7 else rng.randint(-100, 100)
            return min(max(v, lo), hi)
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return rng.choice(FLOATS) if rng.random() < 0.8 else rng.uniform(-10, 10)
        if t == FD.TYPE_BOOL:
            return rng.random() < 0.5
        if t == FD.TYPE_ENUM:
            values = [v.number for v in fd.enum_type.values]
            return rng.choice([*values, *values, 99, -1, 2**31 - 1])
        if t == FD.TYPE_STRING:
            return self.string()
        if t == FD.TYPE_BYTES:
            return rng.randbytes(rng.choice((0, 1, 4, 8, 16, 24, rng.randint(0, 300))))
        raise AssertionError(f"no generator for field {fd.full_name} of type {t}")

    def string(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            return rng.choice(self.names)
        if r < 0.6 and self.known.ops:
            return rng.choice(list(self.known.ops))
        if r < 0.7 and (self.known.jobs or self.known.fingerprints):
            return rng.choice(self.known.jobs + self.known.fingerprints)
        if r < 0.9:
            return rng.choice(STRINGS)
        return "".join(rng.choice("abcxyzWL_09/é") for _ in range(rng.randint(1, 12)))

    def shape(self) -> list[int]:
        rng = self.rng
        if rng.random() < 0.5:
            return [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        return [rng.choice(DIMS) for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 9)))]

    def random_tensor(self) -> tensor_pb2.Tensor:
        rng = self.rng
        dtype = rng.choice((1, 2, 2, 0, 3, 99))
        shape = self.shape()
        width = 4 if dtype == 1 else 8
        n = _size(shape) if all(0 <= d < 2**20 for d in shape) else 1
        length = n * width if rng.random() < 0.7 and n * width < 1 << 16 else rng.randint(0, 40)
        data = rng.randbytes(length) if rng.random() < 0.3 else bytes(length)
        if rng.random() < 0.2 and dtype == 2 and length % 8 == 0:  # non-finite values
            data = struct.pack("<d", rng.choice(FLOATS)) * (length // 8)
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)

    def random_graph(self) -> graph_pb2.Graph:
        """A chain of random registered ops over one or two inputs, with random attrs."""
        rng = self.rng
        g = graph_pb2.Graph()
        names = []
        for k in range(rng.randint(1, 2)):
            n = node(f"in{k}", "input", shape=tuple(self.shape() if rng.random() < 0.3 else (3,)))
            g.nodes.append(n)
            names.append(n.name)
        ops = list(self.known.ops) or ["add", "tanh", "sum"]
        for k in range(rng.randint(1, 6)):
            op = rng.choice(ops) if rng.random() < 0.9 else rng.choice(JUNK_OPS)
            arity = rng.choice((1, 2, 2, 3))
            n = node(f"n{k}", op, *(rng.choice(names) for _ in range(arity)))
            for attr, kind in self.known.ops.get(op, []):
                if rng.random() < 0.6:
                    self.attr(n.attrs[attr], kind)
            g.nodes.append(n)
            names.append(n.name)
        return g

    def attr(self, value: graph_pb2.AttrValue, kind: str) -> None:
        rng = self.rng
        if rng.random() < 0.2:  # the wrong kind, or anything
            kind = rng.choice(("int", "float", "bool", "ints", "tensor", "none"))
        if kind in ("int", "axes") and rng.random() < 0.6:
            value.i = rng.choice((0, 1, -1, 2, -2, 5, 2**63 - 1, -(2**63)))
        elif kind in ("ints", "axes", "int"):
            value.ints.values.extend(rng.choice(DIMS) for _ in range(rng.randint(0, 4)))
        elif kind == "float":
            value.f = rng.choice(FLOATS)
        elif kind == "bool":
            value.b = rng.random() < 0.5
        elif kind == "tensor":
            value.tensor.CopyFrom(self.random_tensor())

    # ---- structured requests and their mutations

    def structured(self, method: Method, pure: bool = False) -> Message:
        """A request that makes sense; unless `pure`, an Explain may be of a random graph and a
        Run may ask for far more memory than the server grants."""
        rng = self.rng
        name = method.name
        if name == "Run":
            if not pure and rng.random() < 0.05:
                return bomb_run(rng)
            req = seed_run(rng)
            if rng.random() < 0.3 and self.known.fingerprints:
                req.fingerprint = rng.choice(self.known.fingerprints)
            return req
        if name == "Explain":
            req = service_pb2.ExplainRequest(graph=seed_graph(), outputs=["L"], wrt=["W", "b"])
            if not pure and rng.random() < 0.3:
                req.graph.CopyFrom(self.random_graph())
                req.outputs[:] = [req.graph.nodes[-1].name]
                del req.wrt[:]
            return req
        if name == "RegisterGraph":
            g = seed_graph() if rng.random() < 0.5 else job_graph()
            return service_pb2.RegisterGraphRequest(graph=g)
        if name == "SubmitJob":
            return job_request(rng)
        msg = method.request()
        if "id" in msg.DESCRIPTOR.fields_by_name:
            msg.id = rng.choice(self.known.jobs) if self.known.jobs else "0" * 32  # type: ignore[attr-defined]
        return msg

    def mutate(self, msg: Message) -> None:
        rng = self.rng
        if isinstance(msg, service_pb2.RunRequest):
            rng.choice(self._run_mutations)(self, msg)
        elif isinstance(msg, service_pb2.ExplainRequest | service_pb2.RegisterGraphRequest):
            if rng.random() < 0.3 and isinstance(msg, service_pb2.ExplainRequest):
                self._mutate_names(msg)
            else:
                self.mutate_graph(msg.graph)
        elif isinstance(msg, jobs_pb2.SubmitJobRequest):
            rng.choice(self._job_mutations)(self, msg)
        elif msg.DESCRIPTOR.fields:  # an id, or an empty request: set any field at all
            self._fill_field(msg, rng.choice(msg.DESCRIPTOR.fields), 0)

    def mutate_graph(self, g: graph_pb2.Graph) -> None:
        rng = self.rng
        if not g.nodes:
            g.nodes.add().CopyFrom(node("x", "input", shape=(3,)))
            return
        n = rng.choice(g.nodes)
        names = [m.name for m in g.nodes]
        r = rng.randrange(10)
        if r == 0:
            n.shape.dims[:] = self.shape()
        elif r == 1:
            n.dtype = rng.choice((0, 1, 2, 3, 99))  # type: ignore[assignment]
        elif r == 2:
            n.op = rng.choice([*self.known.ops, *JUNK_OPS]) if self.known.ops else "nope"
        elif r == 3 and n.inputs:
            n.inputs[rng.randrange(len(n.inputs))] = rng.choice([*names, self.string()])
        elif r == 4:
            n.inputs.append(rng.choice(names))
        elif r == 5:  # a cycle through the first node
            g.nodes[0].inputs.append(g.nodes[-1].name)
            if g.nodes[0].op == "input":
                g.nodes[0].op = "add"
        elif r == 6:
            kinds = self.known.ops.get(n.op) or [(self.string(), "int")]
            attr, kind = rng.choice(kinds)
            self.attr(n.attrs[attr], kind)
        elif r == 7:
            del g.nodes[rng.randrange(len(g.nodes))]
        elif r == 8:
            g.nodes.add().CopyFrom(n)  # a duplicate name
        else:
            g.opset_version = rng.choice((0, 1, 2, 2**32 - 1))

    def _mutate_names(self, msg: Any) -> None:
        rng = self.rng
        names = [n.name for n in msg.graph.nodes] if msg.HasField("graph") else self.names
        target = msg.outputs if rng.random() < 0.5 else msg.wrt
        r = rng.randrange(4)
        if r == 0:
            del target[:]
        elif r == 1:
            target.append(rng.choice(names))  # any node: a constant, an intermediate, a repeat
        elif r == 2:
            target.append(self.string())
        else:
            target.extend(names)
        if rng.random() < 0.3:
            msg.options.executor = rng.choice((0, 1, 2, 3, 99))
            msg.options.check_numerics = rng.random() < 0.5

    def _run_feeds(self, msg: service_pb2.RunRequest) -> None:
        rng = self.rng
        keys = list(msg.feeds)
        r = rng.randrange(6)
        if r == 0 and keys:
            del msg.feeds[rng.choice(keys)]
        elif r == 1:
            msg.feeds[self.string()].CopyFrom(self.random_tensor())
        elif r == 2 and keys:
            msg.feeds[rng.choice(keys)].CopyFrom(self.random_tensor())
        elif r == 3 and keys:  # float32 bytes for a float64 input
            f = msg.feeds[rng.choice(keys)]
            f.dtype = tensor_pb2.DTYPE_FLOAT32
            f.data = f.data[: len(f.data) // 2]
        elif r == 4:  # empty with a huge dimension
            key = rng.choice([*keys, "x"])
            msg.feeds[key].CopyFrom(tensor_pb2.Tensor(dtype=2, shape=[0, 2**63 - 1]))
        else:
            for f in msg.feeds.values():
                f.data = struct.pack("<d", rng.choice(FLOATS)) * (len(f.data) // 8)

    def _run_seeds(self, msg: service_pb2.RunRequest) -> None:
        name = self.rng.choice([*msg.outputs, *self.names])
        if self.rng.random() < 0.5:
            msg.grad_outputs[name].CopyFrom(self.random_tensor())
        else:
            msg.grad_outputs[name].CopyFrom(tensor([1.0], ()))

    _run_mutations: tuple[Callable[[Generator, Any], None], ...] = (
        lambda self, m: self.mutate_graph(m.graph),
        lambda self, m: self.mutate_graph(m.graph),
        _mutate_names,
        _mutate_names,
        _run_feeds,
        _run_feeds,
        _run_seeds,
        lambda self, m: setattr(m, "fingerprint", self.string()),
    )

    def _job_template(self, msg: jobs_pb2.SubmitJobRequest) -> None:
        rng = self.rng
        t = rng.choice(msg.templates) if msg.templates else msg.templates.add()
        r = rng.randrange(7)
        if r == 0:
            self.mutate_graph(t.graph)
        elif r == 1:
            t.loss = rng.choice(("", "y", "d", "W", "nope", *self.names))
        elif r in (2, 3):
            target = t.params if r == 2 else t.data
            keys = list(target)
            key = rng.choice([*keys, self.string(), "t", "x", "W"])
            if rng.random() < 0.3 and keys:
                del target[rng.choice(keys)]
            else:
                target[key].CopyFrom(self.random_tensor())
        elif r == 4:  # a scalar param, or N = 0
            t.params["W"].CopyFrom(
                tensor([1.0], ()) if rng.random() < 0.5 else tensor([], (0, 3, 2))
            )
        elif r == 5:
            msg.templates.add().CopyFrom(t)
        else:
            del msg.templates[:]

    def _job_numbers(self, msg: jobs_pb2.SubmitJobRequest) -> None:
        rng = self.rng
        r = rng.randrange(5)
        if r == 0:
            msg.steps = rng.choice((0, -1, 1, 2**31 - 1, 10**6))
        elif r == 1:
            msg.batch_size = rng.choice((-1, 0, 1, 2, JOB_S, JOB_S + 1, 2**31 - 1))
        elif r == 2:
            msg.seed = rng.choice((-1, 0, 2**63 - 1, -(2**63)))
        elif r == 3:
            msg.executor = rng.choice((0, 1, 2, 3, 99))  # type: ignore[assignment]
        else:
            opt = msg.optimizer
            if rng.random() < 0.5:
                opt.sgd.lr, opt.sgd.momentum = rng.choice(FLOATS), rng.choice(FLOATS)
            else:
                opt.adam.lr, opt.adam.beta1 = rng.choice(FLOATS), rng.choice(FLOATS)
                opt.adam.beta2, opt.adam.eps = rng.choice(FLOATS), rng.choice(FLOATS)

    _job_mutations: tuple[Callable[[Generator, Any], None], ...] = (
        _job_template,
        _job_template,
        _job_numbers,
        lambda self, m: m.ClearField("optimizer"),
    )

    def _followup(self, job_id: str) -> Call:
        names = [
            m for m in ("WatchJob", "GetJob", "GetJobResults", "CancelJob") if m in self.by_name
        ]
        method = self.by_name[self.rng.choice(names)]
        msg = method.request(id=job_id)
        if self.rng.random() < 0.7:  # look at it again later
            self.known.followups.append(job_id)
        return Call(method, msg.SerializeToString(), "followup", msg)

    # ---- raw bytes

    def _raw(self, method: Method) -> Call:
        rng = self.rng
        r = rng.randrange(4)
        if r == 0:
            body = rng.randbytes(rng.randint(0, 200))
        else:
            body = self.structured(method).SerializeToString()
            if r == 1 and body:
                body = body[: rng.randrange(len(body))]  # truncated
            elif r == 2 and body:
                k = rng.randrange(len(body))
                body = body[:k] + bytes([rng.randrange(256)]) + body[k + 1 :]  # one byte changed
            else:
                body += rng.randbytes(rng.randint(1, 20))  # trailing garbage, or unknown fields
        return Call(method, body, "raw")

    def cleanup_calls(self) -> Iterator[Call]:
        """Cancel (and delete, where the API can) every job this generator submitted."""
        for name in ("CancelJob", "DeleteJob"):
            if name in self.by_name:
                for job_id in self.known.jobs:
                    method = self.by_name[name]
                    msg = method.request(id=job_id)
                    yield Call(method, msg.SerializeToString(), "cleanup", msg)
