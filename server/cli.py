"""`graphgrad serve`: the command-line entry point of the server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from graphgrad.engine import calibration
from graphgrad.engine.allocator import set_malloc_thresholds
from graphgrad.engine.calibration import FILE_NAME as CALIBRATION_FILE
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.job_store import LONGEST_LEASE_S
from graphgrad.engine.plan_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PLANS
from graphgrad.server import logs, metrics
from graphgrad.server.app import Server, ServerConfig
from graphgrad.server.auth import check_token
from graphgrad.server.batcher import BatchingConfig
from graphgrad.server.blas import limit_blas_threads
from graphgrad.server.cache import DEFAULT_GRAPH_BYTES, DEFAULT_GRAPHS
from graphgrad.server.job_manager import JobManager
from graphgrad.server.job_service import spec_decoder, stored_spec_decoder
from graphgrad.server.limits import MIB, Limits, one_per_cpu
from graphgrad.server.runtime import Runtime
from graphgrad.server.service import WorkerView
from graphgrad.server.store import JobStore, StoreError
from graphgrad.server.supervisor import DEFAULT_WORKERS, WORKER_FLAG, Supervisor, SupervisorLink

TOKEN_ENV = "GRAPHGRAD_TOKEN"
# The most the numeric flags take (Number.most). Threads: each run slot and each queued run
# holds a thread of the pool; with --max-streams their sum, times four, must stay a C int.
PORT_MOST, C_INT_MOST, THREADS_MOST, DAY_S, WORKERS_MOST = 65535, 2**31 - 1, 10_000, 86_400, 256
LEASE_MOST_S = int(LONGEST_LEASE_S)  # a longer lease would read as free (engine/job_store.py)


@dataclass(frozen=True)
class Number:
    """A numeric flag: its least and most allowed values and its default, each stated here
    once. The most keeps absurd values (a typo, a fuzzer) from reaching what cannot take them:
    gRPC's C ints, the platform's longest timeout, a port number, thousands of processes."""

    flag: str
    least: float
    default: float | None
    help: str
    kind: type = int
    most: float | None = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


@functools.cache
def numbers() -> tuple[Number, ...]:
    """The numeric flags; defaults come from ServerConfig, Limits and the caches."""
    config, limits = ServerConfig(), Limits()
    mib = lambda n: f"{n // MIB} MiB"  # noqa: E731
    return (
        Number("--port", 0, config.port, "port (0: pick a free one)", most=PORT_MOST),
        Number("--max-nodes", 1, limits.max_nodes, "nodes a graph may have"),
        Number(
            "--max-tensor-bytes",
            1,
            limits.max_tensor_bytes,
            f"bytes of any one value (default {mib(limits.max_tensor_bytes)})",
        ),
        Number(
            "--max-message-bytes",
            1,
            limits.max_message_bytes,
            f"gRPC message limit both ways (default {mib(limits.max_message_bytes)})",
            most=C_INT_MOST,
        ),
        Number(
            "--max-request-bytes",
            1,
            limits.max_request_bytes,
            "peak memory one request or job may take, from its declared shapes (default: an "
            f"eighth of this machine's memory, {mib(limits.max_request_bytes)})",
        ),
        Number("--ray-num-cpus", 1, None, "CPUs of the local Ray (default: all)"),
        Number(
            "--graph-cache-size",
            1,
            DEFAULT_GRAPHS,
            "registered graphs kept (least recently used are dropped)",
        ),
        Number(
            "--graph-cache-bytes",
            1,
            DEFAULT_GRAPH_BYTES,
            "estimated bytes of registered graphs kept; a larger graph is refused "
            f"(default {mib(DEFAULT_GRAPH_BYTES)})",
        ),
        Number(
            "--plan-cache-size",
            1,
            DEFAULT_ENTRIES,
            "plans kept (pass plans, compiled steps, partitions; least recently used dropped)",
        ),
        Number(
            "--plan-cache-bytes",
            1,
            DEFAULT_BYTES,
            f"estimated bytes of plans kept (default {mib(DEFAULT_BYTES)})",
        ),
        Number(
            "--workers",
            1,
            DEFAULT_WORKERS,
            "server processes sharing the port, each with its own engine and caches "
            "(default %(default)s: see the README's Server section)",
            most=WORKERS_MOST,
        ),
        Number(
            "--threads",
            1,
            config.threads,
            "threads of each worker serving ordinary calls",
            most=THREADS_MOST,
        ),
        Number(
            "--max-concurrent-runs",
            1,
            None,
            "heavy calls (Run, Explain, RegisterGraph, SubmitJob) executing at once, per worker "
            "(default: CPU count; with batching on, at least --max-batch)",
            most=THREADS_MOST,
        ),
        Number(
            "--run-queue",
            0,
            config.run_queue,
            "heavy calls waiting for a slot, per worker; beyond: RESOURCE_EXHAUSTED",
            most=THREADS_MOST,
        ),
        Number(
            "--batch-window-us",
            0,
            config.batching.window_us,
            "dynamic batching: how long a Run waits for others of the same graph, outputs, "
            "wrt and feeds to run stacked with it, in microseconds (0: off; docs/batching.md)",
            most=1_000_000,
        ),
        Number(
            "--max-batch",
            2,
            config.batching.max_batch,
            "dynamic batching: most Runs stacked",
            most=THREADS_MOST,
        ),
        Number(
            "--batch-idle-us",
            0,
            config.batching.idle_us,
            "dynamic batching: a batch also runs once this long passes with no Run joining it, "
            "in microseconds (0: only --batch-window-us or --max-batch close it): a long window "
            "fills batches under load without holding a few requests in flight for it",
            most=1_000_000,
        ),
        Number(
            "--max-streams",
            1,
            config.max_streams,
            "open server streams (WatchJob, GetJobResults); beyond: RESOURCE_EXHAUSTED",
            most=1_000_000,
        ),
        Number(
            "--max-running-jobs",
            1,
            config.max_running_jobs,
            "training jobs run at once; later ones queue as pending (default: CPU count)",
        ),
        Number(
            "--max-queued-jobs",
            0,
            config.max_queued_jobs,
            "pending jobs beyond which SubmitJob is RESOURCE_EXHAUSTED",
        ),
        Number(
            "--job-lease-s",
            1.0,  # shorter: a heartbeat delayed by load (every third of it) loses a live lease
            config.job_lease_seconds,
            "seconds a worker's lease on a running job lasts without a heartbeat; another "
            "worker sharing the data dir takes over a job whose holder died after this",
            float,
            most=LEASE_MOST_S,
        ),
        Number(
            "--grace",
            0,
            config.grace_seconds,
            "seconds in-flight calls get at shutdown",
            float,
            most=DAY_S,
        ),
        Number(
            "--metrics-port",
            0,
            None,
            "serve Prometheus metrics over HTTP on this port of --host (0: pick a free one; "
            "default: no metrics)",
            most=PORT_MOST,
        ),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphgrad", description="graphgrad graph execution service")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument(
        "--host", default=ServerConfig.host, help="interface to listen on (0.0.0.0: all)"
    )
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token clients must send (or set {TOKEN_ENV})",
    )
    s.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)",
    )
    s.add_argument("--no-ray", action="store_true", help="run everything inline; no Ray at all")
    s.add_argument(
        "--data-dir",
        type=Path,
        default=calibration.default_data_dir(),
        help="where jobs are stored (default: $GRAPHGRAD_DATA_DIR or ~/.local/share/graphgrad)",
    )
    for n in numbers():
        shown = "" if "default" in n.help else " (default %(default)s)"
        shown += "" if n.most is None else f"; at most {n.most}"
        s.add_argument(n.flag, type=n.kind, default=n.default, help=n.help + shown)
    s.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="INFO: a line per job state change; DEBUG: a line per request too (default INFO)",
    )
    s.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="log lines as `key=value` text or one JSON object each (default text)",
    )
    s.add_argument(WORKER_FLAG, type=int, help=argparse.SUPPRESS)  # see server/supervisor.py
    c = sub.add_parser(
        "calibrate", help=f"measure this machine for the cost model; writes {CALIBRATION_FILE}"
    )
    c.add_argument("--data-dir", type=Path, default=s.get_default("data_dir"))
    c.add_argument("--quick", action="store_true", help="small probes, no Ray (keeps its defaults)")
    c.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the Ray measured")
    return p


def calibrate(args: argparse.Namespace) -> int:
    cal = calibration.measure(quick=args.quick, ray_cpus=args.ray_num_cpus)
    path = args.data_dir / CALIBRATION_FILE
    calibration.save(cal, path)
    print(f"wrote {path}: {cal.source}", flush=True)
    return 0


def config_from(args: argparse.Namespace) -> ServerConfig:
    for n in numbers():
        value = getattr(args, n.dest)
        if value is not None and not value >= n.least:  # NaN is refused too
            raise SystemExit(f"graphgrad serve: {n.flag} must be at least {n.least}, got {value}")
        if value is not None and n.most is not None and value > n.most:
            raise SystemExit(f"graphgrad serve: {n.flag} must be at most {n.most}, got {value}")
    slots = args.max_concurrent_runs
    if args.batch_window_us > 0 and slots is not None and slots < args.max_batch:
        raise SystemExit(
            f"graphgrad serve: --max-batch {args.max_batch} is more than --max-concurrent-runs "
            f"{slots}: a Run waits for its batch holding a run slot, so no batch could be that "
            "large (with 1, no batch forms and every Run waits out a window)"
        )
    if args.batch_idle_us > 0 and args.batch_window_us == 0:
        raise SystemExit(
            "graphgrad serve: --batch-idle-us closes dynamic batches, but batching is off: "
            "set --batch-window-us too"
        )
    if args.worker_of is not None:
        check_worker_pipe(args.worker_of)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("graphgrad serve: --tls-cert and --tls-key go together")
    token = read_token(args)
    return ServerConfig(
        host=args.host,
        port=args.port,
        limits=Limits(
            args.max_nodes, args.max_tensor_bytes, args.max_message_bytes, args.max_request_bytes
        ),
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        token=token,
        threads=args.threads,
        grace_seconds=args.grace,
        max_concurrent_runs=args.max_concurrent_runs or concurrent_runs(args),
        run_queue=args.run_queue,
        max_streams=args.max_streams,
        max_running_jobs=args.max_running_jobs,
        max_queued_jobs=args.max_queued_jobs,
        job_lease_seconds=args.job_lease_s,
        batching=BatchingConfig(args.batch_window_us, args.max_batch, args.batch_idle_us),
    )


def check_worker_pipe(fd: int) -> None:
    """The hidden --worker-of names the read end of a supervisor's pipe; anything else (the
    flag given by hand) stops the start in one line, before anything starts."""
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        why = "" if is_pipe else " (not a pipe)"
    except OSError as e:
        is_pipe, why = False, f" ({e.strerror or e})"
    if not is_pipe:
        raise SystemExit(f"graphgrad serve: {WORKER_FLAG} {fd}: not a pipe from a supervisor{why}")


def concurrent_runs(args: argparse.Namespace) -> int:
    """The default run slots: one per CPU, and a batch's worth with batching on (a Run holds
    its slot while it waits for its batch: its share of the stacked run's memory)."""
    return max(one_per_cpu(), args.max_batch if args.batch_window_us > 0 else 1)


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, else from $GRAPHGRAD_TOKEN if set; None: no auth.
    Auth fails closed: a token asked for that is blank, malformed or unreadable stops the start."""
    try:
        if args.token_file:
            return check_token(args.token_file.read_text(), f"--token-file {args.token_file}")
        if TOKEN_ENV in os.environ:
            return check_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    except OSError as e:
        raise SystemExit(
            f"graphgrad serve: cannot read --token-file {args.token_file}: {e.strerror or e}"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"graphgrad serve: {e}") from None
    return None


# Arrays from 1 MiB up get their own mmap, given back when freed: RSS returns after a large
# request (glibc would otherwise keep raising the threshold and hold the memory on its heap).
SERVER_MMAP_THRESHOLD = 1 << 20
# Smaller arrays live on the heap, which keeps up to this much free memory at its top between
# requests. glibc's default once the mmap threshold is fixed, 128 KiB, gave all of a request's
# small arrays back after it, and the same request made again page-faulted them all in anew:
# a quarter of the server's CPU time per call of bench/bigdag.py's remote part (~10,000 faults
# a call, against ~50 now). The price is RSS: up to this much above what the server holds.
SERVER_TRIM_THRESHOLD = 64 << 20
# One heap for all threads: with one per thread that runs requests (glibc's default, up to
# 8 per core), each would keep its own SERVER_TRIM_THRESHOLD. Python code allocates under
# the GIL anyway. tests/test_server_memory.py checks both bounds.
SERVER_MALLOC_ARENAS = 1


def start_ray(dispatcher: Dispatcher) -> bool:
    """Start (or join) Ray now; False, with the error logged, where it does not start.
    Ray first: it forks its daemons with Python callbacks in the child, which can deadlock
    once gRPC threads exist (seen here as a raylet that never starts). And on the main
    thread: from any other thread its driver never reaches the GCS."""
    try:
        dispatcher.ray.start()
    except Exception:
        logging.getLogger("graphgrad.server").exception("Ray did not start; runs stay inline")
        return False
    return True


def supervise(argv: list[str], args: argparse.Namespace, config: ServerConfig) -> int:
    """`--workers N` (N > 1): N worker processes under a supervisor (server/supervisor.py),
    sharing one Ray: the embedded one, started here once, or the cluster joined."""
    worker_args: list[str] = []
    if not args.no_ray and not args.ray_address:
        dispatcher = Dispatcher(ray_num_cpus=args.ray_num_cpus)
        if start_ray(dispatcher):
            worker_args = ["--ray-address", dispatcher.ray.info()[0]]
        else:  # no worker starts a Ray of its own
            worker_args = ["--no-ray"]
    endpoint = start_metrics(args)  # after Ray; the workers inherit where to write
    try:
        supervisor = Supervisor(
            argv[1:],  # after "serve": no option may come before the subcommand
            args.workers,
            config.host,
            config.port,
            config.grace_seconds,
            worker_args,
            on_exit=metrics.process_exited,
        )
        supervisor.serve(functools.partial(print_serving, config, endpoint))
    except OSError as e:  # e.g. the port is taken, or a worker could not start
        raise SystemExit(f"graphgrad serve: {e}") from None
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0


def start_metrics(args: argparse.Namespace) -> metrics.Endpoint | None:
    """Metrics on (server/metrics.py); after Ray: its processes must not inherit their
    environment."""
    try:
        return metrics.start(args.host, args.metrics_port, worker=args.worker_of is not None)
    except OSError as e:
        raise SystemExit(
            f"graphgrad serve: cannot serve metrics on port {args.metrics_port}: {e}"
        ) from None


def print_serving(config: ServerConfig, endpoint: metrics.Endpoint | None, address: str) -> None:
    # The address on stdout is the CLI's output (scripts and tests read it), not a diagnostic.
    scheme = "grpcs" if config.tls_cert else "grpc"
    scrape = f" (metrics on http://{config.host}:{endpoint.port}/metrics)" if endpoint else ""
    print(f"graphgrad serving on {scheme}://{address}{scrape}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "calibrate":
        return calibrate(args)
    set_malloc_thresholds(SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD, SERVER_MALLOC_ARENAS)
    logs.configure(args.log_level, args.log_format)
    config = config_from(args)
    calibration.use(calibration.load_or_defaults(args.data_dir))  # a bad file: a warning
    try:  # an unusable store is fatal before anything starts, in one line
        store = JobStore(args.data_dir / "jobs.sqlite3")
    except StoreError as e:
        raise SystemExit(f"graphgrad serve: {e}") from None
    if args.workers > 1:
        store.close()  # opened once here: the schema is made before workers share it
        return supervise(argv, args, config)
    dispatcher = Dispatcher(
        ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, ray_enabled=not args.no_ray
    )
    PLANS.configure(args.plan_cache_size, args.plan_cache_bytes)
    limit_blas_threads(config.max_concurrent_runs)
    runtime = Runtime.create(
        config.limits,
        dispatcher,
        cache_size=args.graph_cache_size,
        cache_bytes=args.graph_cache_bytes,
    )
    if dispatcher.ray_enabled:
        start_ray(dispatcher)
    endpoint = start_metrics(args)
    config.metrics_port = metrics.port()
    jobs = JobManager(
        store,
        dispatcher,
        spec_decoder(runtime),
        max_running=config.max_running_jobs,
        max_queued=config.max_queued_jobs,
        read=stored_spec_decoder,
        lease_seconds=config.job_lease_seconds,
    )
    jobs.resume_all()  # takes what it can run, then heartbeats: each job is built as it starts
    worker = WorkerView()
    if args.worker_of is not None:  # one of a supervisor's workers
        config = dataclasses.replace(config, reuse_port=True)
        # The supervisor gone (however): drain and exit as on SIGTERM.
        link = SupervisorLink(args.worker_of, lambda: os.kill(os.getpid(), signal.SIGTERM))
        worker = WorkerView(live=lambda: link.workers)
    server = Server(config, runtime, jobs, worker)
    try:
        asyncio.run(server.serve(functools.partial(print_serving, config, endpoint)))
    except OSError as e:  # e.g. the port is taken: one line, before "serving on"
        raise SystemExit(f"graphgrad serve: {e}") from None
    finally:
        jobs.close()  # its running jobs' leases go: another worker resumes them at once
        if endpoint is not None:
            endpoint.close()
    return 0
