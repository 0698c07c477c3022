"""Calibration: JSON round trip, clear errors for unusable files (a warning and the defaults
at server start), `graphgrad calibrate --quick`, and GetServerInfo naming what is in force."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

import graphgrad as gg
from graphgrad._request import build_request
from graphgrad.engine import calibration, proc_cpu
from graphgrad.engine.calibration import DEFAULT, Calibration, CalibrationError
from graphgrad.engine.ops import lookup
from graphgrad.engine.planner import FLOPS_PER_S, NODE_OVERHEAD_S, TASK_OVERHEAD_S
from graphgrad.engine.simulator import Cluster, choose_partitions, predict
from graphgrad.server import cli
from graphgrad.v1 import service_pb2, service_pb2_grpc
from graphgrad.wire import encode_graph

from .server_proc import running_server

MEASURED = Calibration(
    source="measured on test",
    node_overhead_s=3e-6,
    linalg_dispatch_s=1e-6,
    reduce_dispatch_s=2e-6,
    bytes_per_s=1e10,
    fresh_bytes_per_s=4e9,
    flops_per_s={"linalg/float64": 3e10, "elementwise/float32": 2e9},
    store_bytes_per_s=2e9,
    task_overhead_s=8e-4,
    task_latency_s=0.0,
    driver_task_s=2.5e-3,
    daemon_task_s=0.0,
    cores=2.0,
    store_object_s=1.5e-3,
    store_wait_s=2e-3,
    ray_measured=True,
)


def test_defaults_are_the_planners_constants() -> None:
    assert DEFAULT.node_overhead_s == NODE_OVERHEAD_S
    assert DEFAULT.task_overhead_s == TASK_OVERHEAD_S
    assert DEFAULT.flops_rate("linalg", "float64") == FLOPS_PER_S
    assert not DEFAULT.ray_measured
    # Ray's own processes are charged nothing unless measured, on a machine of known cores.
    assert DEFAULT.driver_task_s == DEFAULT.daemon_task_s == DEFAULT.cores == 0.0
    assert DEFAULT.store_object_s == DEFAULT.store_wait_s == 0.0  # an export: its bytes alone
    assert DEFAULT.fresh_bytes_per_s == DEFAULT.bytes_per_s
    assert DEFAULT.linalg_dispatch_s == DEFAULT.reduce_dispatch_s == 0.0


def test_a_matmul_and_a_reduction_cost_their_own_dispatch() -> None:
    """Beyond an elementwise node's dispatch (node_overhead_s), each family's own."""
    ops = ("add", "matmul", "sum")
    cost = {op: MEASURED.node_seconds(lookup(op), "float32", 0, 0) for op in ops}
    assert cost == {
        "add": pytest.approx(3e-6),
        "matmul": pytest.approx(3e-6 + 1e-6),
        "sum": pytest.approx(3e-6 + 2e-6),
    }


def test_a_result_with_an_mmap_of_its_own_streams_into_fresh_pages() -> None:
    """Below the allocator's mmap threshold a large node's traffic reuses heap pages (memory
    bandwidth); a result at the threshold gets fresh pages, at their slower rate."""
    add, nbytes = lookup("add"), 3.0 * calibration.FRESH_BYTES
    below = MEASURED.node_seconds(add, "float64", 0, nbytes, out_bytes=calibration.FRESH_BYTES - 8)
    at = MEASURED.node_seconds(add, "float64", 0, nbytes, out_bytes=calibration.FRESH_BYTES)
    assert below == pytest.approx(MEASURED.node_overhead_s + nbytes / 1e10)
    assert at == pytest.approx(MEASURED.node_overhead_s + nbytes / 4e9)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c" / calibration.FILE_NAME
    calibration.save(MEASURED, path)
    back = calibration.load(path)
    assert back == MEASURED
    assert back.flops_rate("linalg", "float64") == 3e10
    assert back.flops_rate("linalg", "float32") == MEASURED.default_flops_per_s
    assert json.loads(path.read_text())["version"] == calibration.VERSION


def test_a_file_from_before_fresh_pages_keeps_its_memory_rate_for_them() -> None:
    # Its bytes_per_s was measured into fresh pages: the default fresh rate could model
    # fresh pages as faster than reused ones (found by review).
    body = {"version": calibration.VERSION, "bytes_per_s": 2e9}
    old = calibration.Calibration.from_json(json.dumps(body))
    assert old.fresh_bytes_per_s == old.bytes_per_s == 2e9
    both = calibration.Calibration.from_json(json.dumps({**body, "fresh_bytes_per_s": 1e9}))
    assert both.fresh_bytes_per_s == 1e9


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"version": 99}', "version 99"),
        ('{"version": 1, "bytes_per_s": -5}', "bytes_per_s must be a finite number > 0"),
        ('{"version": 1, "task_overhead_s": "fast"}', "task_overhead_s must be"),
        ('{"version": 1, "flops_per_s": {"linalg/float64": 0}}', "flops_per_s['linalg/float64']"),
        ('{"version": 1, "speed": 1}', "unknown field(s) ['speed']"),
        ('{"version": 1, "ray_measured": 1}', "ray_measured must be true or false"),
        ('{"version": 1, "driver_task_s": -1e-3}', "driver_task_s must be a finite number >= 0"),
        ('{"version": 1, "cores": "two"}', "cores must be a finite number >= 0"),
    ],
)
def test_unusable_file_is_named(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / calibration.FILE_NAME
    path.write_text(text)
    with pytest.raises(CalibrationError) as e:
        calibration.load(path)
    assert str(path) in str(e.value) and says in str(e.value)


def test_server_start_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert calibration.load_or_defaults(tmp_path) is DEFAULT  # no file: quietly the defaults
    assert not caplog.records
    (tmp_path / calibration.FILE_NAME).write_text('{"version": 1, "bytes_per_s": NaN}')
    with caplog.at_level(logging.WARNING, "graphgrad.calibration"):
        assert calibration.load_or_defaults(tmp_path) is DEFAULT
    assert "bytes_per_s" in caplog.text and "default calibration" in caplog.text


def test_calibrate_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calibrate", "--quick", "--data-dir", str(tmp_path)]) == 0
    written = tmp_path / calibration.FILE_NAME
    assert str(written) in capsys.readouterr().out
    cal = calibration.load(written)
    assert not cal.ray_measured and "(quick)" in cal.source
    assert cal.task_overhead_s == DEFAULT.task_overhead_s  # Ray's figures: the defaults
    figures = calibration.figures(cal)
    for family in calibration.FAMILIES:
        for dtype in calibration.DTYPES:
            assert figures[f"flops_per_s/{family}/{dtype}"] > 0
    assert all(math.isfinite(v) and v >= 0 for v in figures.values())


def test_server_uses_the_calibration_in_force(tmp_path: Path) -> None:
    calibration.save(MEASURED, tmp_path / calibration.FILE_NAME)
    with gg.Graph():
        x = gg.input("x", shape=(64, 64))
        branches = [gg.sum(gg.tanh(x @ gg.input(f"W{k}", shape=(64, 64)))) for k in range(4)]
        loss = branches[0] + branches[1] + branches[2] + branches[3]
    wrt = [f"W{k}" for k in range(4)]
    _, graph, request = build_request(loss, None, wrt, None)
    with running_server("--data-dir", str(tmp_path)) as server:
        client = gg.connect(server.address)
        info = client.server_info()
        remote = client.explain(loss, wrt=wrt, nodes=2, cpus_per_node=3).prediction
        stub = service_pb2_grpc.GraphServiceStub(grpc.insecure_channel(server.address))
        bad = service_pb2.ExplainRequest(graph=encode_graph(graph), outputs=[loss.name])
        bad.cluster.nodes = 2  # and no cpus_per_node
        with pytest.raises(grpc.RpcError) as refused:
            stub.Explain(bad, timeout=30)
        client.close()
    assert info.calibration == MEASURED.source
    assert dict(info.calibration_figures) == calibration.figures(MEASURED)
    assert info.calibration_figures["flops_per_s/linalg/float64"] == 3e10
    # Explain predicts with it: as this process does given the same calibration.
    choice = choose_partitions(graph, request, Cluster(2, 3), MEASURED)
    here = choice.prediction or predict(graph, request, Cluster(2, 3), MEASURED)
    assert remote is not None and remote.calibration == MEASURED.source
    assert remote.makespan == pytest.approx(here.makespan)
    assert remote.critical_path == here.critical_path and remote.bound == here.bound
    assert remote.timeline == here.timeline and remote.cluster == here.cluster
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nodes and cpus_per_node go together" in (refused.value.details() or "")


def four_branches() -> tuple[gg.Tensor, list[str]]:
    with gg.Graph():
        x = gg.input("x", shape=(64, 64))
        branches = [gg.sum(gg.tanh(x @ gg.input(f"W{k}", shape=(64, 64)))) for k in range(4)]
        loss = branches[0] + branches[1] + branches[2] + branches[3]
    return loss, [f"W{k}" for k in range(4)]


def test_in_process_client_uses_the_data_dirs_or_a_given_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss, wrt = four_branches()
    given = tmp_path / "given.json"
    calibration.save(MEASURED, given)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("GRAPHGRAD_DATA_DIR", str(data_dir))

    def used(client: gg.LocalClient) -> str:
        p = client.explain(loss, wrt=wrt, cpus=4).prediction
        assert p is not None
        return p.calibration

    assert used(gg.connect()) == DEFAULT.source  # no file in the data dir
    assert used(gg.connect(calibration=given)) == MEASURED.source
    calibration.save(
        dataclasses.replace(MEASURED, source="in the data dir"), data_dir / "calibration.json"
    )
    assert used(gg.connect()) == "in the data dir"
    assert calibration.in_force() is DEFAULT  # the process's stays as it was


def test_a_given_calibration_must_be_usable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(CalibrationError, match=re.escape(str(missing))):
        gg.connect(calibration=missing)
    with pytest.raises(ValueError, match="calibration is for the in-process client"):
        gg.connect("localhost:1", calibration=missing)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_the_cpu_of_processes_this_one_started_is_read_from_proc() -> None:
    """What the calibration charges Ray's daemons: a child's CPU time, found as a
    descendant of this process that is not a Ray worker."""
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin + "time.sleep(60)"])
    try:
        assert child.pid in proc_cpu.daemons()
        deadline = time.monotonic() + 30
        while proc_cpu.cpu_seconds([child.pid]) < 0.29 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0.29 <= proc_cpu.cpu_seconds([child.pid]) < 1.0
    finally:
        child.kill()
        child.wait()
    assert proc_cpu.cpu_seconds([child.pid]) == 0.0  # gone: counts nothing
