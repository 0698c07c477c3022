"""numpy's BLAS threads in a server process: its share of the cores for each run at once.

The server runs up to max_concurrent_runs requests at once (one per CPU by default), each on
its own thread. BLAS's default of a thread per core for every matmul then oversubscribes the
cores, and OpenBLAS's threads spin while they wait for work: a process that has just run a
matmul keeps a core busy for a while after it, and several at once slow chains of small
matmuls manyfold (bench/blas_share.py; bench/bigdag.py's remote part). The server parallelises
across requests (run slots, --workers, Ray) instead: each run gets cores / slots BLAS threads,
one by default. An operator who sets BLAS_THREADS (or the supervisor, for its workers: its
share of the cores) decides instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("graphgrad.server")

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Set by the supervisor (server/supervisor.py) beside BLAS_THREADS, where the operator set
# none: how many worker processes share the cores. A worker's runs then split its share.
SHARED_BY_WORKERS = "GRAPHGRAD_BLAS_WORKERS"


def run_share(cpus: int, slots: int) -> int:
    """BLAS threads for each of `slots` runs at once on `cpus` cores."""
    return max(1, cpus // max(1, slots))


def threads_per_run(slots: int, cpus: int, environ: Mapping[str, str]) -> int | None:
    """BLAS threads for each of a process's `slots` runs at once: its share of `cpus`, split
    with the other workers the supervisor named; None where the operator set BLAS_THREADS."""
    workers = environ.get(SHARED_BY_WORKERS, "")
    if any(name in environ for name in BLAS_THREADS) and not workers:
        return None
    count = int(workers) if workers.isdigit() else 1
    return run_share(cpus, slots * max(1, count))


def limit_blas_threads(slots: int, environ: Mapping[str, str] = os.environ) -> int | None:
    """Give numpy's BLAS its share of the cores for `slots` runs at once, unless `environ` sets
    its threads; the number set, or None where nothing was changed (logged either way)."""
    threads = threads_per_run(slots, os.cpu_count() or 1, environ)
    if threads is None:
        given = [name for name in BLAS_THREADS if name in environ]
        log.info("BLAS threads as %s sets them", given[0])
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an environment made before the dependency came: say so, go on
        log.warning("threadpoolctl is not installed: BLAS keeps a thread per core in each run")
        return None
    threadpool_limits(threads, user_api="blas")
    log.info("BLAS threads: %d per run (%d runs at once)", threads, slots)
    return threads
