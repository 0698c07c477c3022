"""N = 1,000 networks 4 -> 16 -> 1 (tanh hidden layer, linear output), each with its own 64
samples (x standard normal, target sin of the sum of x), loss 1/2 sum (y - t)^2 / 64,
full-batch SGD lr = 0.1, 200 steps, float32.

Prints network-steps per second for the graphgrad job on Ray (2 CPUs) and for a
hand-vectorised numpy reference doing the same updates on all N networks at once, and their
ratio (target >= 2.0); also the job with 1 Ray CPU, inline (target >= 1.5: every step is
one compiled program of the stacked gradient graph), and N = 10,000.

    python bench/ensemble.py [--cpus 2]    # the Ray rows: 1 CPU and --cpus CPUs
    python bench/ensemble.py --inline    # the inline job at N = 1,000 only, three times
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # this machine only

import numpy as np

import graphgrad as gg

S, H, STEPS, LR = 64, 16, 200, 0.1


def problem(n: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, S, 4)).astype(np.float32)
    t = np.sin(x.sum(-1, keepdims=True)).astype(np.float32)
    params = {
        "W1": (rng.standard_normal((n, H, 4)) * 0.5).astype(np.float32),
        "b1": np.zeros((n, H), np.float32),
        "W2": (rng.standard_normal((n, 1, H)) * 0.5).astype(np.float32),
        "b2": np.zeros((n, 1), np.float32),
    }
    return params, {"x": x, "t": t}


def template():
    with gg.Graph():
        x = gg.input("x", shape=(S, 4), dtype="float32")
        t = gg.input("t", shape=(S, 1), dtype="float32")
        W1 = gg.input("W1", shape=(H, 4), dtype="float32")
        b1 = gg.input("b1", shape=(H,), dtype="float32")
        W2 = gg.input("W2", shape=(1, H), dtype="float32")
        b2 = gg.input("b2", shape=(1,), dtype="float32")
        y = gg.tanh(x @ gg.transpose(W1) + b1) @ gg.transpose(W2) + b2
        return gg.mul(0.5 / S, gg.sum((y - t) ** 2), name="loss")


def numpy_reference(params, data, steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    p = {k: v.copy() for k, v in params.items()}
    x, t = data["x"], data["t"]
    xT = np.swapaxes(x, 1, 2)
    history = np.empty((len(x), steps), np.float32)
    for step in range(steps):
        h = np.tanh(x @ np.swapaxes(p["W1"], 1, 2) + p["b1"][:, None, :])
        y = h @ np.swapaxes(p["W2"], 1, 2) + p["b2"][:, None, :]
        r = y - t
        history[:, step] = 0.5 * (r * r).sum(axis=(1, 2)) / S
        dy = r / S
        dz = (dy @ p["W2"]) * (1 - h * h)
        grads = {
            "W2": np.swapaxes(dy, 1, 2) @ h,
            "b2": dy.sum(1),
            "W1": np.swapaxes(dz, 1, 2) @ np.swapaxes(xT, 1, 2),
            "b1": dz.sum(1),
        }
        for k in p:
            p[k] = p[k] - LR * grads[k]
    return p, history


def run_job(n: int, executor: str, cpus: int) -> dict[str, float]:
    params, data = problem(n)
    client = gg.connect(ray_num_cpus=cpus)
    loss = template()
    if executor == "ray":  # start Ray and warm its workers outside the timing
        client.train(
            loss,
            {k: v[:8] for k, v in params.items()},
            {k: v[:8] for k, v in data.items()},
            steps=2,
            executor="ray",
        ).wait(False)
    t = time.perf_counter()
    job = client.train(loss, params, data, gg.optim.SGD(lr=LR), steps=STEPS, executor=executor)
    job.wait(progress=False)
    seconds = time.perf_counter() - t
    _, ref_hist = numpy_reference(
        {k: v[:4] for k, v in params.items()}, {k: v[:4] for k, v in data.items()}, STEPS
    )
    np.testing.assert_allclose(job.history[:4], ref_hist, rtol=2e-3, atol=1e-5)
    return {"seconds": seconds, "chunks": job.chunks[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", nargs=3, metavar=("N", "EXECUTOR", "CPUS"), help=argparse.SUPPRESS)
    parser.add_argument("--inline", action="store_true", help="the inline job at N = 1,000 only")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (num_cpus)")
    args = parser.parse_args()
    if args.inline:
        inline_only()
        return
    if args.job:
        n, executor, cpus = int(args.job[0]), args.job[1], int(args.job[2])
        print(json.dumps(run_job(n, executor, cpus)))
        return

    def job(n: int, executor: str, cpus: int) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--job", str(n), executor, str(cpus)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    for n in (1000, 10_000):
        params, data = problem(n)
        t = time.perf_counter()
        numpy_reference(params, data, STEPS)
        t_numpy = time.perf_counter() - t
        rate_numpy = n * STEPS / t_numpy
        print(f"N = {n}: numpy by hand         {rate_numpy:12,.0f} network-steps/s")
        runs = [("inline", "local", 1), ("ray, 1 CPU", "ray", 1)]
        runs += [(f"ray, {args.cpus} CPUs", "ray", args.cpus)] if args.cpus > 1 else []
        for label, executor, cpus in runs:
            r = job(n, executor, cpus)
            rate = n * STEPS / r["seconds"]
            print(
                f"N = {n}: graphgrad {label:12s} {rate:12,.0f} network-steps/s "
                f"({int(r['chunks'])} chunks)   ratio to numpy {rate / rate_numpy:.2f}"
            )
    print("target: graphgrad on ray, 2 CPUs, N = 1000 >= 2.0 x numpy; inline >= 1.5 x numpy")


def inline_only(n: int = 1000, repeats: int = 3) -> None:
    """The inline job beside the numpy reference, alternating in this process; the median
    ratio of the pairs (a shared machine drifts between runs, less within a pair)."""
    params, data = problem(n)
    ratios = []
    for _ in range(repeats):
        t = time.perf_counter()
        numpy_reference(params, data, STEPS)
        t_numpy = time.perf_counter() - t
        r = run_job(n, "local", 1)
        ratios.append(t_numpy / r["seconds"])
        print(
            f"N = {n}: numpy by hand {n * STEPS / t_numpy:12,.0f} network-steps/s, graphgrad "
            f"inline {n * STEPS / r['seconds']:12,.0f} ({int(r['chunks'])} chunks)   "
            f"ratio {ratios[-1]:.2f}"
        )
    print(f"median ratio to numpy, inline, N = {n}: {sorted(ratios)[len(ratios) // 2]:.2f}")
    print("target: inline >= 1.5 x numpy")


if __name__ == "__main__":
    main()
