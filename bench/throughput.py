"""Requests/s and latency of remote gradients under load, beside a bare echo server.

Load comes from separate client processes (spawned, each with its own channels and threads, so
no client GIL bounds it) that keep 1, 8 or 64 requests in flight in total. Two workloads, both
float64, gradient of L = 1/2 |V tanh(W x + b) + a - t|^2 w.r.t. W, b, V, a: the seed's network
(x in R^64, h in R^128, y in R^10: a 38 KB request) and a small one (x in R^8, h in R^16,
y in R^4: under 2 KB of feeds). Beside each graphgrad server, a bare echo server with the same
worker count (N processes on one port with SO_REUSEPORT; one process for 1 worker) and the same
gRPC options answers the same request bytes with those bytes. Rows for `--workers` 1 and 2 and
batching off and on (`--batch-window-us`, `--max-batch`, `--batch-idle-us`: by default a 5 ms
window, closed after 1 ms with no request joining, as a throughput server runs it); a row
whose flags this `graphgrad serve` lacks says "not available". The servers run with --no-ray
(these graphs run inline) and a run queue that holds every request in flight, so none is
refused.
Targets at 64 in flight, batching on, against the echo with the same workers: small network
>= 0.75 x the echo's requests/s; the seed's network >= 0.6 x.

    python bench/throughput.py [--seconds 1.5] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop

ECHO_METHOD = "/bench.Echo/Echo"
RUN_METHOD = "/graphgrad.v1.GraphService/Run"
REGISTER_METHOD = "/graphgrad.v1.GraphService/RegisterGraph"
INFO_METHOD = "/graphgrad.v1.GraphService/GetServerInfo"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # graphgrad serve's default --max-message-bytes
WRT = ("W", "b", "V", "a")
TARGETS = {"small": 0.75, "seednet": 0.6}  # graphgrad with batching / echo, 64 in flight


# --- workloads --------------------------------------------------------------------------------


@dataclass
class Workload:
    """One graph and its feeds, as the bytes a client sends: RegisterGraph once per
    connection (each worker process holds its own graphs), then Run by fingerprint."""

    name: str
    loss: Any  # gg.Tensor
    feeds: dict[str, np.ndarray]
    register: bytes
    run: bytes

    @property
    def feed_bytes(self) -> int:
        return sum(v.nbytes for v in self.feeds.values())


def workload(name: str, n_in: int, n_hidden: int, n_out: int, dtype: str) -> Workload:
    import graphgrad as gg
    from graphgrad import wire
    from graphgrad.v1 import service_pb2

    shapes = {
        "x": (n_in,),
        "t": (n_out,),
        "W": (n_hidden, n_in),
        "b": (n_hidden,),
        "V": (n_out, n_hidden),
        "a": (n_out,),
    }
    with gg.Graph() as g:
        x, t, W, b, V, a = (gg.input(k, shape=s, dtype=dtype) for k, s in shapes.items())
        h = gg.tanh(W @ x + b, name="h")
        loss = 0.5 * gg.sum((V @ h + a - t) ** 2)
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal(s) * 0.3).astype(dtype) for k, s in shapes.items()}
    frozen = g.freeze()
    register = service_pb2.RegisterGraphRequest(graph=wire.encode_graph(frozen))
    run = service_pb2.RunRequest(fingerprint=frozen.fingerprint, outputs=[loss.name], wrt=WRT)
    wire.encode_tensors(feeds, run.feeds)
    return Workload(name, loss, feeds, register.SerializeToString(), run.SerializeToString())


def workloads() -> list[Workload]:
    """The seed's network in float32, as bench/remote_latency.py sends it (38,921 bytes);
    a small one in float64."""
    return [workload("seednet", 64, 128, 10, "float32"), workload("small", 8, 16, 4, "float64")]


def check_response(w: Workload, raw: bytes, ulps: int = 0) -> None:
    """A Run response carries the loss and the gradients of the in-process run (bit for bit,
    or to within `ulps` units in the last place of the array's largest value: what stacking in
    a dynamic batch may change) and, to the dtype's rounding, those of the formulas by hand."""
    import graphgrad as gg
    from graphgrad import wire
    from graphgrad.v1 import service_pb2

    got = wire.decode_result(service_pb2.RunResponse.FromString(raw))
    local = gg.connect().run(w.loss, w.feeds, wrt=list(WRT))
    f = {k: v.astype(np.float64) for k, v in w.feeds.items()}
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    r = f["V"] @ h + f["a"] - f["t"]
    dz = (f["V"].T @ r) * (1 - h * h)
    by_hand = {"W": np.outer(dz, f["x"]), "b": dz, "V": np.outer(r, h), "a": r}
    eps = float(np.finfo(w.feeds["x"].dtype).eps)
    pairs = [(got.values[w.loss.name], local.value, 0.5 * r @ r)]
    pairs += [(got.grads[k], local.grads[k], by_hand[k]) for k in WRT]
    for g, loc, hand in pairs:
        assert g.dtype == loc.dtype, (g.dtype, loc.dtype)
        if ulps == 0:
            np.testing.assert_array_equal(g, loc)
        else:
            tol = ulps * eps
            np.testing.assert_allclose(g, loc, rtol=tol, atol=tol * float(np.max(np.abs(loc))))
        np.testing.assert_allclose(g, hand, rtol=1e3 * eps, atol=1e2 * eps)


# --- load: client processes -------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the clients send: `concurrency` calls of `method` with `payload` in flight in
    total, for `seconds`; each call of `setup` (method, bytes) is made once on each connection
    first (its answers come back in the Measurement)."""

    address: str
    method: str
    payload: bytes
    concurrency: int
    seconds: float
    setup: tuple[tuple[str, bytes], ...] = ()
    warmup_calls: int = 5
    batch_sizes: bool = False  # read RunStats.batch_size from every 8th response


@dataclass
class ClientReport:
    """What one client process saw of a Load."""

    latencies: np.ndarray  # seconds, of the calls completed within the window
    errors: dict[str, int]  # status code name -> count
    sample: bytes  # one response (from the warm-up)
    cpu: float  # seconds of CPU this process took in the window (and a call)
    setup_replies: list[list[bytes]]  # per connection, the answers to the setup calls
    batch_sizes: list[int]  # RunStats.batch_size of every 8th response (if asked)


@dataclass
class Measurement:
    calls: int  # completed within the timed window
    seconds: float
    latencies: np.ndarray  # seconds, of the calls completed within the window
    errors: dict[str, int]  # status code name -> count
    sample: bytes  # one response (from the warm-up)
    server_cpu: float  # seconds of CPU the server's processes took in the window
    client_cpu: float  # seconds of CPU the client processes took in the window (and a call)
    setup_replies: list[list[bytes]]  # per connection, the answers to Load.setup
    batch_sizes: list[int]  # RunStats.batch_size of every 8th response (if asked)

    @property
    def rps(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if len(self.latencies) else float("nan")


def channel_options() -> list[tuple[str, int]]:
    """Each channel its own connection (gRPC Python otherwise shares one per target within
    a process), so connections spread over SO_REUSEPORT worker processes."""
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class _ThreadLog:
    latencies: list[float] = field(default_factory=list)  # of the calls ended in the window
    batch_sizes: list[int] = field(default_factory=list)  # RunStats.batch_size, every 8th call


def _batch_size_reader() -> Callable[[bytes], int]:
    from graphgrad.v1 import service_pb2

    return lambda raw: service_pb2.RunResponse.FromString(raw).stats.batch_size


def _call_until(
    call: Any,
    load: Load,
    start: float,
    log: _ThreadLog,
    errors: dict[str, int],
    batch_size: Callable[[bytes], int] | None,
) -> None:
    """Call back to back from `start`; log each call that ends within the window."""
    stop = start + load.seconds
    while time.monotonic() < start:
        time.sleep(0.0005)
    while True:
        t0 = time.monotonic()
        try:
            reply = call(load.payload, timeout=60)
            t1 = time.monotonic()
            if t1 <= stop:
                log.latencies.append(t1 - t0)
                if batch_size is not None and len(log.latencies) % 8 == 0:
                    log.batch_sizes.append(batch_size(reply))
        except grpc.RpcError as e:
            code = e.code().name
            errors[code] = errors.get(code, 0) + 1
            t1 = time.monotonic()
        if t1 > stop:
            return


def _apply_load(conn: Connection, load: Load, threads: int) -> None:
    """`threads` threads, each with its own channel: set up and warm up, say "ready", start at
    the time received, send back a ClientReport."""
    channels = [grpc.insecure_channel(load.address, channel_options()) for _ in range(threads)]
    try:
        calls = [c.unary_unary(load.method) for c in channels]
        batch_size = _batch_size_reader() if load.batch_sizes else None
        sample = b""
        replies = []
        for ch, call in zip(channels, calls, strict=True):
            replies.append([ch.unary_unary(m)(body, timeout=60) for m, body in load.setup])
            for _ in range(load.warmup_calls):
                sample = call(load.payload, timeout=60)
        conn.send("ready")
        start = conn.recv()
        logs = [_ThreadLog() for _ in range(threads)]
        errors: dict[str, int] = {}
        pool = [
            threading.Thread(target=_call_until, args=(call, load, start, log, errors, batch_size))
            for call, log in zip(calls, logs, strict=True)
        ]
        for p in pool:
            p.start()
        time.sleep(max(0.0, start - time.monotonic()))
        cpu = _cpu_seconds()
        for p in pool:
            p.join()
        cpu = _cpu_seconds() - cpu
        lat = np.array([x for log in logs for x in log.latencies])
        sizes = [x for log in logs for x in log.batch_sizes]
        conn.send(ClientReport(lat, errors, sample, cpu, replies, sizes))
    finally:
        for c in channels:
            c.close()


def _client_process(conn: Connection) -> None:
    """One client process: applies each (Load, threads) it is sent, until None."""
    while (msg := conn.recv()) is not None:
        _apply_load(conn, *msg)


class ClientPool:
    """`processes` spawned client processes, kept for every measurement; a load of c calls in
    flight is spread over min(c, processes) of them, threads shared out evenly."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(theirs,), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)

    def measure(self, load: Load, server_cpu: Callable[[], float] = lambda: 0.0) -> Measurement:
        """Run `load`; `server_cpu` (a CPU clock of the server's processes) is read at the
        start and the end of the timed window."""
        n = min(load.concurrency, len(self.conns))
        shares = [load.concurrency // n + (i < load.concurrency % n) for i in range(n)]
        conns = self.conns[:n]
        for conn, threads in zip(conns, shares, strict=True):
            conn.send((load, threads))
        for conn in conns:
            if (reply := conn.recv()) != "ready":
                raise RuntimeError(f"a client process answered {reply!r}")
        start = time.monotonic() + 0.05
        for conn in conns:
            conn.send(start)
        time.sleep(max(0.0, start - time.monotonic()))
        cpu = server_cpu()
        time.sleep(max(0.0, start + load.seconds - time.monotonic()))
        cpu = server_cpu() - cpu
        reports: list[ClientReport] = [conn.recv() for conn in conns]
        errors: dict[str, int] = {}
        for r in reports:
            for code, count in r.errors.items():
                errors[code] = errors.get(code, 0) + count
        latencies = np.concatenate([r.latencies for r in reports])
        return Measurement(
            len(latencies),
            load.seconds,
            latencies,
            errors,
            reports[0].sample,
            cpu,
            sum(r.cpu for r in reports),
            [replies for r in reports for replies in r.setup_replies],
            [size for r in reports for size in r.batch_sizes],
        )

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(10)


@contextmanager
def client_pool(processes: int) -> Iterator[ClientPool]:
    pool = ClientPool(processes)
    try:
        yield pool
    finally:
        pool.close()


# --- servers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    address: str
    pid: int
    method: str  # what the clients call: the echo, or Run

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its descendants (Linux /proc)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total


@contextmanager
def started(cmd: Sequence[str], what: str) -> Iterator[tuple[str, int]]:
    """A server process that prints `serving on grpc://ADDRESS` first; yields the address and
    its pid. Its stderr goes to a file, shown if it fails to start."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"serving on grpcs?://(\S+)", line)
        try:
            if match is None:
                proc.kill()
                proc.wait()
                log.seek(0)
                raise RuntimeError(f"{what} did not start: {line!r}\n{log.read()[-3000:]}")
            yield match.group(1), proc.pid
        finally:
            stop(proc)


def serve_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "graphgrad.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def flag_help(text: str, flag: str) -> str | None:
    """The help text of `flag` in argparse's --help output, or None without that flag."""
    match = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|\Z)", text, re.M | re.S)
    return " ".join(match.group(1).split()) if match else None


def serve_args(
    workers: int,
    batching: bool,
    help_text: str,
    window_us: int,
    max_batch: int,
    idle_us: int = 0,
) -> list[str] | str:
    """The `graphgrad serve` flags of a row, or why this graphgrad cannot serve it. The run
    queue holds every request in flight, so none is refused."""
    args = ["--no-ray", "--run-queue", "256"]
    if "process" in (flag_help(help_text, "--workers") or ""):
        args += ["--workers", str(workers)]
    elif workers != 1:
        return "not available (graphgrad serve has no --workers processes)"
    if batching:
        if flag_help(help_text, "--batch-window-us") is None:
            return "not available (graphgrad serve has no --batch-window-us)"
        args += ["--batch-window-us", str(window_us), "--max-batch", str(max_batch)]
        if idle_us:
            if flag_help(help_text, "--batch-idle-us") is None:
                return "not available (graphgrad serve has no --batch-idle-us)"
            args += ["--batch-idle-us", str(idle_us)]
    return args


@contextmanager
def graphgrad_server(args: Sequence[str]) -> Iterator[Server]:
    """A real `graphgrad serve` on a free loopback port with a temporary data dir."""
    with tempfile.TemporaryDirectory(prefix="graphgrad-bench-") as data_dir:
        cmd = [sys.executable, "-m", "graphgrad.server", "--host", "127.0.0.1", "--port", "0"]
        with started([*cmd, "--data-dir", data_dir, *args], "graphgrad serve") as (address, pid):
            yield Server(address, pid, RUN_METHOD)


@contextmanager
def echo_server(workers: int, kind: str = "aio") -> Iterator[Server]:
    cmd = [sys.executable, __file__, "--serve-echo", str(workers), "--echo", kind]
    with started(cmd, "echo") as (address, pid):
        yield Server(address, pid, ECHO_METHOD)


def _echo_grpc_server(kind: str, port: int, reuse_port: bool) -> tuple[Any, int]:
    """A gRPC server, grpc.aio (as graphgrad serve) or sync, with graphgrad's message limits,
    whose one method returns the request bytes."""

    def echo(request: bytes, context: object) -> bytes:
        return request

    async def echo_async(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo_async if kind == "aio" else echo)},
    )
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    server: Any
    if kind == "aio":
        server = grpc.aio.server(options=options)
    else:
        server = grpc.server(futures.ThreadPoolExecutor(16), options=options)
    server.add_generic_rpc_handlers((handler,))
    return server, server.add_insecure_port(f"127.0.0.1:{port}")


def serve_echo_worker(kind: str, port: int, reuse_port: bool) -> None:
    """Serve the echo until SIGTERM; print the address once serving."""
    if kind == "sync":
        server, bound = _echo_grpc_server(kind, port, reuse_port)
        server.start()
        signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
        print(f"serving on grpc://127.0.0.1:{bound}", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server, bound = _echo_grpc_server(kind, port, reuse_port)
        await server.start()
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        print(f"serving on grpc://127.0.0.1:{bound}", flush=True)
        await stopping.wait()
        await server.stop(1)

    asyncio.run(main())


def serve_echo(workers: int, kind: str) -> None:
    """The echo with `workers` processes: one listens alone; several share a port reserved
    here with SO_REUSEPORT (the kernel spreads connections over them)."""
    if workers == 1:
        serve_echo_worker(kind, 0, reuse_port=False)
        return
    reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]
    cmd = [sys.executable, __file__, "--echo-worker", str(port), "--echo", kind]
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with ExitStack() as stack:
        for _ in range(workers):
            stack.enter_context(started(cmd, "echo worker"))
        print(f"serving on grpc://127.0.0.1:{port}", flush=True)
        stopping.wait()
    reserve.close()


# --- the bench --------------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    workers: int
    concurrency: int
    server: str  # "echo", "batching off", "batching on"
    runs: list[Measurement] = field(default_factory=list)
    unavailable: str = ""
    served_by: set[str] = field(default_factory=set)  # graphgrad worker processes ("HOST:PID")

    @property
    def rps(self) -> float:
        return statistics.median(m.rps for m in self.runs)

    def percentile(self, q: float) -> float:
        lat = np.concatenate([m.latencies for m in self.runs])
        return float(np.percentile(lat, q)) if len(lat) else float("nan")

    def cpu_per_call(self, side: str) -> float:
        """Median over runs of server or client CPU seconds per completed call."""
        return statistics.median(getattr(m, f"{side}_cpu") / max(m.calls, 1) for m in self.runs)

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.runs:
            for code, count in m.errors.items():
                out[code] = out.get(code, 0) + count
        return out


HEADER = (
    f"{'workload':8} {'workers':>7} {'in flight':>9}  {'server':13} {'req/s':>8} {'p50 us':>8} "
    f"{'p99 us':>8} {'srv us/req':>10} {'cli us/req':>10}  x echo"
)


def fmt_row(row: Row, echo: Row) -> str:
    head = f"{row.workload:8} {row.workers:7} {row.concurrency:9}  {row.server:13}"
    if row.unavailable:
        return f"{head} {row.unavailable}"
    line = (
        f"{head} {row.rps:8.0f} {row.percentile(50) * 1e6:8.0f} {row.percentile(99) * 1e6:8.0f} "
        f"{row.cpu_per_call('server') * 1e6:10.0f} {row.cpu_per_call('client') * 1e6:10.0f}"
    )
    if echo is not row and not echo.unavailable:
        line += f"  {row.rps / echo.rps:5.2f}"
    sizes = [size for m in row.runs for size in m.batch_sizes]
    if sizes:
        line += f"   mean batch {statistics.mean(sizes):.1f}"
    if row.served_by and row.workers > 1:
        line += f"   {len(row.served_by)} of {row.workers} workers served"
    if row.errors:
        line += f"   errors {row.errors}"
    return line


def graphgrad_servers(
    stack: ExitStack, workers: int, args: argparse.Namespace, help_text: str
) -> dict[str, Server | str]:
    """The graphgrad servers of one worker count, batching off and on (or why not)."""
    import graphgrad as gg

    out: dict[str, Server | str] = {}
    for batching in (False, True):
        name = f"batching {'on' if batching else 'off'}"
        sargs = serve_args(
            workers, batching, help_text, args.batch_window_us, args.max_batch, args.batch_idle_us
        )
        if isinstance(sargs, str):
            out[name] = sargs
            continue
        server = stack.enter_context(graphgrad_server(sargs))
        with gg.connect(server.address) as client:
            got = client.server_info().workers
        if got not in (0, workers):  # 0: a graphgrad from before --workers processes
            raise RuntimeError(f"graphgrad serve {' '.join(sargs)} reports {got} workers")
        out[name] = server
    return out


def answered_by(m: Measurement) -> set[str]:
    """The worker processes that the connections of a graphgrad measurement landed on."""
    from graphgrad.v1 import service_pb2

    return {service_pb2.GetServerInfoResponse.FromString(r[1]).worker for r in m.setup_replies}


def measure_group(
    pool: ClientPool,
    w: Workload,
    c: int,
    servers: dict[str, Server | str],
    workers: int,
    args: argparse.Namespace,
) -> list[Row]:
    """One row per server, measured in interleaved rounds (drift hits every row alike); every
    graphgrad answer is checked against the in-process run and the formulas by hand."""
    group = [Row(w.name, workers, c, name) for name in servers]
    for row in group:
        if isinstance(server := servers[row.server], str):
            row.unavailable = server
    for _ in range(args.rounds):
        for row in group:
            server = servers[row.server]
            if isinstance(server, str):
                continue
            setup = ()
            if server.method == RUN_METHOD:  # each worker process holds its own graphs
                setup = ((REGISTER_METHOD, w.register), (INFO_METHOD, b""))
            load = Load(
                server.address,
                server.method,
                w.run,
                c,
                args.seconds,
                setup,
                batch_sizes=row.server == "batching on",
            )
            m = pool.measure(load, server.cpu_seconds)
            if server.method == ECHO_METHOD:
                assert m.sample == w.run, "the echo changed the bytes"
            else:
                check_response(w, m.sample, args.ulps if row.server == "batching on" else 0)
                row.served_by |= answered_by(m)
            row.runs.append(m)
    return group


def run_bench(args: argparse.Namespace, out: Callable[[str], None] = print) -> list[Row]:
    help_text = serve_help()
    works = workloads()
    rows: list[Row] = []
    with client_pool(args.client_processes) as pool:
        for workers in args.workers:
            with ExitStack() as stack:
                servers: dict[str, Server | str] = {
                    "echo": stack.enter_context(echo_server(workers, args.echo))
                }
                servers.update(graphgrad_servers(stack, workers, args, help_text))
                for w in works:
                    for c in args.concurrency:
                        group = measure_group(pool, w, c, servers, workers, args)
                        for row in group:
                            out(fmt_row(row, group[0]))
                        rows.extend(group)
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    """The issue's targets: at the most requests in flight, graphgrad with batching against
    the echo with as many workers."""
    top = max(r.concurrency for r in rows)
    echoes = {(r.workload, r.workers, r.concurrency): r for r in rows if r.server == "echo"}
    lines = []
    for r in rows:
        if r.server != "batching on" or r.concurrency != top:
            continue
        target = TARGETS[r.workload]
        head = f"target {r.workload}, workers {r.workers}, {top} in flight, batching on:"
        if r.unavailable:
            lines.append(f"{head} >= {target} x echo   {r.unavailable}")
            continue
        ratio = r.rps / echoes[r.workload, r.workers, top].rps
        verdict = "OK" if ratio >= target else "MISSED"
        lines.append(f"{head} {ratio:.2f} x echo   target >= {target}   {verdict}")
    return lines


def parser() -> argparse.ArgumentParser:
    from graphgrad.engine.stacking import STACK_ULPS

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.5, help="timed window of each run")
    p.add_argument("--rounds", type=int, default=3, help="runs per row (median req/s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--client-processes", type=int, default=4)
    # batching on as a server under load would run it: a long window, which fills batches
    # while requests keep coming, and an idle time, which runs a batch soon after the last
    # of a few requests in flight has joined it (docs/batching.md, "Under load")
    p.add_argument("--batch-window-us", type=int, default=5000)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-idle-us", type=int, default=1000)
    p.add_argument(
        "--ulps",
        type=int,
        default=STACK_ULPS,
        help="how far a batched answer may be from the unbatched (default: the bound the "
        "engine promises, STACK_ULPS; docs/batching.md)",
    )
    p.add_argument("--echo", choices=("aio", "sync"), default="aio", help="echo server kind")
    p.add_argument("--quick", action="store_true", help="a smoke run: 0.3 s, one round")
    p.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    p.add_argument("--echo-worker", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.serve_echo is not None:
        serve_echo(args.serve_echo, args.echo)
        return
    if args.echo_worker is not None:
        serve_echo_worker(args.echo, args.echo_worker, reuse_port=True)
        return
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    print(
        f"throughput under load: {args.client_processes} spawned client processes, "
        f"{args.seconds} s x {args.rounds} interleaved rounds per row (median req/s; p50, p99 "
        f"and CPU per request over all rounds); {args.echo} echo; batching: "
        f"--batch-window-us {args.batch_window_us} --max-batch {args.max_batch}"
        f"{f' --batch-idle-us {args.batch_idle_us}' if args.batch_idle_us else ''}. "
        f"{os.cpu_count()} CPUs shared by clients, servers and other work: figures are noisy"
    )
    for w in workloads():
        print(f"  {w.name}: feeds {w.feed_bytes} bytes, Run request {len(w.run)} bytes")
    print(HEADER)
    rows = run_bench(args, lambda line: print(line, flush=True))
    for line in target_lines(rows):
        print(line)


if __name__ == "__main__":
    main()
