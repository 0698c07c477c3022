"""The server is observable (issue 13, item 5), against a real `graphgrad serve
--metrics-port 0`: its Prometheus endpoint, scraped over HTTP, counts exactly the requests a
test sent, by method and status; its gauges show the caches and the jobs; it writes one
structured line per request and per job state change. And the metrics of several processes
sharing a directory (the `--workers` arrangement) add up at the one endpoint."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad.server import logs
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc
from graphgrad.wire import encode_graph, encode_tensor

from .scrape import delta, parse, scrape, series, wait_for
from .server_proc import ServerProcess, running_server

DEADLINE = 30.0  # per call: a bound, never a measurement


def json_lines(log: str, logger: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["logger"] == logger:
                out.append(record)
    return out


def square_graph() -> gg.Tensor:
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        y = gg.sum(x * x, name="y")
    return y


@dataclass
class Observed:
    """A server logging JSON at DEBUG with its metrics served, a channel to it, and where
    its metrics are, from GetServerInfo."""

    proc: ServerProcess
    channel: grpc.Channel
    metrics_port: int

    @property
    def address(self) -> str:
        return self.proc.address

    def log(self) -> str:
        return self.proc.log()

    def worker(self) -> str:
        """The server process, as its log lines name it."""
        return f"{socket.gethostname()}:{self.proc.proc.pid}"


@pytest.fixture(scope="module")
def server():
    flags = ("--metrics-port", "0", "--log-level", "debug", "--log-format", "json")
    with running_server(*flags) as s, grpc.insecure_channel(s.address) as channel:
        info = service_pb2_grpc.GraphServiceStub(channel).GetServerInfo(
            service_pb2.GetServerInfoRequest(), timeout=DEADLINE
        )
        yield Observed(s, channel, info.metrics_port)


def test_the_port_is_reported_in_the_startup_line_and_server_info(server):
    assert server.metrics_port > 0
    assert f"http://127.0.0.1:{server.metrics_port}/metrics" in server.proc.banner
    assert ("graphgrad_requests_total", (("code", "OK"), ("method", "GetServerInfo"))) in scrape(
        server.metrics_port
    )


def test_the_counters_equal_the_requests_sent_by_method_and_status(server):
    stub = service_pb2_grpc.GraphServiceStub(server.channel)
    jobs = jobs_pb2_grpc.JobServiceStub(server.channel)
    y = square_graph()
    before = scrape(server.metrics_port)

    sent: Counter[str] = Counter()  # request bytes, by method
    answered: Counter[str] = Counter()  # response bytes, by method

    def call(method: str, request: Any, stub: Any = stub) -> grpc.StatusCode:
        sent[method] += request.ByteSize()
        try:
            response = getattr(stub, method)(request, timeout=DEADLINE)
        except grpc.RpcError as e:
            return e.code()
        answered[method] += response.ByteSize()
        return grpc.StatusCode.OK

    graph = service_pb2.RegisterGraphRequest()
    graph.graph.CopyFrom(encode_graph(y.graph.freeze()))
    assert call("RegisterGraph", graph) == grpc.StatusCode.OK
    fingerprint = stub.RegisterGraph(graph, timeout=DEADLINE).fingerprint  # a second, OK too
    sent["RegisterGraph"] += graph.ByteSize()

    def run(fp: str, x: np.ndarray) -> service_pb2.RunRequest:
        request = service_pb2.RunRequest(fingerprint=fp, outputs=["y"], wrt=["x"])
        encode_tensor(x, request.feeds["x"])
        return request

    codes = [call("Run", run(fingerprint, np.arange(3.0) + k)) for k in range(3)]
    codes += [call("Run", run(fingerprint, np.ones(4))) for _ in range(2)]  # a wrong shape
    codes += [call("Run", run("0" * 64, np.ones(3))) for _ in range(2)]  # no such graph
    codes.append(call("GetJob", jobs_pb2.GetJobRequest(id="nosuchjob"), jobs))
    codes.append(call("ListOps", service_pb2.ListOpsRequest()))
    malformed = server.channel.unary_unary("/graphgrad.v1.GraphService/Run")
    with pytest.raises(grpc.RpcError) as e:
        malformed(b"\xff\xff\xff", timeout=DEADLINE)
    codes.append(e.value.code())
    sent["Run"] += 3
    assert Counter(codes) == {
        grpc.StatusCode.OK: 4,
        grpc.StatusCode.INVALID_ARGUMENT: 3,
        grpc.StatusCode.NOT_FOUND: 3,
    }

    after = scrape(server.metrics_port)
    assert delta(before, after, "graphgrad_requests_total") == {
        ("OK", "RegisterGraph"): 2,
        ("OK", "Run"): 3,
        ("INVALID_ARGUMENT", "Run"): 3,
        ("NOT_FOUND", "Run"): 2,
        ("NOT_FOUND", "GetJob"): 1,
        ("OK", "ListOps"): 1,
    }
    assert delta(before, after, "graphgrad_request_seconds_count") == {
        ("RegisterGraph",): 2,
        ("Run",): 8,
        ("GetJob",): 1,
        ("ListOps",): 1,
    }
    assert delta(before, after, "graphgrad_request_bytes_total") == {
        (m,): n for m, n in sent.items() if n
    }
    answered["RegisterGraph"] *= 2  # the second registration's answer is the first's
    assert delta(before, after, "graphgrad_response_bytes_total") == {
        (m,): n for m, n in answered.items() if n
    }
    assert delta(before, after, "graphgrad_rejections_total") == {}


def test_cache_gauges_show_what_server_info_reports(server):
    stub = service_pb2_grpc.GraphServiceStub(server.channel)
    with gg.connect(server.address) as client:
        client.run(square_graph(), {"x": np.ones(3)}, wrt=["x"], timeout=DEADLINE)
    info = stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=DEADLINE)
    expected = {
        "entries": {(name,): c.entries for name, c in info.caches.items()},
        "bytes": {(name,): c.bytes for name, c in info.caches.items()},
    }
    assert expected["entries"][("graphs",)] >= 1 and expected["bytes"][("plans",)] > 0

    def shown() -> bool:
        samples = scrape(server.metrics_port)
        return all(series(samples, f"graphgrad_cache_{k}") == v for k, v in expected.items())

    wait_for(shown, f"the caches of GetServerInfo, {expected}, in the gauges")
    queued = series(scrape(server.metrics_port), "graphgrad_queued_calls")
    assert queued == {("max_concurrent_runs",): 0, ("max_streams",): 0}


def test_a_line_per_request_with_its_fields(server):
    y = square_graph()
    with gg.connect(server.address) as client:
        fingerprint = client.register(y.graph.freeze())
        client.run(y, {"x": np.ones(3)}, wrt=["x"], timeout=DEADLINE)
        with pytest.raises(gg.RemoteError):
            client.run(y, {"x": np.ones(5)}, timeout=DEADLINE)
    runs = [r for r in json_lines(server.log(), "graphgrad.requests") if r["method"] == "Run"]
    ok, bad = runs[-2:]
    worker = server.worker()
    assert ok["level"] == "DEBUG" and ok["message"] == "request"
    assert ok["fingerprint"] == fingerprint and ok["executor"] == "local"
    assert ok["status"] == "OK" and ok["worker"] == worker
    assert ok["duration_ms"] > 0 and ok["request_bytes"] > 0 and ok["response_bytes"] > 0
    assert bad["status"] == "INVALID_ARGUMENT" and bad["response_bytes"] == 0
    assert bad["fingerprint"] == fingerprint and "expects shape (3,)" in bad["error"]


def test_job_state_changes_are_logged_and_counted(server):
    with gg.Graph():
        x = gg.input("x", shape=(4,))
        w = gg.input("w", shape=(4,))
        loss = gg.sum((w - x) ** 2, name="loss")
    before = scrape(server.metrics_port)
    with gg.connect(server.address) as client:
        job = client.train(loss, {"w": np.zeros((2, 4))}, {"x": np.ones((2, 4))}, steps=25)
        job.wait(progress=False, timeout=120)
    changes = [
        (r["old"], r["new"], r["worker"])
        for r in json_lines(server.log(), "graphgrad.jobs")
        if r.get("job") == job.id
    ]
    worker = server.worker()
    assert changes == [
        ("none", "pending", worker),
        ("pending", "running", worker),
        ("running", "done", worker),
    ]
    after = scrape(server.metrics_port)
    assert delta(before, after, "graphgrad_training_steps_total") == {(): 25}
    wait_for(
        lambda: series(scrape(server.metrics_port), "graphgrad_jobs").get(("done",)) == 1,
        "one done job in graphgrad_jobs",
    )


def test_the_text_format_is_key_value_pairs():
    record = logging.LogRecord("graphgrad.requests", logging.DEBUG, "", 0, "request", (), None)
    record.fields = {"method": "Run", "status": "OK", "error": 'a "b" c', "empty": ""}
    line = logs.TextFormatter().format(record)
    assert line.endswith(
        'DEBUG graphgrad.requests: request method=Run status=OK error="a \\"b\\" c" empty=""'
    )


WORKER = """
import os
import socket
from graphgrad.engine.lru import CacheStats
from graphgrad.server import metrics
assert metrics.start("127.0.0.1", None) is None  # the parent serves
metrics.observe_request("Run", "OK", 0.002, 5, 7)
metrics.set_caches({"graphs": CacheStats(3, 300, 10, 1000)})
print(os.getpid(), metrics.port())
"""

SUPERVISOR = """
import json, subprocess, sys, urllib.request
from graphgrad.engine.lru import CacheStats
from graphgrad.server import metrics
endpoint = metrics.start("127.0.0.1", 0)
pid, port = subprocess.run(
    [sys.executable, "-c", sys.argv[1]], check=True, capture_output=True, text=True
).stdout.split()
metrics.observe_request("Run", "OK", 0.001, 10, 20)
metrics.set_caches({"graphs": CacheStats(4, 400, 10, 1000)})
scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics").read()
both = scrape().decode()
metrics.process_exited(int(pid))
left = scrape().decode()
endpoint.close()
print(json.dumps({"port": endpoint.port, "worker_port": int(port), "both": both, "left": left}))
"""


def test_processes_sharing_the_directory_add_up_at_one_endpoint():
    """The `--workers` arrangement: a parent serves /metrics, a child it starts inherits the
    directory; counters add up, and a child's live gauges go when it has exited."""
    env = {k: v for k, v in os.environ.items() if "METRICS" not in k and "MULTIPROC" not in k}
    out = subprocess.run(
        [sys.executable, "-c", SUPERVISOR, WORKER],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["worker_port"] == result["port"]
    both, left = parse(result["both"]), parse(result["left"])
    for samples in (both, left):  # counters stay once a process has gone
        assert series(samples, "graphgrad_requests_total") == {("OK", "Run"): 2}
        assert series(samples, "graphgrad_request_bytes_total") == {("Run",): 15}
        assert series(samples, "graphgrad_response_bytes_total") == {("Run",): 27}
    assert series(both, "graphgrad_cache_entries") == {("graphs",): 7}
    assert series(left, "graphgrad_cache_entries") == {("graphs",): 4}
