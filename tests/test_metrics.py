"""The server is observable (issue 13, item 5), against a real `graphgrad serve
--metrics-port 0`: its Prometheus endpoint, scraped over HTTP, counts exactly the requests a
test sent, by method and status; its gauges show the caches and the jobs; it writes one
structured line per request and per job state change. With `--workers 2`, the one endpoint
serves what both workers did."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import grpc
import numpy as np
import pytest

import graphgrad as gg
from graphgrad.server import logs
from graphgrad.v1 import jobs_pb2, jobs_pb2_grpc, service_pb2, service_pb2_grpc
from graphgrad.wire import encode_graph, encode_tensor

from .scrape import delta, scrape, series, wait_for
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
    flags += ("--batch-window-us", "20000", "--max-batch", "4")  # concurrent Runs stack
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


def test_the_batch_sizes_are_those_the_responses_report(server):
    stub = service_pb2_grpc.GraphServiceStub(server.channel)
    y = square_graph()
    register = service_pb2.RegisterGraphRequest(graph=encode_graph(y.graph.freeze()))
    fingerprint = stub.RegisterGraph(register, timeout=DEADLINE).fingerprint
    # by fingerprint: a Run carrying its graph inline never joins a batch (docs/batching.md)
    request = service_pb2.RunRequest(fingerprint=fingerprint, outputs=["y"], wrt=["x"])
    encode_tensor(np.ones(3), request.feeds["x"])
    before = scrape(server.metrics_port)
    sizes: list[int] = []
    for _ in range(20):  # until Runs sent together are stacked: a bound, not a measurement
        calls = [stub.Run.future(request, timeout=DEADLINE) for _ in range(8)]
        sizes += [call.result().stats.batch_size for call in calls]
        if max(sizes) > 1:
            break
    stacked = [n for n in sizes if n > 1]  # a Run that ran alone is no batch
    assert stacked, "no two Runs sent together were stacked"
    after = scrape(server.metrics_port)
    assert delta(before, after, "graphgrad_batch_size_sum") == {(): len(stacked)}
    batches = sum(Fraction(1, n) for n in stacked)  # each of a batch's n members reports n
    assert delta(before, after, "graphgrad_batch_size_count") == {(): batches}


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
    submits = [
        r for r in json_lines(server.log(), "graphgrad.requests") if r["method"] == "SubmitJob"
    ]
    assert submits[-1]["job"] == job.id and submits[-1]["status"] == "OK"
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


def test_two_workers_are_counted_at_one_endpoint():
    """`--workers 2`: the supervisor serves the sum of what both workers answered; a worker
    that dies leaves its counts, and its gauges go."""
    y = square_graph()
    good, bad = service_pb2.RunRequest(outputs=["y"]), service_pb2.RunRequest(outputs=["y"])
    for request, x in ((good, np.ones(3)), (bad, np.ones(2))):
        request.graph.CopyFrom(encode_graph(y.graph.freeze()))  # registered by each worker
        encode_tensor(x, request.feeds["x"])
    sent: Counter[tuple[str, str]] = Counter()
    seen: set[str] = set()
    with running_server("--workers", "2", "--metrics-port", "0") as server:
        for _ in range(200):  # fresh connections until both workers have answered
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
            with grpc.insecure_channel(server.address, options=options) as channel:
                stub = service_pb2_grpc.GraphServiceStub(channel)
                info = stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=DEADLINE)
                sent["OK", "GetServerInfo"] += 1
                if info.worker not in seen:
                    seen.add(info.worker)
                    stub.Run(good, timeout=DEADLINE)
                    sent["OK", "Run"] += 1
                    with pytest.raises(grpc.RpcError) as e:
                        stub.Run(bad, timeout=DEADLINE)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    sent["INVALID_ARGUMENT", "Run"] += 1
            if len(seen) == 2:
                break
        assert len(seen) == 2, "one worker answered every connection"
        assert f":{info.metrics_port}/metrics" in server.banner
        samples = scrape(info.metrics_port)
        assert series(samples, "graphgrad_requests_total") == dict(sent)
        wait_for(  # each worker holds the graph in its own cache: the gauges add up
            lambda: (
                series(scrape(info.metrics_port), "graphgrad_cache_entries").get(("graphs",)) == 2
            ),
            "the two workers' registered graphs",
        )
        host, pid = sorted(seen)[0].rsplit(":", 1)
        assert host == socket.gethostname()
        os.kill(int(pid), signal.SIGKILL)
        wait_for(  # its replacement has registered nothing
            lambda: (
                series(scrape(info.metrics_port), "graphgrad_cache_entries").get(("graphs",)) == 1
            ),
            "the killed worker's graph gone from the gauge",
        )
        assert series(scrape(info.metrics_port), "graphgrad_requests_total") == dict(sent)


def test_a_metrics_port_in_use_stops_the_start_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = [sys.executable, "-m", "graphgrad.server", "--no-ray", "--port", "0"]
        done = subprocess.run(
            [*serve, "--metrics-port", str(port), "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and done.stdout == ""
    assert f"graphgrad serve: cannot serve metrics on port {port}:" in done.stderr
