"""Opset 2 over the wire, against a real `graphgrad serve`: integer tensors and the new ops
give the in-process bits, ListOps carries signatures and docs, and a graph from a newer
client (an op this server does not know, or a newer opset) is INVALID_ARGUMENT naming it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad import wire
from graphgrad.engine.ops import ADDED_IN, OPSET_VERSION, REGISTRY
from graphgrad.v1 import graph_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from .server_proc import running_server
from .test_server_e2e import details


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with gg.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GraphServiceStub(channel)


def classifier():
    with gg.Graph():
        x = gg.input("x", (6, 4))
        labels = gg.input("labels", 6, np.int64)
        w = gg.input("w", (4, 3))
        logits = x @ w
        loss = gg.softmax_cross_entropy(logits, labels).mean()
        picked = logits[:, 1:][np.array([0, 5, 5])]
        hits = gg.equal(gg.argmax(logits, axis=1), labels).astype("float32")
    return loss, picked, hits


def test_integer_labels_and_new_ops_give_the_in_process_bits(client):
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((6, 4)),
        "labels": rng.integers(0, 3, 6),
        "w": rng.standard_normal((4, 3)),
    }
    outs = classifier()
    remote = client.run(list(outs), feeds, wrt=["w"])
    local = gg.LocalClient().run(list(outs), feeds, wrt=["w"])
    for o in outs:
        np.testing.assert_array_equal(remote.values[o.name], local.values[o.name])
        assert remote.values[o.name].dtype == local.values[o.name].dtype
    assert remote.values[outs[2].name].dtype == np.float32
    np.testing.assert_array_equal(remote.grads["w"], local.grads["w"])


def test_gradient_with_respect_to_integer_labels_is_refused(client):
    loss, _, _ = classifier()
    feeds = {"x": np.zeros((6, 4)), "labels": np.zeros(6, np.int64), "w": np.zeros((4, 3))}
    with pytest.raises(gg.RemoteError) as e:
        client.run(loss, feeds, wrt=["labels"])
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert "wrt 'labels' is int64" in str(e.value)


def test_list_ops_remote_equals_local_with_signatures_and_docs(client):
    remote = client.list_ops()
    assert remote == gg.LocalClient().list_ops()
    take = {op.name: op for op in remote}["take"]
    assert take.signature == "take(x, indices, axis: int=0)" and "scatter_add" in take.doc


def _graph(*nodes: graph_pb2.Node, opset: int) -> graph_pb2.Graph:
    x = graph_pb2.Node(
        name="x", op="input", shape=graph_pb2.Shape(dims=[3]), dtype=tensor_pb2.DTYPE_FLOAT64
    )
    return graph_pb2.Graph(nodes=[x, *nodes], opset_version=opset)


def _run(stub, graph: graph_pb2.Graph) -> service_pb2.RunResponse:
    x = np.arange(3.0)
    feed = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3], data=x.tobytes())
    request = service_pb2.RunRequest(graph=graph, feeds={"x": feed}, outputs=["y"])
    return stub.Run(request, timeout=30)


def test_an_op_from_a_newer_client_is_invalid_argument_naming_it(stub):
    graph = _graph(graph_pb2.Node(name="y", op="fft", inputs=["x"]), opset=OPSET_VERSION)
    with pytest.raises(grpc.RpcError) as e:
        _run(stub, graph)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown op 'fft'" in e.value.details()
    assert [f for f, _ in details(e.value)] == ["graph.nodes['y'].op"]


def test_a_newer_opset_is_refused_and_older_ones_are_served(stub):
    newer = _graph(graph_pb2.Node(name="y", op="exp", inputs=["x"]), opset=OPSET_VERSION + 1)
    with pytest.raises(grpc.RpcError) as e:
        _run(stub, newer)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"opset_version {OPSET_VERSION + 1} is not supported" in e.value.details()
    for opset in (0, 1, OPSET_VERSION):  # 0: unset, the current one
        resp = _run(stub, _graph(graph_pb2.Node(name="y", op="exp", inputs=["x"]), opset=opset))
        assert np.frombuffer(resp.values["y"].data, "<f8").tolist() == np.exp([0, 1, 2]).tolist()


def test_a_bad_dtype_attribute_is_invalid_argument_naming_it(stub):
    bad = graph_pb2.AttrValue(dtype=9)  # type: ignore[arg-type]
    node = graph_pb2.Node(name="y", op="astype", inputs=["x"], attrs={"dtype": bad})
    with pytest.raises(grpc.RpcError) as e:
        _run(stub, _graph(node, opset=OPSET_VERSION))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attribute 'dtype' of op 'astype' must be a dtype" in e.value.details()
    assert [f for f, _ in details(e.value)] == ["graph.nodes['y'].attrs.dtype"]


# The op set of opset 1, as released: a contract with deployed servers, never edited.
OPSET_1 = {
    "abs", "add", "broadcast_to", "concat", "constant", "cos", "div", "exp", "input", "log",
    "log_softmax", "matmul", "max", "max_share", "maximum", "mean", "minimum", "mse", "mul",
    "neg", "pow", "relu", "reshape", "safe_log", "select_share", "sigmoid", "sign", "sin",
    "slice", "softmax", "softmax_cross_entropy", "sqrt", "step", "sub", "sum", "tanh",
    "transpose",
}  # fmt: skip


def test_every_op_after_opset_1_says_which_opset_added_it():
    assert set(REGISTRY) - ADDED_IN[2] == OPSET_1
    assert max(ADDED_IN) == OPSET_VERSION


def test_a_client_writes_the_lowest_opset_that_holds_the_graph():
    """So a server of an older opset still runs every graph it can."""
    with gg.Graph() as old:
        gg.tanh(gg.input("x", 3))
    with gg.Graph() as gather:
        x = gg.input("x", 3)
        x[np.array([0, 2])]
    with gg.Graph() as ints:
        gg.input("i", 3, np.int64)
    assert [wire.encode_graph(g.freeze()).opset_version for g in (old, gather, ints)] == [1, 2, 2]
