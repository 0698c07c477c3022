"""Latency of a remote gradient of the lecture's two-layer network, against references.

x in R^64, h in R^128, y in R^10, float32; gradient of L = 1/2 |y - t|^2 w.r.t. W, b, V, a.
References, in the same run: a raw gRPC unary echo on loopback (its own process, request of
the same number of bytes, echoed back) and a hand-written numpy forward+backward. The floor's
client makes the same kind of call as graphgrad's: it encodes the feeds into a RunRequest on
every call, sends it, and decodes the gradients of the answer.
Target: remote median <= 1.25 x (echo + numpy), and <= 1.15 x the floor: the numpy behind a
bare gRPC server, sync or aio, whichever is faster.

    python bench/remote_latency.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graphgrad_server, interleaved_medians, subprocess_server, us

import graphgrad as gg
from graphgrad import wire
from graphgrad.v1 import service_pb2

ECHO_METHOD = "/bench.Echo/Echo"
NUMPY_METHOD = "/bench.Echo/Numpy"


def numpy_over_grpc(raw: bytes, context: object) -> bytes:
    """The least any Python gRPC service must do: parse the RunRequest, decode the tensors
    (checking only that bytes match shapes), run the hand-written numpy, encode the
    RunResponse. No graph, no feed checks: a floor, not a competitor."""
    req = service_pb2.RunRequest.FromString(raw)
    loss, *grads = numpy_reference({k: wire.decode_tensor(t) for k, t in req.feeds.items()})
    out = service_pb2.RunResponse(fingerprint=req.fingerprint)
    wire.encode_tensors({"L": np.float32(loss)}, out.values)
    wire.encode_tensors(dict(zip("WbVa", grads, strict=True)), out.grads)
    return out.SerializeToString()


def serve_echo(kind: str) -> None:
    """A raw gRPC unary echo (bytes in, the same bytes out, no protobuf parsing), and the
    hand-written numpy behind raw gRPC: on a sync server (handlers in a thread pool) or on
    grpc.aio (handlers on the event loop)."""
    if kind == "aio":
        asyncio.run(serve_echo_aio())
        return
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
            "Numpy": grpc.unary_unary_rpc_method_handler(numpy_over_grpc),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"serving on grpc://127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


async def serve_echo_aio() -> None:
    async def echo(raw: bytes, context: object) -> bytes:
        return raw

    async def floor(raw: bytes, context: object) -> bytes:
        return numpy_over_grpc(raw, context)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Numpy": grpc.unary_unary_rpc_method_handler(floor),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on grpc://127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def network(dtype: str = "float32"):
    with gg.Graph():
        x = gg.input("x", shape=(64,), dtype=dtype)
        t = gg.input("t", shape=(10,), dtype=dtype)
        W = gg.input("W", shape=(128, 64), dtype=dtype)
        b = gg.input("b", shape=(128,), dtype=dtype)
        V = gg.input("V", shape=(10, 128), dtype=dtype)
        a = gg.input("a", shape=(10,), dtype=dtype)
        h = gg.tanh(W @ x + b)
        y = V @ h + a
        L = 0.5 * gg.sum((y - t) ** 2)
    rng = np.random.default_rng(0)
    shapes = {"x": (64,), "t": (10,), "W": (128, 64), "b": (128,), "V": (10, 128), "a": (10,)}
    feeds = {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in shapes.items()}
    return L, feeds


def numpy_reference(f: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    y = f["V"] @ h + f["a"]
    r = y - f["t"]
    loss = 0.5 * np.sum(r * r)
    dz = (f["V"].T @ r) * (1 - h * h)
    return loss, np.outer(dz, f["x"]), dz, np.outer(r, h), r


def throughput(fn, threads: int, seconds: float = 3.0) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def work(k: int) -> None:
        while time.perf_counter() < stop:
            fn()
            counts[k] += 1

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--serve-echo", choices=("sync", "aio"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return

    L, feeds = network()
    wrt = ["W", "b", "V", "a"]
    local = gg.connect().run(L, feeds, wrt=wrt)
    ref = numpy_reference(feeds)
    np.testing.assert_allclose(local.grads["W"], ref[1], rtol=1e-5, atol=1e-6)

    echo_cmd = [sys.executable, __file__, "--serve-echo"]
    with (
        graphgrad_server() as address,
        subprocess_server([*echo_cmd, "sync"]) as sync_address,
        subprocess_server([*echo_cmd, "aio"]) as aio_address,
    ):
        client = gg.connect(address)
        res = client.run(L, feeds, wrt=wrt)
        assert all(res.grads[k].tobytes() == local.grads[k].tobytes() for k in wrt)
        prepared = client.prepare(L, wrt=wrt)
        assert all(prepared(feeds).grads[k].tobytes() == local.grads[k].tobytes() for k in wrt)

        # The echo carries a request of exactly the size of the graphgrad request.
        fingerprint = L.graph.freeze().fingerprint
        msg = service_pb2.RunRequest(fingerprint=fingerprint, outputs=[L.name], wrt=wrt)
        wire.encode_tensors(feeds, msg.feeds)
        payload = msg.SerializeToString()
        channels = {
            k: grpc.insecure_channel(a) for k, a in (("sync", sync_address), ("aio", aio_address))
        }
        echoes = {k: c.unary_unary(ECHO_METHOD) for k, c in channels.items()}
        floors = {
            k: c.unary_unary(NUMPY_METHOD, response_deserializer=service_pb2.RunResponse.FromString)
            for k, c in channels.items()
        }
        for numpy_grpc in floors.values():
            floor = numpy_grpc(payload)
            np.testing.assert_allclose(wire.decode_tensor(floor.grads["W"]), ref[1], rtol=1e-6)

        def numpy_remote(kind: str) -> Callable[[], object]:
            def call() -> object:  # what any client of it must do: encode, call, decode
                msg = service_pb2.RunRequest(fingerprint=fingerprint, outputs=[L.name], wrt=wrt)
                wire.encode_tensors(feeds, msg.feeds)
                r = floors[kind](msg.SerializeToString())
                return {k: wire.decode_tensor(v) for k, v in r.grads.items()}

            return call

        def echo_call(kind: str) -> Callable[[], object]:
            return lambda: echoes[kind](payload)

        def remote() -> object:
            return client.run(L, feeds, wrt=wrt)

        local_client = gg.connect()
        t = interleaved_medians(
            {
                "numpy": lambda: numpy_reference(feeds),
                "local": lambda: local_client.run(L, feeds, wrt=wrt),
                "echo sync": echo_call("sync"),
                "echo aio": echo_call("aio"),
                "floor sync": numpy_remote("sync"),
                "floor aio": numpy_remote("aio"),
                "remote": remote,
                "prepared": lambda: prepared(feeds),
            },
            args.calls,
        )
        fast = min(("sync", "aio"), key=lambda k: t[f"floor {k}"])
        t_numpy, t_local, t_remote = t["numpy"], t["local"], t["remote"]
        t_echo, t_floor = t[f"echo {fast}"], t[f"floor {fast}"]
        print(f"request bytes          {len(payload)}")
        print(f"numpy forward+backward {us(t_numpy)}")
        print(f"in-process graphgrad   {us(t_local)}")
        print(f"raw gRPC echo          {us(t['echo sync'])} sync, {us(t['echo aio'])} aio")
        print(f"remote gradient        {us(t_remote)}   (median of {args.calls})")
        print(f"  prepared call        {us(t['prepared'])}   (client.prepare, then call)")
        ratio = t_remote / (t_echo + t_numpy)
        print(
            f"ratio remote / (echo + numpy) = {ratio:.2f}   target <= 1.25   "
            f"{'OK' if ratio <= 1.25 else 'MISSED'}"
        )
        print(
            f"numpy behind raw gRPC  {us(t['floor sync'])} sync, {us(t['floor aio'])} aio   "
            "(parse, numpy, encode: a floor)"
        )
        to_floor = t_remote / t_floor
        print(
            f"  floor ({fast}, the faster) / (echo + numpy) = {t_floor / (t_echo + t_numpy):.2f}; "
            f"remote / floor = {to_floor:.2f}   target <= 1.15   "
            f"{'OK' if to_floor <= 1.15 else 'MISSED'}"
        )
        for threads in (1, 8):
            rps = throughput(remote, threads)
            eps = throughput(echo_call(fast), threads)
            print(
                f"throughput {threads} client thread(s): {rps:8.0f} gradients/s   "
                f"({fast} echo {eps:8.0f} calls/s)"
            )
        client.close()
        for channel in channels.values():
            channel.close()


if __name__ == "__main__":
    main()
