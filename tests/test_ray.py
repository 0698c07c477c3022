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

import graphgrad as gg
from graphgrad.engine import CancelledError, ExecutionError, Graph, LocalExecutor, RunRequest
from graphgrad.engine.executor import Cancellation
from graphgrad.engine.ray_executor import RayExecutor

from .server_proc import running_server
from .strategies import random_graphs
from .test_planner import wide_graph
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


@settings(max_examples=100)
@given(random_graphs(max_nodes=25))
def test_random_graphs_on_ray_equal_local_bit_for_bit(fine, case):
    nodes, feeds, out, wrt = case
    graph = Graph(nodes)
    request = RunRequest((out, wrt[-1]), feeds, tuple(wrt))
    local, remote = LocalExecutor().run(graph, request), fine.run(graph, request)
    for k, v in local.values.items():
        assert remote.values[k].tobytes() == v.tobytes()
    for k, g in local.grads.items():
        assert remote.grads[k].tobytes() == g.tobytes(), k


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
    assert len(on_ray._run.chunks[0]) >= 6  # a few chunks per CPU
    assert on_ray.history.tobytes() == inline.history.tobytes()
    assert on_ray.params["W2"].tobytes() == inline.params["W2"].tobytes()


def test_segments_on_ray_grow_so_tasks_are_few(ray_cluster):
    from graphgrad._jobs import build_specs
    from graphgrad.engine.jobs import TrainingRun
    from graphgrad.engine.ray_executor import RaySegmentRunner

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
