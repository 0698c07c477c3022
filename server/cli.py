"""`graphgrad serve`: the command-line entry point of the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.plan_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, PLANS

from .app import Server, ServerConfig
from .auth import check_token
from .cache import DEFAULT_GRAPH_BYTES, DEFAULT_GRAPHS
from .job_service import spec_decoder, stored_spec_decoder
from .jobs import DEFAULT_MAX_QUEUED, JobManager, default_max_running
from .limits import MIB, Limits
from .runtime import Runtime
from .store import JobStore, StoreError

TOKEN_ENV = "GRAPHGRAD_TOKEN"


def parser() -> argparse.ArgumentParser:
    defaults = Limits()
    p = argparse.ArgumentParser(prog="graphgrad", description="graphgrad graph execution service")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    s.add_argument("--port", type=int, default=50051, help="port (0: pick a free one)")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token clients must send (or set {TOKEN_ENV})",
    )
    s.add_argument("--max-nodes", type=int, default=defaults.max_nodes)
    s.add_argument("--max-tensor-bytes", type=int, default=defaults.max_tensor_bytes)
    s.add_argument(
        "--max-message-bytes",
        type=int,
        default=defaults.max_message_bytes,
        help=f"gRPC message limit both ways (default {defaults.max_message_bytes // MIB} MiB)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=defaults.max_request_bytes,
        help="peak memory one request or job may take, from its declared shapes "
        f"(default: an eighth of this machine's memory, {defaults.max_request_bytes // MIB} MiB)",
    )
    s.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)",
    )
    s.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    s.add_argument("--no-ray", action="store_true", help="run everything inline; no Ray at all")
    s.add_argument(
        "--data-dir",
        type=Path,
        # An empty variable counts as unset (not as the current directory).
        default=Path(
            os.environ.get("GRAPHGRAD_DATA_DIR") or Path.home() / ".local/share/graphgrad"
        ),
        help="where jobs are stored (default: $GRAPHGRAD_DATA_DIR or ~/.local/share/graphgrad)",
    )
    s.add_argument(
        "--graph-cache-size",
        type=int,
        default=DEFAULT_GRAPHS,
        help="registered graphs kept (least recently used are dropped)",
    )
    s.add_argument(
        "--graph-cache-bytes",
        type=int,
        default=DEFAULT_GRAPH_BYTES,
        help="estimated bytes of registered graphs kept; a larger graph is refused "
        f"(default {DEFAULT_GRAPH_BYTES // MIB} MiB)",
    )
    s.add_argument(
        "--plan-cache-size",
        type=int,
        default=DEFAULT_ENTRIES,
        help="plans kept (pass plans, compiled steps, partitions; least recently used dropped)",
    )
    s.add_argument(
        "--plan-cache-bytes",
        type=int,
        default=DEFAULT_BYTES,
        help=f"estimated bytes of plans kept (default {DEFAULT_BYTES // MIB} MiB)",
    )
    s.add_argument("--workers", type=int, default=16, help="threads serving requests")
    s.add_argument(
        "--max-concurrent-runs",
        type=int,
        default=os.cpu_count() or 1,
        help="Run/Explain calls executing at once (default: CPU count)",
    )
    s.add_argument(
        "--run-queue",
        type=int,
        default=32,
        help="Run/Explain calls waiting for a slot; beyond: RESOURCE_EXHAUSTED (default 32)",
    )
    s.add_argument(
        "--max-streams",
        type=int,
        default=1000,
        help="open server streams (WatchJob, GetJobResults); beyond: RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--max-running-jobs",
        type=int,
        default=default_max_running(),
        help="training jobs run at once; later ones queue as pending (default: CPU count)",
    )
    s.add_argument(
        "--max-queued-jobs",
        type=int,
        default=DEFAULT_MAX_QUEUED,
        help="pending jobs beyond which SubmitJob is RESOURCE_EXHAUSTED "
        f"(default {DEFAULT_MAX_QUEUED})",
    )
    s.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight calls get at shutdown"
    )
    s.add_argument("--log-level", default="INFO")
    return p


POSITIVE = (
    "max_nodes",
    "max_tensor_bytes",
    "max_message_bytes",
    "max_request_bytes",
    "graph_cache_size",
    "graph_cache_bytes",
    "plan_cache_size",
    "plan_cache_bytes",
    "max_running_jobs",
)


def config_from(args: argparse.Namespace) -> ServerConfig:
    for name in POSITIVE:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(
                f"graphgrad serve: {flag} must be at least 1, got {getattr(args, name)}"
            )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("graphgrad serve: --tls-cert and --tls-key go together")
    for flag, value, least in (
        ("--workers", args.workers, 1),
        ("--max-concurrent-runs", args.max_concurrent_runs, 1),
        ("--run-queue", args.run_queue, 0),
        ("--max-streams", args.max_streams, 1),
    ):
        if value < least:
            raise SystemExit(f"graphgrad serve: {flag} must be at least {least}, got {value}")
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
        workers=args.workers,
        grace_seconds=args.grace,
        max_concurrent_runs=args.max_concurrent_runs,
        run_queue=args.run_queue,
        max_streams=args.max_streams,
    )


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = config_from(args)
    try:  # an unusable store is fatal before anything starts, in one line
        store = JobStore(args.data_dir / "jobs.sqlite3")
    except StoreError as e:
        raise SystemExit(f"graphgrad serve: {e}") from None
    dispatcher = Dispatcher(
        ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, ray_enabled=not args.no_ray
    )
    PLANS.configure(args.plan_cache_size, args.plan_cache_bytes)
    runtime = Runtime.create(
        config.limits,
        dispatcher,
        cache_size=args.graph_cache_size,
        cache_bytes=args.graph_cache_bytes,
    )
    if dispatcher.ray_enabled:
        # Ray first: it forks its daemons with Python callbacks in the child, which can
        # deadlock once gRPC threads exist (seen here as a raylet that never starts). And on
        # the main thread: from any other thread its driver never reaches the GCS.
        try:
            dispatcher.ray.start()
        except Exception:
            logging.getLogger("graphgrad.server").exception("Ray did not start; runs stay inline")
    jobs = JobManager(
        store,
        dispatcher,
        spec_decoder(runtime),
        max_running=args.max_running_jobs,
        max_queued=args.max_queued_jobs,
        read=stored_spec_decoder,
    )
    jobs.resume_all()  # reads the rows' summaries only: each job is built when it starts
    server = Server(config, runtime, jobs)
    scheme = "grpcs" if config.tls_cert else "grpc"

    def serving(address: str) -> None:
        # The address on stdout is the CLI's output (scripts and tests read it), not a diagnostic.
        print(f"graphgrad serving on {scheme}://{address}", flush=True)

    try:
        asyncio.run(server.serve(serving))
    except OSError as e:  # e.g. the port is taken: one line, before "serving on"
        raise SystemExit(f"graphgrad serve: {e}") from None
    return 0
