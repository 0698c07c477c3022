"""Malformed requests against a real server: each is INVALID_ARGUMENT (or NOT_FOUND) naming the
field, never INTERNAL; every status fits gRPC's metadata limit; the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import graphgrad as gg
from graphgrad.v1 import (
    graph_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    service_pb2,
    service_pb2_grpc,
    tensor_pb2,
)

from .server_proc import assert_good_request_served, running_server

F64 = tensor_pb2.DTYPE_FLOAT64
HUGE = (0, 2**63 - 1)  # zero elements, one dimension numpy cannot hold
OVERFLOW = (2**32, 2**32, 0)  # zero elements, a product of dims that overflows int64


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def client(server):
    with gg.connect(server.address) as c:
        yield c


def inp(name: str, shape=(3,), dtype=F64) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op="input", shape=graph_pb2.Shape(dims=shape), dtype=dtype)


def node(name: str, op: str, *inputs: str, **attrs: graph_pb2.AttrValue) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op=op, inputs=inputs, attrs=attrs)


def tensor(shape=(3,), data: bytes | None = None) -> tensor_pb2.Tensor:
    if data is None:
        data = np.zeros(shape, "<f8").tobytes() if 0 not in shape else b""
    return tensor_pb2.Tensor(dtype=F64, shape=shape, data=data)


def ints(*values: int) -> graph_pb2.AttrValue:
    return graph_pb2.AttrValue(ints=graph_pb2.Ints(values=values))


def run(*nodes: graph_pb2.Node, outputs=("y",), feeds=None, **fields) -> service_pb2.RunRequest:
    return service_pb2.RunRequest(
        graph=graph_pb2.Graph(nodes=nodes), outputs=outputs, feeds=feeds or {}, **fields
    )


X = inp("x")
Y = node("y", "sum", "x")
XV = {"x": tensor()}

# (request, expected field prefix in BadRequest, words of the message)
CASES: dict[str, tuple[Message, str, str]] = {
    "feed-huge-dim": (run(X, Y, feeds={"x": tensor(HUGE)}), "feeds['x'].shape", "dimension"),
    "feed-negative-dim": (run(X, Y, feeds={"x": tensor((-1,), b"")}), "feeds['x'].shape", "-1"),
    "feed-overflowing-dims": (run(X, Y, feeds={"x": tensor(OVERFLOW)}), "feeds['x'].shape", ""),
    "constant-huge-dim": (
        run(
            node("c", "constant", value=graph_pb2.AttrValue(tensor=tensor(HUGE))),
            node("y", "sum", "c"),
        ),
        "graph.nodes['c'].attrs.value",
        "dimension",
    ),
    "grad-outputs-huge-dim": (
        run(X, node("y", "neg", "x"), feeds=XV, wrt=["x"], grad_outputs={"y": tensor(HUGE)}),
        "grad_outputs['y'].shape",
        "dimension",
    ),
    "declared-huge-dim": (
        run(inp("x", HUGE), Y, wrt=["x"]),
        "graph.nodes['x'].shape",
        "dimension",
    ),
    "declared-overflowing-dims": (
        run(inp("x", OVERFLOW), Y, wrt=["x"]),
        "graph.nodes['x'].shape",
        "",
    ),
    "reshape-huge-dim": (
        run(inp("x", (0,)), node("r", "reshape", "x", shape=ints(*HUGE)), node("y", "sum", "r")),
        "graph.nodes['r'].attrs.shape",
        "dimension",
    ),
    "reshape-overflowing-dims": (
        run(
            inp("x", (0,)), node("r", "reshape", "x", shape=ints(*OVERFLOW)), node("y", "sum", "r")
        ),
        "graph.nodes['r'].attrs.shape",
        "",
    ),
    "broadcast-huge-dim": (
        run(X, node("b", "broadcast_to", "x", shape=ints(0, 2**62, 3)), node("y", "sum", "b")),
        "graph.nodes['b'].attrs.shape",
        "dimension",
    ),
    "matmul-overflowing-result": (
        run(
            inp("a", (2**40, 0)),
            inp("b", (0, 2**40)),
            node("m", "matmul", "a", "b"),
            node("y", "sum", "m"),
        ),
        "graph.nodes['",
        "",
    ),
    "reduce-axis-on-scalar": (
        run(
            inp("x", ()),
            node("y", "sum", "x", axis=graph_pb2.AttrValue(i=0)),
            feeds={"x": tensor(())},
        ),
        "graph.nodes['y']",
        "axis 0 is out of range for rank 0",
    ),
    "reduce-axes-on-scalar": (
        run(inp("x", ()), node("y", "max", "x", axis=ints(0)), feeds={"x": tensor(())}),
        "graph.nodes['y']",
        "out of range",
    ),
    "attr-of-wrong-kind": (
        run(X, node("y", "sum", "x", keepdims=graph_pb2.AttrValue(i=1)), feeds=XV),
        "graph.nodes['y'].attrs.keepdims",
        "must be a bool",
    ),
    "attr-nan": (
        run(X, node("y", "softmax", "x", axis=graph_pb2.AttrValue(f=float("nan"))), feeds=XV),
        "graph.nodes['y'].attrs.axis",
        "must be an int",
    ),
    "axis-huge": (
        run(X, node("y", "sum", "x", axis=ints(2**63 - 1)), feeds=XV),
        "graph.nodes['y']",
        "out of range",
    ),
    "transpose-huge-axes": (
        run(X, node("t", "transpose", "x", axes=ints(2**63 - 1)), node("y", "sum", "t"), feeds=XV),
        "graph.nodes['t']",
        "permutation",
    ),
    "empty-name": (run(X, node("", "neg", "x"), Y, feeds=XV), "graph.nodes[''].name", "name"),
    "huge-name": (run(X, node("n" * 100_000, "neg", "x"), Y, feeds=XV), "graph.nodes['", "name"),
    "duplicate-name": (run(X, inp("x"), Y, feeds=XV), "graph.nodes['x'].name", "duplicate"),
    "input-names-itself": (run(X, node("y", "neg", "y")), "graph.nodes['y'].inputs", "cycle"),
    "unknown-op": (run(X, node("y", "fork_bomb", "x")), "graph.nodes['y'].op", "unknown op"),
    "unknown-node-dtype": (run(inp("x", dtype=99), Y), "graph.nodes['x'].dtype", "dtype"),
    "unknown-tensor-dtype": (
        run(X, Y, feeds={"x": tensor_pb2.Tensor(dtype=99, shape=[3], data=b"\0" * 24)}),
        "feeds['x'].dtype",
        "dtype",
    ),
    "unknown-output": (run(X, Y, outputs=["zz"], feeds=XV), "outputs", "'zz'"),
    "unknown-wrt": (run(X, Y, feeds=XV, wrt=["zz"]), "wrt", "'zz'"),
    "unknown-executor": (
        run(X, Y, feeds=XV, options=service_pb2.RunOptions(executor=99)),
        "options.executor",
        "99",
    ),
    "explain-unknown-executor": (
        service_pb2.ExplainRequest(
            graph=graph_pb2.Graph(nodes=[X, Y]),
            outputs=["y"],
            options=service_pb2.RunOptions(executor=99),
        ),
        "options.executor",
        "99",
    ),
    "grad-outputs-wrong-shape-without-wrt": (
        run(X, node("y", "neg", "x"), feeds=XV, grad_outputs={"y": tensor((2,))}),
        "grad_outputs['y']",
        "shape (3,)",
    ),
    "grad-outputs-not-an-output-without-wrt": (
        run(X, node("y", "neg", "x"), feeds=XV, grad_outputs={"x": tensor()}),
        "grad_outputs['x']",
        "names no requested output",
    ),
    "grad-outputs-not-a-node-without-wrt": (
        run(X, node("y", "neg", "x"), feeds=XV, grad_outputs={"zz": tensor()}),
        "grad_outputs['zz']",
        "names no requested output",
    ),
    "grad-outputs-not-a-node-with-wrt": (
        run(X, node("y", "neg", "x"), feeds=XV, wrt=["x"], grad_outputs={"zz": tensor()}),
        "grad_outputs['zz']",
        "names no requested output",
    ),
}


def rpc(channel: grpc.Channel, request: Message) -> Callable[..., Message]:
    stub = service_pb2_grpc.GraphServiceStub(channel)
    return stub.Explain if isinstance(request, service_pb2.ExplainRequest) else stub.Run


def fields(e: grpc.RpcError) -> list[str]:
    out = []
    for d in rpc_status.from_call(e).details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            msg = error_details_pb2.BadRequest()
            d.Unpack(msg)
            out += [v.field for v in msg.field_violations]
    return out


def metadata_bytes(e: grpc.RpcError) -> int:
    trailing = e.trailing_metadata() or ()
    return len(e.details().encode()) + sum(len(k) + len(v) for k, v in trailing)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_is_invalid_argument_naming_the_field(channel, client, case):
    request, field, words = CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        rpc(channel, request)(request, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert words in e.value.details()
    assert any(f.startswith(field) for f in fields(e.value)), (fields(e.value), e.value.details())
    assert metadata_bytes(e.value) < 8192
    assert_good_request_served(client)


def chain_cycle(n: int) -> graph_pb2.Graph:
    names = [f"n{i}" for i in range(n)]
    nodes = [node(a, "neg", b) for a, b in zip(names, [*names[1:], names[0]], strict=True)]
    return graph_pb2.Graph(nodes=nodes)


def many_inputs(n: int) -> list[graph_pb2.Node]:
    return [inp(f"input_{i}", (1,)) for i in range(n)] + [
        node("y", "concat", *(f"input_{i}" for i in range(n)))
    ]


LONG = {
    "cycle-of-50k": (
        lambda: service_pb2.RegisterGraphRequest(graph=chain_cycle(50_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more",
    ),
    "unknown-feed-among-20k-inputs": (
        lambda: run(*many_inputs(20_000), feeds={"nope": tensor((1,))}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'input_0', 'input_1', 'input_2' and 19,997 more",
    ),
    "3000-missing-feeds": (
        lambda: run(*many_inputs(3_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "and 2,997 more",
    ),
    "100k-char-fingerprint": (
        lambda: service_pb2.RunRequest(fingerprint="f" * 100_000, outputs=["y"]),
        grpc.StatusCode.NOT_FOUND,
        "truncated",
    ),
    "100k-char-job-id": (
        lambda: jobs_pb2.GetJobRequest(id="j" * 100_000),
        grpc.StatusCode.NOT_FOUND,
        "truncated",
    ),
}


@pytest.mark.parametrize("case", list(LONG))
def test_long_errors_fit_grpc_metadata_and_keep_their_details(channel, client, case):
    make, code, words = LONG[case]
    request = make()
    if isinstance(request, jobs_pb2.GetJobRequest):
        call = jobs_pb2_grpc.JobServiceStub(channel).GetJob
    elif isinstance(request, service_pb2.RegisterGraphRequest):
        call = service_pb2_grpc.GraphServiceStub(channel).RegisterGraph
    else:
        call = service_pb2_grpc.GraphServiceStub(channel).Run
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=120)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    assert len(e.value.details().encode()) <= 1024
    assert rpc_status.from_call(e.value).details, "the details survive"
    assert metadata_bytes(e.value) < 8192
    assert_good_request_served(client)
