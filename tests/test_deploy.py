"""deploy/: the local multi-node script runs for real; the other recipes are well-formed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import graphgrad as gg

from .test_planner import wide_graph

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_cluster_script_runs_graphgrad_on_two_ray_nodes(tmp_path):
    gg_port, ray_port = free_port(), free_port()
    data_dir = tmp_path / "data"  # the script's server must not touch the user's job store
    proc = subprocess.Popen(
        [
            "bash",
            str(DEPLOY / "local_cluster.sh"),
            "--graphgrad-port",
            str(gg_port),
            "--ray-port",
            str(ray_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "GRAPHGRAD_DATA_DIR": str(data_dir)},
    )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(240)
        match = re.search(r"serving on grpc://(\S+)", line[0] if line else "")
        assert match, f"the script did not start the server: {line}"
        _, loss, wrt = wide_graph(branches=4, layers=3)
        rng = np.random.default_rng(0)
        graph = loss.graph.freeze()
        feeds = {
            n.name: (rng.standard_normal(n.shape) / 23).astype("float32") for n in graph.inputs
        }
        with gg.connect(match.group(1), timeout=300) as client:
            res = client.run(loss, feeds, wrt=wrt, executor="ray")
            info = client.server_info()
        assert info.ray_resources["CPU"] == 2
        assert res.stats.executor == "ray" and res.stats.partitions == 5  # 4 branches, 1 join
        assert len({t.where.split()[1] for t in res.stats.tasks}) == 2  # both nodes worked
        local = gg.connect().run(loss, feeds, wrt=wrt, executor="local")
        np.testing.assert_allclose(res.grads["W0_0"], local.grads["W0_0"], rtol=2e-5, atol=1e-7)
        assert (data_dir / "jobs.sqlite3").exists()  # the store it was given, not ~/.local
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


@pytest.mark.parametrize(
    "name", ["kuberay/raycluster.yaml", "kuberay/graphgrad-server.yaml", "ray-up.yaml"]
)
def test_manifests_are_well_formed(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert docs
    for doc in docs:
        if name.startswith("kuberay"):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc)
    kinds = {d.get("kind") for d in docs}
    if name == "kuberay/raycluster.yaml":
        (cluster,) = docs
        assert cluster["apiVersion"] == "ray.io/v1" and kinds == {"RayCluster"}
        assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] >= 1
    if name == "kuberay/graphgrad-server.yaml":
        assert kinds == {"Deployment", "Service"}
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "RAY_ADDRESS", "value": "graphgrad-ray-head-svc:6379"} in container["env"]
        assert container["readinessProbe"]["grpc"]["service"] == "graphgrad.v1.GraphService"
        service = next(d for d in docs if d["kind"] == "Service")
        assert service["spec"]["ports"][0]["port"] == 50051
    if name == "ray-up.yaml":
        (config,) = docs
        assert {"cluster_name", "provider", "head_start_ray_commands"} <= set(config)
        assert any("graphgrad serve" in c for c in config["head_start_ray_commands"])


def test_dockerfile_is_well_formed():
    lines = [
        ln
        for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0].startswith("FROM python:3.11")
    assert any(ln.startswith("EXPOSE 50051") for ln in lines)
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    assert '"graphgrad", "serve"' in entry
    root = DEPLOY.parent
    for ln in lines:
        if ln.startswith("COPY"):
            for src in ln.split()[1:-1]:
                assert (root / src).exists(), src
