"""The server's per-request work on a Run, in process: thread CPU, Python calls and allocations
per request through the real aio handler (server/app.py: unary -> in_batch / on_loop ->
GraphServicer.Run -> encode), with bench/throughput.py's small-network request bytes and a
minimal fake gRPC context. No sockets, no gRPC core: what is left is graphgrad's own path
(the part of a request's server CPU an echo server does not pay).

    python bench/run_path.py [--calls 20000] [--workload small|seednet] [--profile] [--allocs]

One request in flight at a time, so with batching on every request runs alone at once (as most
do under bench/throughput.py's load: batches of 1-5 where stacking loses).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import workloads

from graphgrad.engine import Dispatcher
from graphgrad.engine.stacking import StackKey
from graphgrad.server import app, batcher, logs
from graphgrad.server.admission import Admission
from graphgrad.server.batcher import BatchingConfig
from graphgrad.server.inflight import InFlight
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import GraphServicer
from graphgrad.v1 import service_pb2


class FakeContext:
    """What the handler uses of grpc.aio's ServicerContext; done callbacks run when the
    call is answered, as gRPC runs them."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def time_remaining(self) -> float:
        return 60.0  # bench/throughput.py's clients send a 60 s deadline

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    async def abort(self, code: Any, details: str, trailing: Any = None) -> None:
        raise RuntimeError(f"aborted: {code} {details}")

    def done(self) -> None:
        for cb in self.callbacks:
            cb(self)


def run_handler(
    batching: bool, workload: str
) -> tuple[Callable[[bytes, Any], Any], bytes, GraphServicer]:
    """Run's handler as `graphgrad serve --no-ray` builds it, and the request bytes."""
    w = next(w for w in workloads() if w.name == workload)
    runtime = Runtime.create(dispatcher=Dispatcher(ray_enabled=False))
    config = BatchingConfig(500, 64) if batching else None
    servicer = GraphServicer(runtime, batching=config)
    servicer.RegisterGraph(service_pb2.RegisterGraphRequest.FromString(w.register), None)  # type: ignore[arg-type]
    slots = 64 if batching else 2
    guards = app.Guards(
        runs=Admission("max_concurrent_runs", "runs", slots, 256),
        streams=Admission("max_streams", "streams", 1000),
        inflight=InFlight(),
    )
    pool = futures.ThreadPoolExecutor(4)
    generic = app.service_handler(app.SERVICE, service_pb2, servicer, guards, pool)
    handler = generic._method_handlers[f"/{app.SERVICE.full_name}/Run"]  # type: ignore[attr-defined]
    return handler.unary_unary, w.run, servicer


def as_under_load(servicer: GraphServicer) -> None:
    """Batching's costs as bench/throughput.py's load teaches them: stacking two or more of
    this key costs more than running each alone (bench/batching.py: 1.34 x at 2), so a
    request runs alone at once, and every 16th (server/batcher.py's _RETRY) waits a window."""
    assert servicer.batcher is not None
    costs = servicer.batcher._costs
    for key in {h.stack_key for h in servicer._heads.values() if isinstance(h.stack_key, StackKey)}:
        costs.best[key] = {2: 1.0}
        costs.alone.setdefault(key, 50e-6)


async def loop_calls(handler: Callable[[bytes, Any], Any], raw: bytes, n: int) -> float:
    """n calls one after another; thread CPU seconds per call."""
    started = time.thread_time()
    for _ in range(n):
        ctx = FakeContext()
        out = await handler(raw, ctx)
        ctx.done()
        assert isinstance(out, bytes)
    return (time.thread_time() - started) / n


def timed(loop: asyncio.AbstractEventLoop, handler: Any, raw: bytes, calls: int, what: str) -> None:
    per = [loop.run_until_complete(loop_calls(handler, raw, calls // 5)) for _ in range(5)]
    print(
        f"{what}: {statistics.median(per) * 1e6:6.1f} us thread CPU per request "
        f"(median of 5 x {calls // 5}; {', '.join(f'{p * 1e6:.1f}' for p in per)})"
    )


def measure(batching: bool, args: argparse.Namespace) -> None:
    handler, raw, servicer = run_handler(batching, args.workload)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(loop_calls(handler, raw, 200))  # warm: compiled, quick, measured
        if batching:
            as_under_load(servicer)
            retry, batcher._RETRY = batcher._RETRY, 1 << 30
            timed(loop, handler, raw, args.calls, "batching on, each alone at once")
            batcher._RETRY = retry
            what = f"batching on, every {retry}th waits"
        timed(loop, handler, raw, args.calls, what if batching else "batching off")
        if args.profile:
            n = 2000
            prof = cProfile.Profile()
            prof.enable()
            loop.run_until_complete(loop_calls(handler, raw, n))
            prof.disable()
            stats = pstats.Stats(prof)
            calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
            print(f"  {calls / n:.0f} Python calls per request (cProfile)")
            stats.sort_stats("tottime").print_stats(args.top)
        if args.allocs:
            n = 2000
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            loop.run_until_complete(loop_calls(handler, raw, n))
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            diff = after.compare_to(before, "lineno")
            print(f"  allocations kept: {sum(d.count_diff for d in diff) / n:.2f} blocks/request")
            peak = peak_bytes(loop, handler, raw, 500)
            print(f"  peak traced bytes over one request: {peak:.0f} (median of 500)")
    finally:
        loop.close()


def peak_bytes(loop: asyncio.AbstractEventLoop, handler: Any, raw: bytes, n: int) -> float:
    """The median over n requests of the most bytes live at once above where it began."""
    tracemalloc.start()
    peaks = []
    for _ in range(n):
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loop.run_until_complete(loop_calls(handler, raw, 1))
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    return statistics.median(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--workload", default="small", choices=("small", "seednet"))
    p.add_argument("--profile", action="store_true", help="cProfile calls per request")
    p.add_argument("--allocs", action="store_true", help="tracemalloc blocks per request")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--only", choices=("on", "off"))
    p.add_argument("--debug-log", action="store_true", help="the DEBUG request line on")
    args = p.parse_args()
    logs.configure("DEBUG" if args.debug_log else "INFO")
    for batching in (True, False):
        if args.only is None or args.only == ("on" if batching else "off"):
            measure(batching, args)


if __name__ == "__main__":
    main()
