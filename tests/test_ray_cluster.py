"""A two-node Ray cluster (ray.cluster_utils.Cluster): partitions run on both nodes, and a
worker killed mid-run costs a retry, not a wrong answer or a hang."""

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
from graphgrad.engine.ray_executor import RayExecutor

from .test_planner import wide_graph


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    )
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
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
