"""Soak: mixed valid and hostile traffic from several client processes against one server.

Starts its own `graphgrad serve` (temporary data dir, loopback, no Ray unless --ray), then
--clients processes send, for --seconds or until --requests in all, a mix of valid Runs of
the README's two-layer network, Explain, RegisterGraph, ListOps, GetServerInfo, small
training jobs (submit, watch briefly, results, cancel, delete) and fuzzed requests (bench/_fuzz.py).
The server's RSS is sampled every 0.5 s. Prints requests served, statuses by code, latency
of the valid Runs, peak RSS, RSS after warm-up (at 25 % of the time) and at the end, and
"INTERNAL/UNKNOWN: N"; exits 1 when N > 0, when a status was lost in transport (an error
too long for gRPC metadata) or when the server died.

    python bench/soak.py [--seconds 60] [--clients 4] [--requests 40000] [--ray]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fuzz
from _common import stop

from graphgrad.v1 import service_pb2

BAD = ("INTERNAL", "UNKNOWN")
WARMUP = 0.25  # RSS after warm-up is read here: by then the bounded caches have filled
TIMELINE = (0.1, 0.25, 0.5, 0.75, 0.95)
READY_TIMEOUT = 120.0  # seconds for every client to spawn, import and connect
# The caches are bounded small (the defaults allow 1 GiB of graphs and 256 MiB of plans) so
# that they fill during warm-up: RSS growth after it is then what no cache bounds.
SERVER_LIMITS = (
    *("--max-tensor-bytes", str(16 << 20), "--max-request-bytes", str(256 << 20)),
    *("--graph-cache-bytes", str(32 << 20), "--plan-cache-bytes", str(32 << 20)),
)
# Share of each kind of traffic; "fuzz" is the hostile part, the rest is valid.
MIX = {"run": 30, "explain": 4, "register": 4, "listops": 3, "info": 3, "job": 4, "fuzz": 52}


@dataclass
class ClientResult:
    codes: Counter[str] = field(default_factory=Counter)  # "valid OK", "hostile NOT_FOUND", ...
    run_seconds: list[float] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # reproducers of the failures (a few)
    lost: int = 0  # statuses lost in transport (see _fuzz.failure)
    refused: Counter[str] = field(default_factory=Counter)  # valid requests not OK, by RPC


def client(
    k: int, address: str, seed: int, seconds: float, requests: int, ready: Any, out: mp.Queue
) -> None:
    """One client process: a channel, a generator, traffic until the time or count runs out.
    The clock starts when every client is ready: spawning and importing take seconds on a
    loaded machine, and a short soak would otherwise end before any client sent a request."""
    result = ClientResult()
    options = [("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(address, options=options) as channel:
        ops_call = _fuzz.Generator(0).valid("ListOps")
        ops = service_pb2.ListOpsResponse.FromString(_fuzz.send(channel, ops_call).response or b"")
        gen = _fuzz.Generator(seed + k, ops)
        run = gen.valid("Run")
        kinds, weights = list(MIX), list(MIX.values())
        sent = 0
        ready.wait(READY_TIMEOUT)
        stop_at = time.monotonic() + seconds

        def call(c: _fuzz.Call, hostile: bool) -> _fuzz.Outcome:
            nonlocal sent
            outcome = _fuzz.send(channel, c)
            sent += 1
            result.codes[f"{'hostile' if hostile else 'valid'} {outcome.code.name}"] += 1
            if not hostile and outcome.code != grpc.StatusCode.OK:
                result.refused[f"{c.method.name} {outcome.code.name}"] += 1
            why = _fuzz.failure(outcome)
            result.lost += why == "LOST"
            if why and len(result.bad) < 20:
                result.bad.append(f"{why}: {outcome.details[:300]}\n{c.describe()}")
            gen.observe(c, outcome)
            return outcome

        while sent < requests and time.monotonic() < stop_at:
            kind = gen.rng.choices(kinds, weights)[0]
            if kind == "run":
                t = time.perf_counter()
                if call(run, False).code == grpc.StatusCode.OK:
                    result.run_seconds.append(time.perf_counter() - t)
            elif kind == "job":
                submitted = call(gen.valid("SubmitJob"), False)
                if submitted.code == grpc.StatusCode.OK:
                    job = gen.known.followups.pop()  # followed here, not by the generator
                    for name in ("WatchJob", "GetJobResults", "CancelJob", "DeleteJob"):
                        method = gen.by_name.get(name)
                        if method is None:  # a server without DeleteJob
                            continue
                        msg = method.request(id=job)
                        call(_fuzz.Call(method, msg.SerializeToString(), "valid", msg), False)
            elif kind == "fuzz":
                call(gen.next(), True)
            else:
                name = {"explain": "Explain", "register": "RegisterGraph", "listops": "ListOps"}
                call(gen.valid(name.get(kind, "GetServerInfo")), False)
        for c in gen.cleanup_calls():
            _fuzz.send(channel, c)
    out.put(result)


def start_server(data_dir: str, log: Path, ray: bool) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "graphgrad.server", "--host", "127.0.0.1", "--port", "0"]
    cmd += [*SERVER_LIMITS, "--data-dir", data_dir, *([] if ray else ["--no-ray"])]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    match = re.search(r"serving on grpc://(\S+)", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
    return proc, match.group(1)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=40_000, help="at most, all clients together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", action="store_true", help="let the server start an embedded Ray")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="graphgrad-soak-") as scratch:
        log = Path(scratch) / "server.log"
        proc, address = start_server(str(Path(scratch) / "data"), log, args.ray)
        try:
            return soak(args, proc, address, log)
        finally:
            stop(proc)


def soak(args: argparse.Namespace, proc: subprocess.Popen[str], address: str, log: Path) -> int:
    ctx = mp.get_context("spawn")  # no fork under gRPC's threads
    out: mp.Queue = ctx.Queue()
    ready = ctx.Barrier(args.clients + 1)
    per_client = args.requests // args.clients
    procs = [
        ctx.Process(
            target=client, args=(k, address, args.seed, args.seconds, per_client, ready, out)
        )
        for k in range(args.clients)
    ]
    for c in procs:
        c.start()
    ready.wait(READY_TIMEOUT)
    start = time.monotonic()
    samples: list[tuple[float, int]] = []  # (seconds since start, RSS)
    results: list[ClientResult] = []
    while len(results) < len(procs):
        samples.append((time.monotonic() - start, _fuzz.rss_bytes(proc.pid)))
        while not out.empty():
            results.append(out.get())
        if proc.poll() is not None or not any(c.is_alive() for c in procs):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    # A last sample at `elapsed`, so every fraction of the run has one at or after it.
    samples.append((elapsed, _fuzz.rss_bytes(proc.pid)))
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:  # a client died without its report
            break
    for c in procs:
        c.join(10)
        if c.is_alive():
            c.kill()
    time.sleep(1.0)  # cancelled jobs wind down
    end_rss = _fuzz.rss_bytes(proc.pid)

    codes = sum((r.codes for r in results), Counter())
    runs = sorted(s for r in results for s in r.run_seconds)
    served = sum(codes.values())
    bad = sum(n for key, n in codes.items() if key.split()[1] in BAD)
    lost = sum(r.lost for r in results)
    warm = next(rss for t, rss in samples if t >= WARMUP * elapsed)
    peak = max(rss for _, rss in samples)
    print(f"soak: {args.clients} clients, {elapsed:.1f} s, {'Ray' if args.ray else 'no Ray'}")
    print(f"requests served: {served} ({served / elapsed:.0f}/s)")
    for key, n in sorted(codes.items()):
        print(f"  {key:32s} {n:8d}")
    if runs:
        p50, p99 = statistics.median(runs), runs[int(0.99 * (len(runs) - 1))]
        print(f"valid Runs: {len(runs)}, p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    refused = sum((r.refused for r in results), Counter())
    if refused:
        print("valid requests not OK: " + ", ".join(f"{k} {n}" for k, n in sorted(refused.items())))
    timeline = [mib(next(rss for t, rss in samples if t >= f * elapsed)) for f in TIMELINE]
    print(f"RSS at {', '.join(f'{f:.0%}' for f in TIMELINE)} of the time: {', '.join(timeline)}")
    print(f"peak RSS: {mib(peak)}")
    print(f"RSS after warm-up ({WARMUP:.0%} of the time): {mib(warm)}")
    print(f"RSS at the end: {mib(end_rss)} ({end_rss / warm:.2f} x after warm-up)")
    for text in [b for r in results for b in r.bad][:5]:
        print(f"--- {text}")
    alive = proc.poll() is None
    if alive:
        with grpc.insecure_channel(address) as channel:
            info = channel.unary_unary(
                "/graphgrad.v1.GraphService/GetServerInfo",
                response_deserializer=service_pb2.GetServerInfoResponse.FromString,
            )(service_pb2.GetServerInfoRequest().SerializeToString(), timeout=10)
        for name, c in sorted(info.caches.items()):
            print(
                f"cache {name}: {c.entries} entries (max {c.max_entries}), "
                f"{mib(c.bytes)} (max {mib(c.max_bytes)})"
            )
    if not alive:
        print(f"the server died (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    print(f"statuses lost in transport: {lost}")
    print(f"INTERNAL/UNKNOWN: {bad}")
    return 0 if bad == lost == 0 and alive and len(results) == len(procs) else 1


if __name__ == "__main__":
    sys.exit(main())
