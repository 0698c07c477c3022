"""A structured fuzz of the whole API against one real `graphgrad serve`.

Requests come from bench/_fuzz.py (any RPC from the service descriptors, every field,
boundary numbers and shapes, random bytes, mutated valid graphs and jobs). No answer may be
UNKNOWN or INTERNAL or lost in transport (e.g. an error too long for gRPC metadata), the
server must stay up and answer, its RSS must stay bounded, and SIGTERM must still stop it.
GRAPHGRAD_FUZZ_N sets the number of requests (default 2,000), GRAPHGRAD_FUZZ_SEED the seed;
GRAPHGRAD_FUZZ_REPORT names a file to get one reproducer for every distinct failure.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from graphgrad.v1 import service_pb2

from .server_proc import ServerProcess, running_server


def _load_fuzz() -> ModuleType:
    """bench/_fuzz.py is shared with bench/soak.py; bench/ is not a package."""
    path = Path(__file__).resolve().parent.parent / "bench" / "_fuzz.py"
    spec = importlib.util.spec_from_file_location("graphgrad_bench_fuzz", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
N = int(os.environ.get("GRAPHGRAD_FUZZ_N", "2000"))
SEED = int(os.environ.get("GRAPHGRAD_FUZZ_SEED", "20261127"))
CLIENTS = 4  # concurrent callers, each with its own generator (seed + k)
RSS_BOUND = 3 << 29  # 1.5 GiB
RSS_KILL = 2 * RSS_BOUND  # past this the watchdog kills the server: the machine is shared
SHOWN = 6  # reproducers printed in full
SHUTDOWN_WAIT = 60  # seconds; the server's grace period is 10
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]
SERVER_ARGS = (
    "--max-tensor-bytes",
    str(16 << 20),
    "--max-request-bytes",
    str(256 << 20),
    "--max-nodes",
    "10000",
)


class RssWatch(threading.Thread):
    """Samples the server's RSS; kills it past RSS_KILL so a blow-up fails the test, not the
    machine."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.killed = pid, 0, False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            rss = fuzz.rss_bytes(self.pid)
            self.peak = max(self.peak, rss)
            if rss > RSS_KILL:
                self.killed = True
                os.kill(self.pid, 9)
                return


def _worker(channel: grpc.Channel, ops: object, k: int, n: int) -> tuple[Counter, list]:
    gen = fuzz.Generator(SEED + k, ops)
    codes: Counter = Counter()  # statuses, and seconds spent per RPC
    bad = []
    for _ in range(n):
        call = gen.next()
        start = time.perf_counter()
        outcome = fuzz.send(channel, call)
        codes[outcome.code.name] += 1
        codes[f"seconds in {call.method.name}"] += time.perf_counter() - start
        if fuzz.failure(outcome):
            bad.append((call, outcome))
        gen.observe(call, outcome)
    for call in gen.cleanup_calls():
        fuzz.send(channel, call)
    return codes, bad


def _report(bad: list) -> str:
    """Distinct failures (by RPC, status and the start of the message), one reproducer each."""
    first: dict[tuple[str, str, str], tuple] = {}
    for call, outcome in bad:
        first.setdefault(
            (call.method.name, outcome.code.name, outcome.details[:60]), (call, outcome)
        )
    report = os.environ.get("GRAPHGRAD_FUZZ_REPORT")
    if report:
        Path(report).write_text(
            "\n\n".join(
                f"=== {o.code.name}: {o.details}\n{c.describe(exact=True)}"
                for c, o in first.values()
            )
        )
    lines = [f"{len(bad)} UNKNOWN/INTERNAL or lost answers, {len(first)} distinct:"]
    lines += [f"  {m} {code}: {d}" for m, code, d in first]
    for (_, code, _), (call, outcome) in list(first.items())[:SHOWN]:
        lines.append(f"--- {code}: {outcome.details[:300]}\n{call.describe()}")
    return "\n".join(lines)


def test_fuzz_whole_api():
    with running_server(*SERVER_ARGS, env={"PYTHONFAULTHANDLER": "1"}) as server:
        watch = RssWatch(server.proc.pid)
        watch.start()
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            list_ops = channel.unary_unary(
                "/graphgrad.v1.GraphService/ListOps",
                response_deserializer=service_pb2.ListOpsResponse.FromString,
            )
            ops = list_ops(b"", timeout=30)
            with futures.ThreadPoolExecutor(CLIENTS) as pool:
                parts = [
                    pool.submit(_worker, channel, ops, k, N // CLIENTS) for k in range(CLIENTS)
                ]
                results = [p.result() for p in parts]
            codes = sum((c for c, _ in results), Counter())
            bad = [b for _, part in results for b in part]
            statuses = {k: n for k, n in codes.most_common() if not k.startswith("seconds")}
            seconds = {k[11:]: round(n, 1) for k, n in codes.most_common() if k.startswith("sec")}
            print(f"fuzz: {sum(statuses.values())} requests, statuses {statuses}")
            print(f"fuzz: client seconds by RPC {seconds}")
            print(f"fuzz: peak server RSS {watch.peak / 2**20:.0f} MiB")

            assert not watch.killed, f"server RSS passed {RSS_KILL} bytes; killed"
            assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
            info = channel.unary_unary("/graphgrad.v1.GraphService/GetServerInfo")
            info(b"", timeout=30)  # it still answers
            if bad:
                pytest.fail(_report(bad), pytrace=False)
            assert watch.peak < RSS_BOUND, f"server RSS peaked at {watch.peak} bytes"
        watch.stop.set()
        _stops_on_sigterm(server)


def _stops_on_sigterm(server: ServerProcess) -> None:
    """After all that, SIGTERM still shuts the server down (within its grace period and a
    generous margin; a hang is killed and reported)."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(SHUTDOWN_WAIT)
        return
    except subprocess.TimeoutExpired:
        server.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    pytest.fail(
        f"the server did not exit within {SHUTDOWN_WAIT} s of SIGTERM:\n{server.log()[-6000:]}",
        pytrace=False,
    )
