"""The Ray executor on a real local Ray (one per module, 2 CPUs): bit-identical to local."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgrad as gg
from graphgrad.engine import CancelledError, ExecutionError, Graph, LocalExecutor, RunRequest
from graphgrad.engine.executor import Cancellation
from graphgrad.engine.ray_executor import RayExecutor

from .server_proc import running_server
from .strategies import random_requests
from .test_planner import run_partitioned, wide_graph
from .test_seed import network_feeds, two_layer_network


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def fine(ray_cluster):
    """Partitions as small as the graph allows: many tasks, many cuts."""
    return RayExecutor(min_partition_seconds=0.0)


def assert_bitwise_equal(values, grads, local) -> None:
    """Values and gradients equal the local executor's, bit for bit, dtype and shape too."""
    assert values.keys() == local.values.keys() and grads.keys() == local.grads.keys()
    for k, v in local.values.items():
        assert values[k].dtype == v.dtype and values[k].shape == v.shape, k
        assert values[k].tobytes() == v.tobytes(), k
    for k, g in local.grads.items():
        assert grads[k].dtype == g.dtype and grads[k].shape == g.shape, k
        assert grads[k].tobytes() == g.tobytes(), k


@settings(max_examples=300)
@given(random_requests(max_nodes=30), st.sampled_from([0.0, 1e-5, 1e-4]))
def test_random_requests_partitioned_equal_local_bit_for_bit(case, min_seconds):
    """The driver Ray runs, with the inline runner: any legal request (repeated and constant
    `wrt`, unused inputs, intermediates, outputs that are inputs, several seeds)."""
    nodes, request = case
    graph = Graph(nodes)
    values, grads, _ = run_partitioned(graph, request, min_seconds)
    assert_bitwise_equal(values, grads, LocalExecutor().run(graph, request))


@settings(max_examples=100)
@given(random_requests(max_nodes=25))
def test_random_requests_on_ray_equal_local_bit_for_bit(fine, case):
    nodes, request = case
    graph = Graph(nodes)
    remote = fine.run(graph, request)
    assert_bitwise_equal(remote.values, remote.grads, LocalExecutor().run(graph, request))


def edge_graph(c: np.ndarray) -> Graph:
    """Many partitions; a constant read by several of them; a node off the path to y; an
    input nothing reads."""
    with gg.Graph() as g:
        x = gg.input("x", shape=(4,))
        gg.input("u", shape=(2, 5))
        cn = gg.constant(c, name="c")
        z = gg.mul(x, cn, name="z")
        gg.tanh(z, name="side")
        gg.sum(gg.concat([gg.sin(z * float(k)) + x * cn for k in range(1, 6)]), name="y")
    return g.freeze()


C = np.array([0.5, -1.5, 2.0, 0.25])
X = np.array([0.3, -0.7, 1.1, 2.0])
SEED4 = np.array([1.0, -2.0, 0.5, 3.0])
EDGE_REQUESTS = {
    "repeated input": (("y",), ("x", "x"), None),
    "repeated intermediate and input": (("y",), ("z", "x", "z"), None),
    "constant": (("y",), ("c",), None),
    "constant twice and input": (("y",), ("c", "x", "c"), None),
    "unfed unused input": (("y",), ("u", "x", "u"), None),
    "intermediate": (("y",), ("z",), None),
    "the output itself": (("y",), ("y", "x"), None),
    "node off the path": (("y",), ("side", "x"), None),
    "repeated outputs": (("y", "y", "z", "z"), ("x",), None),
    "outputs that are an input and a constant": (("y", "x", "c"), ("x", "c"), None),
    "several seeds": (
        ("z", "y", "c", "x"),
        ("x", "c", "z", "c"),
        {"z": SEED4, "y": np.array(2.0), "c": -SEED4, "x": SEED4[::-1].copy()},
    ),
    "only an input seeded": (("x", "y"), ("x", "x", "c"), {"x": SEED4}),
}


@pytest.mark.parametrize("case", list(EDGE_REQUESTS))
def test_every_kind_of_request_on_ray_equals_local(fine, case):
    outputs, wrt, seeds = EDGE_REQUESTS[case]
    graph = edge_graph(C)
    request = RunRequest(outputs, {"x": X}, wrt, seeds)
    local = LocalExecutor().run(graph, request)
    values, grads, parts = run_partitioned(graph, request)
    assert len(parts.partitions) >= 6
    assert_bitwise_equal(values, grads, local)
    remote = fine.run(graph, request)
    assert remote.stats.partitions >= 6
    assert_bitwise_equal(remote.values, remote.grads, local)


def test_repeated_and_constant_wrt_on_ray_match_finite_differences(fine):
    graph = edge_graph(C)
    res = fine.run(graph, RunRequest(("y",), {"x": X}, ("x", "c", "x", "c")))

    def y(x: np.ndarray, c: np.ndarray) -> float:
        return float(LocalExecutor().run(edge_graph(c), RunRequest(("y",), {"x": x})).values["y"])

    eps = 1e-6
    for name in ("x", "c"):
        fd = np.zeros(4)
        for k in range(4):
            d = np.zeros(4)
            d[k] = eps
            args = {"x": X, "c": C}
            hi = y(**{**args, name: args[name] + d})
            lo = y(**{**args, name: args[name] - d})
            fd[k] = (hi - lo) / (2 * eps)
        assert np.allclose(res.grads[name], fd, rtol=1e-6, atol=1e-6), name


def branches_graph(branches: int = 4, layers: int = 10, d: int = 256):
    """Independent compute-heavy branches sharing W and a constant: `auto` picks Ray."""
    with gg.Graph():
        w = gg.input("W", shape=(d, d), dtype="float32")
        c = gg.constant(np.linspace(0.5, 1.5, d, dtype=np.float32), name="c")
        total = None
        for b in range(branches):
            h = gg.input(f"x{b}", shape=(d, d), dtype="float32")
            for _ in range(layers):
                h = gg.tanh((h @ w) * c)
            term = gg.mean(h * h)
            total = term if total is None else total + term
    assert total is not None
    rng = np.random.default_rng(7)
    feeds = {"W": (rng.standard_normal((d, d)) / d**0.5).astype(np.float32)}
    feeds |= {f"x{b}": rng.standard_normal((d, d)).astype(np.float32) for b in range(branches)}
    return total, feeds


def test_auto_with_ray_up_gives_local_gradients_for_repeated_and_constant_wrt(ray_cluster):
    loss, feeds = branches_graph()
    wrt = ["W", "c", "W", "x0", "c"]
    client = gg.connect()
    client.run(loss, feeds, executor="ray")  # Ray is up: `auto` may now choose it
    assert client.explain(loss, wrt=wrt).executor == "ray", "auto must choose Ray here"
    auto = client.run(loss, feeds, wrt=wrt)
    local = client.run(loss, feeds, wrt=wrt, executor="local")
    assert auto.stats.executor == "ray"
    for k in ("W", "c", "x0"):
        assert np.any(local.grads[k] != 0), k
        assert auto.grads[k].tobytes() == local.grads[k].tobytes(), k


def test_server_under_auto_gives_local_gradients_for_repeated_and_constant_wrt(ray_cluster):
    loss, feeds = branches_graph()
    wrt = ["W", "c", "W", "x0", "c"]
    local = gg.connect().run(loss, feeds, wrt=wrt, executor="local")
    with running_server("--ray-address", ray_cluster) as server, gg.connect(server.address) as c:
        res = c.run(loss, feeds, wrt=wrt)
        assert res.stats.executor == "ray"
        for k in ("W", "c", "x0"):
            assert res.grads[k].tobytes() == local.grads[k].tobytes(), k


def test_one_value_feeding_several_partitions(fine):
    with gg.Graph() as g:
        x = gg.input("x", shape=(4,))
        z = gg.mul(x, x, name="z")
        gg.sum(gg.concat([gg.sin(z * float(k)) + x for k in range(1, 6)]), name="y")
    graph = g.freeze()
    request = RunRequest(("y",), {"x": np.array([0.3, -0.7, 1.1, 2.0])}, ("x", "z"))
    res = fine.run(graph, request)
    assert res.stats.partitions >= 6 and res.stats.bytes_moved > 0
    local = LocalExecutor().run(graph, request)
    assert res.grads["x"].tobytes() == local.grads["x"].tobytes()
    assert res.grads["z"].tobytes() == local.grads["z"].tobytes()


def test_in_process_client_runs_on_ray_and_writes_a_trace(ray_cluster, tmp_path):
    _, L = two_layer_network()
    f = network_feeds()
    client = gg.connect()
    res = client.run([L, "h"], f, wrt=["W", "b", "V", "a", "h"], executor="ray")
    local = client.run([L, "h"], f, wrt=["W", "b", "V", "a", "h"], executor="local")
    assert res.stats.executor == "ray" and local.stats.executor == "local"
    for k in local.grads:
        assert res.grads[k].tobytes() == local.grads[k].tobytes()
    phases = {(t.partition, t.phase) for t in res.stats.tasks}
    assert (0, "forward") in phases and (0, "backward") in phases
    trace = json.loads(res.write_trace(tmp_path / "run.trace.json").read_text())
    assert {e["cat"] for e in trace["traceEvents"]} == {"forward", "backward"}
    assert all(e["dur"] >= 0 and "pid" in e["pid"] for e in trace["traceEvents"])


def test_explain_shows_one_partition_per_branch(ray_cluster):
    _, loss, wrt = wide_graph(branches=4, layers=2)
    plan = gg.connect().explain(loss, wrt=wrt, executor="ray")
    assert plan.executor == "ray" and len(plan.partitions) == 5  # and the join of the losses
    assert sorted(c.node for c in plan.cuts if c.src < 0)[0] == "W0_0"  # feeds cross too
    assert "5 partition(s)" in str(plan)
    small = gg.connect().explain(loss, wrt=wrt, executor="local")
    assert small.executor == "local" and len(small.partitions) == 1


def test_errors_inside_a_task_surface_with_the_node(fine):
    with gg.Graph() as g:
        x = gg.input("x", shape=(0,))
        gg.max(x, name="y")
    with pytest.raises(ExecutionError, match="node 'y'"):
        fine.run(g.freeze(), RunRequest(("y",), {"x": np.zeros(0)}))


def test_deadline_cancels_the_ray_tasks(fine):
    with gg.Graph() as g:
        h = gg.input("x", shape=(300, 300))
        eye = gg.constant(np.eye(300) * 0.5)
        for _ in range(30_000):  # minutes of work in one task
            h = gg.tanh(h @ eye)
        gg.sum(h, name="y")
    graph = g.freeze()
    with pytest.raises(CancelledError):
        fine.run(
            graph,
            RunRequest(("y",), {"x": np.ones((300, 300))}),
            Cancellation(deadline=time.monotonic() + 3),
        )
    # Cancelled, not left running: both CPUs come back (bounded wait, not a timing assertion).
    for _ in range(600):
        if ray.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_server_attached_to_ray_runs_remote_gradients_on_it(ray_cluster):
    _, L = two_layer_network()
    f = network_feeds()
    with running_server("--ray-address", ray_cluster) as server, gg.connect(server.address) as c:
        res = c.run(L, f, wrt=["W", "a"], executor="ray")
        assert res.stats.executor == "ray"
        assert any("node" in t.where for t in res.stats.tasks)
        local = gg.connect().run(L, f, wrt=["W", "a"], executor="local")
        assert res.grads["W"].tobytes() == local.grads["W"].tobytes()
        info = c.server_info()
        assert info.ray_resources["CPU"] == 2
        plan = c.explain(L, wrt=["W"], executor="ray")
        assert plan.executor == "ray" and plan.partitions[0].nodes


def test_training_job_on_ray_equals_inline(ray_cluster):
    from .test_jobs import init, mlp, own_data

    loss = mlp(8)
    params, data = init(24, 8, 0), own_data(24)
    client = gg.connect()
    on_ray = client.train(loss, params, data, gg.optim.SGD(lr=0.1), steps=20, executor="ray")
    inline = client.train(loss, params, data, gg.optim.SGD(lr=0.1), steps=20, executor="local")
    on_ray.wait(progress=False)
    inline.wait(progress=False)
    assert on_ray.chunks[0] >= 6  # a few chunks per CPU
    assert on_ray.history.tobytes() == inline.history.tobytes()
    assert on_ray.params["W2"].tobytes() == inline.params["W2"].tobytes()


def test_segments_on_ray_grow_so_tasks_are_few(ray_cluster):
    from graphgrad._train_specs import build_specs
    from graphgrad.engine.ray_training import RaySegmentRunner
    from graphgrad.engine.training_run import TrainingRun

    from .test_jobs import init, mlp, own_data

    specs = build_specs(mlp(8), init(24, 8, 0), own_data(24), gg.optim.SGD(lr=0.1), 200, None, 0)
    run = TrainingRun(specs, cpus=2, runner=RaySegmentRunner(RayExecutor()))
    segments: list[int] = []
    run.run(on_segment=lambda r: segments.append(r.progress().steps_done))
    chunks = len(run.chunks[0])
    # 25-step segments would be 8 per chunk; these take milliseconds, so after the first
    # segment the rest of each chunk's 200 steps fits in one or two.
    assert chunks >= 6 and len(segments) <= 3 * chunks
    assert segments[-1] == 200


def kill_a_segment_worker() -> bool:
    """SIGKILL a Ray worker while it runs a training segment (bounded wait for one)."""
    for _ in range(600):
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in ps.splitlines() if "ray::_train_segment" in line]
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def killed_worker_job(client: Any) -> None:
    """A job whose Ray worker is killed mid-segment ends with the results of an inline run."""
    from .test_jobs import init, mlp, own_data

    loss = mlp(64, samples=256)
    params, data = init(64, 64, 1), own_data(64, samples=256)
    job = client.train(loss, params, data, gg.optim.SGD(lr=0.05), steps=150, executor="ray")
    killed = kill_a_segment_worker()
    job.wait(progress=False, timeout=600)
    assert killed and job.status == "done"
    inline = gg.connect().train(
        loss, params, data, gg.optim.SGD(lr=0.05), steps=150, executor="local"
    )
    inline.wait(progress=False)
    assert job.history.tobytes() == inline.history.tobytes()
    assert job.params["W1"].tobytes() == inline.params["W1"].tobytes()


def test_a_killed_worker_costs_a_training_job_a_retry(ray_cluster):
    killed_worker_job(gg.connect())


def test_a_killed_worker_costs_a_job_submitted_over_grpc_a_retry(ray_cluster, tmp_path):
    with (
        running_server("--ray-address", ray_cluster, "--data-dir", str(tmp_path)) as server,
        gg.connect(server.address) as client,
    ):
        killed_worker_job(client)
