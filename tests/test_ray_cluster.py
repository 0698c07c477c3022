"""A two-node Ray cluster (ray.cluster_utils.Cluster): partitions run on both nodes, the
plan simulator moves the bytes Ray moved between them, and a worker killed mid-run costs a
retry, not a wrong answer or a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

import graphgrad as gg
from graphgrad.engine import LocalExecutor, RunRequest
from graphgrad.engine.calibration import Calibration
from graphgrad.engine.ray_executor import RayExecutor
from graphgrad.engine.simulator import Cluster as SimCluster
from graphgrad.engine.simulator import predict_schedule, schedule_tasks

from .test_planner import wide_graph


@pytest.fixture(scope="module")
def cluster():
    # A custom resource per node names it: node0 is the head, where the driver puts feeds.
    head = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"node0": 1}}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node1": 1})
    c.wait_for_nodes()
    executor = RayExecutor(address=c.address)
    executor.start()
    yield executor
    ray.shutdown()
    c.shutdown()


def feeds_for(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {
        n.name: (rng.standard_normal(n.shape) / np.sqrt(n.shape[-1])).astype(n.dtype)
        for n in graph.inputs
    }


def test_partitions_run_on_both_nodes(cluster):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    graph, loss, wrt = wide_graph(branches=4, layers=3)
    request = RunRequest((loss.name,), feeds_for(graph), tuple(wrt))
    res = cluster.run(graph, request)
    nodes = {t.where.split()[1] for t in res.stats.tasks}
    assert len(nodes) == 2, res.stats.tasks
    local = LocalExecutor().run(graph, request)
    for k in wrt:
        np.testing.assert_allclose(res.grads[k], local.grads[k], rtol=2e-5, atol=1e-7)


def node_indices() -> dict[str, int]:
    """Each alive node's id, as TaskStat.where shows it (8 characters), by its resource."""
    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            named = [int(r[4:]) for r in n["Resources"] if r.startswith("node") and r[4:].isdigit()]
            out[n["NodeID"][:8]] = named[0]
    return out


def test_the_simulator_moves_the_bytes_ray_moved(cluster):
    """Per task, the exports the simulator writes are what Ray's task wrote and what it reads
    is what Ray's task read; replayed where Ray placed each task, the simulator moves the
    bytes Ray moved between nodes (a reader elsewhere fetches its upstream's whole exports
    object; feeds elsewhere than the driver's node cross too); placed by itself, it spreads
    the partitions over both nodes, as Ray did."""
    graph, loss, wrt = wide_graph(branches=4, layers=3)
    request = RunRequest((loss.name,), feeds_for(graph), tuple(wrt))
    res = cluster.run(graph, request)
    _, sched = cluster.plan(graph, request)
    stats = res.stats.tasks
    cal = Calibration(source="test")
    sim, _, _ = schedule_tasks(sched, cal)
    nbytes = [t.nbytes for t in sched.graph.types]
    for spec, task, stat in zip(sched.tasks[:-1], sim[:-1], stats, strict=True):
        assert task.out_bytes == stat.bytes_out, spec
        assert task.fed_bytes + sum(nbytes[j] for j in spec.reads) == stat.bytes_in, spec
    where = node_indices()
    placement = [where[t.where.split()[1]] for t in stats] + [0]  # the caller: the driver's
    moved = sum(
        stats[u].bytes_out
        for k, spec in enumerate(sched.tasks)
        for u in spec.upstream
        if placement[u] != placement[k]
    ) + sum(sim[k].fed_bytes for k in range(len(stats)) if placement[k] != 0)
    shape = SimCluster(2, 1)
    assert moved > 0, "Ray ran every task on one node"
    assert predict_schedule(sched, shape, cal, placement).bytes_across_nodes == moved
    own = predict_schedule(sched, shape, cal)
    assert {t.node for t in own.timeline if t.cpu >= 0} == set(placement) == {0, 1}
    print(
        f"bytes across nodes: Ray {moved}, simulator placing the tasks itself "
        f"{own.bytes_across_nodes}"
    )


def forward_task_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::_forward_task" in line]


def test_a_killed_worker_costs_a_retry_not_the_answer(cluster):
    with gg.Graph() as g:
        x = gg.input("x", shape=(300, 300))
        W = gg.input("W", shape=(300, 300))
        h = x
        for _ in range(1500):  # a few seconds in one task
            h = gg.tanh(h @ W)
        gg.sum(h * h, name="loss")
    graph = g.freeze()
    f = {"x": np.eye(300), "W": np.eye(300) * 0.9}
    request = RunRequest(("loss",), f, ("W",))
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(res=cluster.run(graph, request)))
    thread.start()
    killed = []
    for _ in range(300):  # wait (bounded) for the task to start, then kill its worker
        pids = forward_task_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            break
        time.sleep(0.05)
    thread.join(600)
    assert killed, "the forward task was never seen running"
    assert not thread.is_alive()
    local = LocalExecutor().run(graph, request)
    res = outcome["res"]
    assert res.grads["W"].tobytes() == local.grads["W"].tobytes()
    assert res.values["loss"].tobytes() == local.values["loss"].tobytes()
