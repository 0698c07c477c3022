"""Eight independent branches on Ray versus the local executor and hand-written numpy.

Branch b: x_b (256x512, float32), 4 layers h <- tanh(h @ W) with W 512x512; loss = sum over
branches of mean(h^2); gradients for every W. Printed in one run: Ray with 2 CPUs (--cpus),
the local executor with BLAS pinned to one thread (a subprocess, so the pin holds), the local
executor with all threads, and a hand-written numpy forward+backward.
Targets: Ray >= 1.7 x faster than one-thread local; Ray no slower than local, all threads.

    python bench/wide.py [--runs 7] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # this machine only

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median_seconds

import graphgrad as gg

B, LAYERS, N, D = 8, 4, 256, 512


def build():
    with gg.Graph():
        total = None
        for b in range(B):
            h = gg.input(f"x{b}", shape=(N, D), dtype="float32")
            for k in range(LAYERS):
                h = gg.tanh(h @ gg.input(f"W{b}_{k}", shape=(D, D), dtype="float32"))
            term = gg.mean(h * h)
            total = term if total is None else total + term
    rng = np.random.default_rng(0)
    feeds = {f"x{b}": rng.standard_normal((N, D)).astype("float32") for b in range(B)}
    feeds |= {
        f"W{b}_{k}": (rng.standard_normal((D, D)) / np.sqrt(D)).astype("float32")
        for b in range(B)
        for k in range(LAYERS)
    }
    return total, feeds, [f"W{b}_{k}" for b in range(B) for k in range(LAYERS)]


def numpy_reference(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    grads = {}
    for b in range(B):
        hs = [f[f"x{b}"]]
        for k in range(LAYERS):
            hs.append(np.tanh(hs[-1] @ f[f"W{b}_{k}"]))
        g = 2 * hs[-1] / hs[-1].size
        for k in reversed(range(LAYERS)):
            g = g * (1 - hs[k + 1] ** 2)
            grads[f"W{b}_{k}"] = hs[k].T @ g
            g = g @ f[f"W{b}_{k}"].T
    return grads


def local_time(runs: int) -> float:
    loss, feeds, wrt = build()
    client = gg.connect()
    return median_seconds(
        lambda: client.run(loss, feeds, wrt=wrt, executor="local"), runs, warmup=1
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (num_cpus)")
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_only:
        print(json.dumps(local_time(args.runs)))
        return

    pinned = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    one_thread = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--local-only", "--runs", str(args.runs)],
            env=pinned,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    all_threads = local_time(args.runs)

    loss, feeds, wrt = build()
    client = gg.connect(ray_num_cpus=args.cpus)
    res = client.run(loss, feeds, wrt=wrt, executor="ray")
    ray_time = median_seconds(
        lambda: client.run(loss, feeds, wrt=wrt, executor="ray"), args.runs, warmup=1
    )
    ref = numpy_reference(feeds)
    for k in wrt:
        np.testing.assert_allclose(res.grads[k], ref[k], rtol=2e-3, atol=1e-6)
    t_numpy = median_seconds(lambda: numpy_reference(feeds), args.runs, warmup=1)
    plan = client.explain(loss, wrt=wrt, executor="ray")

    print(
        f"plan: {len(plan.partitions)} partitions, {res.stats.bytes_moved / 1e6:.1f} MB moved "
        f"between tasks, {plan.cut_bytes} bytes across partition cuts"
    )
    print(f"{f'ray, {args.cpus} CPUs':28s}{ray_time * 1e3:8.1f} ms")
    print(f"local, BLAS on 1 thread     {one_thread * 1e3:8.1f} ms")
    print(f"local, all threads          {all_threads * 1e3:8.1f} ms")
    print(f"numpy by hand (all threads) {t_numpy * 1e3:8.1f} ms")
    speedup, vs_all = one_thread / ray_time, all_threads / ray_time
    print(
        f"ray vs 1-thread local: {speedup:.2f}x faster   target >= 1.7   "
        f"{'OK' if speedup >= 1.7 else 'MISSED'}"
    )
    print(
        f"ray vs all-thread local: {vs_all:.2f}x   target >= 1.0   "
        f"{'OK' if vs_all >= 1.0 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
