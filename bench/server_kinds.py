"""The same GraphService servicer behind a sync `grpc.server` and behind grpc.aio.

Which server to keep: a remote gradient of the seed's network (bench/remote_latency.py's),
one client's median latency and 8 client threads' throughput, through
- sync:      grpc.server(ThreadPoolExecutor(16)): each call parsed, admitted (the same
             max_concurrent_runs slot), run and serialized in a pool thread;
- aio+pool:  graphgrad's server (server/app.py) with every call sent to its thread pool;
- aio:       graphgrad's server as it runs: quick calls answered on the event loop.
Beside each, a bare echo of the same bytes and the hand-written numpy floor on the same kind
of server (sync: in a pool thread; aio: on the loop). Every server is its own process.

    python bench/server_kinds.py [--calls 1000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, subprocess_server, us
from remote_latency import network, numpy_over_grpc, throughput

import graphgrad as gg
from graphgrad import wire
from graphgrad.server.app import Server, ServerConfig
from graphgrad.server.inflight import InFlight
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import GraphServicer
from graphgrad.v1 import service_pb2

KINDS = ("sync", "aio+pool", "aio")


def bare_handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
            "Numpy": grpc.unary_unary_rpc_method_handler(numpy_over_grpc),
        },
    )


class _Context:
    """What InFlight needs of a sync server's context."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def time_remaining(self) -> float | None:
        left = self.context.time_remaining()
        return None if left is None or left > 1e9 else left  # no deadline: a huge number

    def add_done_callback(self, callback: Any) -> None:
        self.context.add_callback(lambda: callback(None))


def serve_sync() -> None:
    server = Server(ServerConfig(), Runtime.create())  # its servicer, limits and admission
    servicer, inflight, runs = GraphServicer(server.runtime), InFlight(), server.guards.runs

    def run(raw: bytes, context: grpc.ServicerContext) -> bytes:
        call = inflight.start(_Context(context))
        with runs.slot(call.time_remaining(), call):
            request = service_pb2.RunRequest.FromString(raw)
            return servicer.Run(request, call)  # (the answer's bytes)

    def register(raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = service_pb2.RegisterGraphRequest.FromString(raw)
        return servicer.RegisterGraph(
            request, inflight.start(_Context(context))
        ).SerializeToString()

    graphs = grpc.method_handlers_generic_handler(
        "graphgrad.v1.GraphService",
        {
            "Run": grpc.unary_unary_rpc_method_handler(run),
            "RegisterGraph": grpc.unary_unary_rpc_method_handler(register),
        },
    )
    grpc_server = grpc.server(futures.ThreadPoolExecutor(16))
    grpc_server.add_generic_rpc_handlers((graphs, bare_handlers()))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    print(f"serving on grpc://127.0.0.1:{port}", flush=True)
    grpc_server.wait_for_termination()


def serve_aio(quick: bool) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="graphgrad-bench-"):
            server = Server(ServerConfig(port=0), Runtime.create())
            if not quick:
                GraphServicer.run_is_quick = lambda self, request: False  # type: ignore[method-assign]
            server.grpc = server._build()

            async def echo(raw: bytes, context: Any) -> bytes:
                return raw

            async def floor(raw: bytes, context: Any) -> bytes:
                return numpy_over_grpc(raw, context)

            server.grpc.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "bench.Echo",
                        {
                            "Echo": grpc.unary_unary_rpc_method_handler(echo),
                            "Numpy": grpc.unary_unary_rpc_method_handler(floor),
                        },
                    ),
                )
            )
            await server.grpc.start()
            print(f"serving on grpc://127.0.0.1:{server.port}", flush=True)
            await server.grpc.wait_for_termination()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0, help="of 8-thread load, per kind")
    parser.add_argument("--rounds", type=int, default=3, help="the load's seconds cut in rounds")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "sync":
        serve_sync()
        return
    if args.serve is not None:
        serve_aio(quick=args.serve == "aio")
        return

    L, feeds = network()
    wrt = ["W", "b", "V", "a"]
    graph = L.graph.freeze()
    msg = service_pb2.RunRequest(fingerprint=graph.fingerprint, outputs=[L.name], wrt=wrt)
    wire.encode_tensors(feeds, msg.feeds)
    payload = msg.SerializeToString()
    print(
        f"request bytes {len(payload)}; p50: medians of {args.calls} calls; 8 threads: median "
        f"of {args.rounds} rounds, {args.seconds:.0f} s per kind in all"
    )
    with ExitStack() as stack:
        addresses = {
            kind: stack.enter_context(
                subprocess_server([sys.executable, __file__, "--serve", kind])
            )
            for kind in KINDS
        }
        fns: dict[str, Callable[[], object]] = {}
        for kind, address in addresses.items():
            client = stack.enter_context(gg.connect(address))
            channel = stack.enter_context(grpc.insecure_channel(address))
            fns[f"{kind} echo"] = functools.partial(
                channel.unary_unary("/bench.Echo/Echo"), payload
            )
            fns[f"{kind} floor"] = functools.partial(
                channel.unary_unary("/bench.Echo/Numpy"), payload
            )
            fns[f"{kind} graphgrad"] = functools.partial(client.prepare(L, wrt=wrt), feeds)
        # Every server is up at once and sampled in alternation: drift on a shared machine
        # touches them alike.
        t = interleaved_medians(fns, args.calls)
        rates = {k: [] for k in fns if not k.endswith("floor")}
        for _ in range(args.rounds):
            for k in rates:
                rates[k].append(throughput(fns[k], 8, args.seconds / args.rounds))
        rps = {k: statistics.median(v) for k, v in rates.items()}
    for kind in KINDS:
        g, f = t[f"{kind} graphgrad"], t[f"{kind} floor"]
        print(
            f"{kind:9s} echo {us(t[f'{kind} echo'])}  floor {us(f)}  graphgrad {us(g)} "
            f"({g / f:.2f} x floor)   8 threads: echo {rps[f'{kind} echo']:6.0f}/s  "
            f"graphgrad {rps[f'{kind} graphgrad']:6.0f}/s"
        )
    print(
        f"aio / sync: graphgrad p50 {t['aio graphgrad'] / t['sync graphgrad']:.2f}, "
        f"8-thread throughput {rps['aio graphgrad'] / rps['sync graphgrad']:.2f}; bare floor p50 "
        f"{t['aio floor'] / t['sync floor']:.2f}, bare echo p50 "
        f"{t['aio echo'] / t['sync echo']:.2f}"
    )


if __name__ == "__main__":
    main()
