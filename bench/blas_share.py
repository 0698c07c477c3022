"""Why each `--workers` process gets its share of the cores for numpy's BLAS threads.

N processes (one per CPU by default), each running the same chain of small matmuls (200 x 200,
then tanh, as a graph's nodes do), first with BLAS's default of a thread per core in every
process, then with the share the supervisor gives each worker (cores / N, at least 1); the
rounds alternate. Prints the median wall time of all N processes finishing, each way, and
the ratio.

    python bench/blas_share.py [--processes N] [--matmuls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from graphgrad.server.supervisor import BLAS_THREADS, worker_env

CHAIN = """
import numpy as np
h, eye = np.ones((200, 200)), np.eye(200) * 0.5
for _ in range({matmuls}):
    h = np.tanh(h @ eye)
"""


def all_finish(processes: int, matmuls: int, env: dict[str, str]) -> float:
    """Seconds until `processes` copies of the chain, started together, have all finished."""
    t = time.perf_counter()
    running = [
        subprocess.Popen([sys.executable, "-c", CHAIN.format(matmuls=matmuls)], env=env)
        for _ in range(processes)
    ]
    for p in running:
        if p.wait() != 0:
            raise RuntimeError(f"a chain exited with status {p.returncode}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--matmuls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    # BLAS's own default where none of its variables is set; the supervisor's share besides.
    default = {k: v for k, v in os.environ.items() if k not in BLAS_THREADS}
    shared = worker_env(args.processes, default)
    ways = {"a thread per core each": default, "their share each": shared}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.rounds):
        for way, env in ways.items():
            times[way].append(all_finish(args.processes, args.matmuls, env))
    share = shared[BLAS_THREADS[0]]
    print(
        f"{args.processes} processes x {args.matmuls} matmuls (200 x 200) + tanh on "
        f"{os.cpu_count()} CPUs, shared with other work (noisy); median of {args.rounds} rounds"
    )
    medians = {way: statistics.median(t) for way, t in times.items()}
    for way, seconds in medians.items():
        threads = share if way == "their share each" else "default"
        print(f"  BLAS threads {threads:>7} ({way}): {seconds:8.2f} s")
    ratio = medians["a thread per core each"] / medians["their share each"]
    print(f"  ratio default / share: {ratio:.1f}x")


if __name__ == "__main__":
    main()
