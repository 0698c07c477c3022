"""End to end against a real `graphgrad serve`: remote results equal in-process ones, every
bad input gets a clear status and the next good request is served."""

from __future__ import annotations

import ast
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import graphgrad as gg
import graphgrad.engine
import graphgrad.server
from graphgrad._train_specs import build_specs
from graphgrad.v1 import graph_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc, tensor_pb2
from graphgrad.wire import encode_job

from .server_proc import assert_good_request_served, running_server, wait_until_running
from .test_seed import network_feeds, two_layer_network


@pytest.fixture(scope="module")
def server():
    with running_server(
        "--max-nodes", "50000", "--max-tensor-bytes", str(256 << 20), "--graph-cache-size", "4"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with gg.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GraphServiceStub(channel)


def details(e: grpc.RpcError) -> list[tuple[str, str]]:
    out = []
    for d in rpc_status.from_call(e).details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure):
            if d.Is(kind.DESCRIPTOR):
                msg = kind()
                d.Unpack(msg)
                if kind is error_details_pb2.BadRequest:
                    out += [(v.field, v.description) for v in msg.field_violations]
                else:
                    out += [(v.subject, v.description) for v in msg.violations]
    return out


def test_seed_examples_remote_equal_in_process(client):
    local = gg.connect()
    with gg.Graph():
        x = gg.input("x")
        z = gg.mul(x, x, name="z")
        y = gg.div(x, z, name="y")
    for xv in (0.5, 2.0, -3.0):
        r, l_ = client.run(y, {"x": xv}, wrt=[x, z]), local.run(y, {"x": xv}, wrt=[x, z])
        assert r.grads["x"] == l_.grads["x"] == pytest.approx(-1 / xv**2, rel=1e-14)
        assert r.grads["z"] == l_.grads["z"]
    with gg.Graph():
        x = gg.input("x")
        y = 1 / x**2
    assert client.run(y, {"x": 2.0}, wrt=[x]).grads["x"] == pytest.approx(-0.25, rel=1e-15)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_layer_network_remote_is_bit_identical_to_in_process(client, dtype):
    _, L = two_layer_network(dtype)
    f = network_feeds(dtype=dtype)
    wrt = ["W", "b", "V", "a"]
    remote, local = client.run([L, "h"], f, wrt=wrt), gg.connect().run([L, "h"], f, wrt=wrt)
    for k in ("L", "h"):
        assert remote.values[k].tobytes() == local.values[k].tobytes()
        assert remote.values[k].dtype == np.dtype(dtype)
    for k in wrt:
        assert remote.grads[k].tobytes() == local.grads[k].tobytes()
        assert remote.grads[k].shape == f[k].shape
    assert remote.stats.executor == "local" and remote.stats.wall_time > 0


def test_malformed_bytes_are_invalid_argument(server, client):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/graphgrad.v1.GraphService/Run")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff\x0f garbage")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid graphgrad.v1.RunRequest" in e.value.details()
    assert_good_request_served(client)


def graph_msg(*nodes: graph_pb2.Node) -> graph_pb2.Graph:
    return graph_pb2.Graph(nodes=nodes)


def inp(name, shape=(3,), dtype=tensor_pb2.DTYPE_FLOAT64):
    return graph_pb2.Node(name=name, op="input", shape=graph_pb2.Shape(dims=shape), dtype=dtype)


def f64(a) -> tensor_pb2.Tensor:
    a = np.asarray(a, dtype="<f8")
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=a.shape, data=a.tobytes())


@pytest.mark.parametrize(
    ("graph", "feeds", "field", "message"),
    [
        (
            graph_msg(
                inp("x"),
                graph_pb2.Node(name="a", op="add", inputs=["x", "b"]),
                graph_pb2.Node(name="b", op="tanh", inputs=["a"]),
            ),
            {"x": f64([1, 2, 3])},
            "graph.nodes['",
            "cycle",
        ),
        (
            graph_msg(inp("x"), graph_pb2.Node(name="y", op="launch_missiles", inputs=["x"])),
            {"x": f64([1, 2, 3])},
            "graph.nodes['y'].op",
            "unknown op 'launch_missiles'",
        ),
        (
            graph_msg(
                inp("x"), inp("z", (4,)), graph_pb2.Node(name="y", op="add", inputs=["x", "z"])
            ),
            {},
            "graph.nodes['y'].inputs",
            "do not broadcast",
        ),
        (
            graph_msg(inp("x"), graph_pb2.Node(name="y", op="sum", inputs=["x"])),
            {"x": f64([1, 2])},
            "feeds['x']",
            "expects shape (3,) float64, got (2,)",
        ),
        (
            graph_msg(inp("x"), graph_pb2.Node(name="y", op="sum", inputs=["x"])),
            {"x": tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3], data=b"\0" * 23)},
            "feeds['x'].data",
            "needs 24 bytes of data, got 23",
        ),
        (
            graph_msg(inp("x"), graph_pb2.Node(name="y", op="sum", inputs=["x"])),
            {"x": tensor_pb2.Tensor(dtype=7, shape=[3], data=b"\0" * 24)},
            "feeds['x'].dtype",
            "dtype must be",
        ),
        (
            graph_msg(inp("x", (0,)), graph_pb2.Node(name="y", op="max", inputs=["x"])),
            {"x": f64(np.zeros(0))},
            "graph.nodes['y']",
            "zero-size array",
        ),
        (
            graph_msg(
                inp("x"),
                graph_pb2.Node(
                    name="y", op="sum", inputs=["x"], attrs={"axis": graph_pb2.AttrValue(f=0.5)}
                ),
            ),
            {},
            "graph.nodes['y'].attrs.axis",
            "must be an int",
        ),
    ],
    ids=[
        "cycle",
        "unknown-op",
        "shape-mismatch",
        "wrong-feed-shape",
        "short-data",
        "bad-dtype",
        "empty-max",
        "bad-attr",
    ],
)
def test_bad_input_gets_invalid_argument_naming_the_field(
    stub, client, graph, feeds, field, message
):
    with pytest.raises(grpc.RpcError) as e:
        stub.Run(service_pb2.RunRequest(graph=graph, feeds=feeds, outputs=["y"]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert message in e.value.details()
    assert any(f.startswith(field) for f, _ in details(e.value)), details(e.value)
    assert_good_request_served(client)


def test_an_unknown_executor_gets_one_message_on_every_rpc(server, stub):
    """Run, Explain and SubmitJob decode the Executor enum with one function: the same
    message, naming each request's own field."""
    with gg.Graph():
        w = gg.input("w", shape=(2,))
        loss = gg.sum(w * w, name="loss")
    specs = build_specs(loss, {"w": np.zeros((1, 2))}, None, gg.optim.SGD(lr=0.1), 2, None, 0)
    job = encode_job(specs, "local")
    job.executor = 7  # type: ignore[assignment]
    x = graph_pb2.Node(name="x", op="input", shape=graph_pb2.Shape(dims=[2]), dtype=1)
    wire = graph_pb2.Graph(nodes=[x])
    options = service_pb2.RunOptions(executor=7)  # type: ignore[arg-type]
    known = "EXECUTOR_UNSPECIFIED, EXECUTOR_AUTO, EXECUTOR_LOCAL, EXECUTOR_RAY"
    with grpc.insecure_channel(server.address) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        sends = [
            (
                "options.executor",
                lambda: stub.Run(
                    service_pb2.RunRequest(graph=wire, outputs=["x"], options=options)
                ),
            ),
            (
                "options.executor",
                lambda: stub.Explain(
                    service_pb2.ExplainRequest(graph=wire, outputs=["x"], options=options)
                ),
            ),
            ("executor", lambda: jobs.SubmitJob(job)),
        ]
        for field, send in sends:
            with pytest.raises(grpc.RpcError) as e:
                send()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            expected = f"{field} must be one of {known}, got enum value 7"
            assert details(e.value) == [(field, expected)]


def test_huge_declared_shape_is_resource_exhausted(stub, client):
    graph = graph_msg(
        inp("x", (1 << 29, 1 << 29)), graph_pb2.Node(name="y", op="sum", inputs=["x"])
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterGraph(service_pb2.RegisterGraphRequest(graph=graph), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(e.value)[0][0] == "max_tensor_bytes"
    # A broadcast that would blow up an intermediate is refused the same way.
    graph = graph_msg(
        inp("a", (100_000, 1)),
        inp("b", (1, 100_000)),
        graph_pb2.Node(name="y", op="mul", inputs=["a", "b"]),
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterGraph(service_pb2.RegisterGraphRequest(graph=graph), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "node 'y'" in e.value.details()
    assert_good_request_served(client)


def test_too_many_nodes_is_resource_exhausted(client):
    with gg.Graph():
        h = gg.input("x")
        for _ in range(50_001):
            h = gg.neg(h)
    with pytest.raises(gg.RemoteError) as e:
        client.run(h, {"x": 1.0})
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.violations[0][0] == "max_nodes"
    assert_good_request_served(client)


def test_nan_flows_through_unless_check_numerics(client):
    with gg.Graph():
        x = gg.input("x", shape=(2,))
        y = gg.sum(gg.tanh(x))
    res = client.run(y, {"x": np.array([np.nan, 1.0])}, wrt=[x])
    assert np.isnan(res.value) and np.isnan(res.grads["x"][0])
    with pytest.raises(gg.RemoteError, match="feeds\\['x'\\] holds NaN") as e:
        client.run(y, {"x": np.array([np.nan, 1.0])}, check_numerics=True)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_good_request_served(client)


def test_empty_tensors_work(client):
    with gg.Graph():
        x = gg.input("x", shape=(0, 3))
        y = gg.sum(x * 2.0)
    res = client.run(y, {"x": np.zeros((0, 3))}, wrt=[x])
    assert res.value == 0.0 and res.grads["x"].shape == (0, 3)


def test_unknown_fingerprint_is_not_found(stub, client):
    with pytest.raises(grpc.RpcError) as e:
        stub.Run(service_pb2.RunRequest(fingerprint="0" * 64, outputs=["y"]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert_good_request_served(client)


def test_sdk_reregisters_transparently_after_eviction(client):
    graphs = []
    for k in range(6):  # the server keeps 4 graphs: the first is evicted
        with gg.Graph():
            x = gg.input("x")
            graphs.append((x, x * float(k + 1)))
        client.run(graphs[-1][1], {"x": 1.0})
    x, y = graphs[0]
    assert client.run(y, {"x": 3.0}, wrt=[x]).grads["x"] == 1.0
    for _, other in graphs[1:]:  # evict it again: explain re-registers too
        client.run(other, {"x": 1.0})
    assert client.explain(y, wrt=[x]).fingerprint == y.graph.freeze().fingerprint


def test_deadline_stops_the_work_and_server_keeps_serving(client):
    with gg.Graph():
        h = gg.input("x", shape=(200, 200))
        eye = gg.constant(np.eye(200))
        for _ in range(20_000):  # about a minute of work
            h = gg.tanh(h @ eye)
        y = gg.sum(h)
    with pytest.raises(gg.RemoteError) as e:
        client.run(y, {"x": np.ones((200, 200))}, timeout=3.0)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_good_request_served(client)


def test_messages_over_grpc_default_4mib_are_fine(client):
    n = 3_000_000  # 24 MB each way
    with gg.Graph():
        x = gg.input("x", shape=(n,))
        y = gg.sum(x * x)
    xv = np.linspace(-1, 1, n)
    res = client.run(y, {"x": xv}, wrt=[x])
    np.testing.assert_array_equal(res.grads["x"], 2 * xv)


def test_concurrent_requests_are_served_in_parallel(client):
    _, L = two_layer_network()
    errors, results = [], {}

    def work(k):
        try:
            f = network_feeds(seed=k)
            for _ in range(10):
                results[k] = client.run(L, f, wrt=["W", "a"])
        except Exception as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, res in results.items():
        expected = gg.connect().run(L, network_feeds(seed=k), wrt=["W", "a"])
        assert res.grads["W"].tobytes() == expected.grads["W"].tobytes()


def quota_names() -> set[str]:
    """Every limit name the server's code can put in a QuotaFailure: the `limit=` of each
    LimitError it raises and the name of each Admission it makes, read from the source."""
    names = set()
    packages = (gg, graphgrad.engine, graphgrad.server)
    for source in {f for p in packages for f in Path(p.__file__).parent.glob("**/*.py")}:
        for call in ast.walk(ast.parse(source.read_text())):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                continue
            if call.func.id == "LimitError":
                named = [k.value for k in call.keywords if k.arg == "limit"]
            elif call.func.id == "Admission":
                named = call.args[:1]
            else:
                continue
            names |= {n.value for n in named if isinstance(n, ast.Constant)}
    return names


def test_server_info_reports_every_limit_a_quota_failure_can_name(stub):
    names = quota_names()
    assert {"max_nodes", "max_queued_jobs", "max_concurrent_runs", "max_streams"} <= names
    info = stub.GetServerInfo(service_pb2.GetServerInfoRequest())
    assert names - set(info.limits) == set()
    assert info.limits["max_nodes"] == 50000 and info.limits["graph_cache_bytes"] > 0
    assert info.limits["run_queue"] >= 0 and info.limits["max_running_jobs"] >= 1


def test_health_reflection_and_list_ops(server, stub):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="graphgrad.v1.GraphService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        db = ProtoReflectionDescriptorDatabase(channel)
        assert "graphgrad.v1.GraphService" in db.get_services()
        run = db.FindFileContainingSymbol("graphgrad.v1.GraphService")
        assert "graphgrad/v1/service.proto" in run.name
    ops = {op.name: op for op in stub.ListOps(service_pb2.ListOpsRequest()).ops}
    assert {"matmul", "softmax_cross_entropy", "concat"} <= set(ops)
    assert ops["concat"].arity == -1 and ops["sum"].attrs[0].name == "axis"
    info = stub.GetServerInfo(service_pb2.GetServerInfoRequest())
    assert info.limits["max_nodes"] == 50000 and info.version


def test_errors_surface_as_python_exceptions_with_code_and_message(client):
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x)
    with pytest.raises(gg.RemoteError) as e:
        client.run(y, {"x": np.zeros(3)}, wrt=["nope"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope'" in e.value.message


def test_sigterm_lets_in_flight_calls_finish():
    with gg.Graph():
        h = gg.input("x", shape=(200, 200))
        eye = gg.constant(np.eye(200) * 0.5)
        for _ in range(1500):  # a second or more of work
            h = gg.tanh(h @ eye)
        y = gg.sum(h)
    # One run at a time and no queue: a probe is refused exactly while the long call runs.
    flags = ("--grace", "60", "--max-concurrent-runs", "1", "--run-queue", "0")
    with running_server(*flags) as server, gg.connect(server.address) as client:
        client.register(y.graph.freeze())
        outcome = {}
        call = threading.Thread(
            target=lambda: outcome.update(res=client.run(y, {"x": np.ones((200, 200))}))
        )
        call.start()
        wait_until_running(client)
        server.proc.send_signal(signal.SIGTERM)
        call.join(120)
        assert server.proc.wait(60) == 0
    expected = gg.connect().run(y, {"x": np.ones((200, 200))}).value
    assert outcome["res"].value == expected
