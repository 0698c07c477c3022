"""A big DAG run remotely versus in process.

800 nodes in 100 layers of 8; each node is tanh(a @ W_k + b) with a and b drawn from the
previous layer (so values fan out to several consumers and gradients add up along many
paths); loss = sum of mean(h^2) over the last layer; gradients for all 16 weight matrices.
Targets: first remote call (graph upload included) <= 2 x in-process; later calls <= 1.2 x.

    python bench/bigdag.py [--executor local|ray|auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graphgrad_server, interleaved_medians

import graphgrad as gg

WIDTH, DEPTH, WEIGHTS, N, D = 8, 100, 16, 64, 128


def big_dag(seed: int):
    rng = np.random.default_rng(seed)
    with gg.Graph():
        x = gg.input("x", shape=(N, D), dtype="float32")
        Ws = [gg.input(f"W{k}", shape=(D, D), dtype="float32") for k in range(WEIGHTS)]
        layer = [gg.tanh(x @ Ws[k]) for k in range(WIDTH)]
        for _ in range(DEPTH - 1):
            layer = [
                gg.tanh(
                    layer[rng.integers(WIDTH)] @ Ws[rng.integers(WEIGHTS)]
                    + layer[rng.integers(WIDTH)]
                )
                for _ in range(WIDTH)
            ]
        loss = gg.sum(gg.concat([gg.reshape(gg.mean(h * h), (1,)) for h in layer]), name="loss")
    feeds = {"x": rng.standard_normal((N, D)).astype("float32")}
    feeds |= {
        f"W{k}": (rng.standard_normal((D, D)) / np.sqrt(D)).astype("float32")
        for k in range(WEIGHTS)
    }
    return loss, feeds, [f"W{k}" for k in range(WEIGHTS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", default="local")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--graphs", type=int, default=3)
    args = parser.parse_args()
    local = gg.connect()
    with graphgrad_server() as address:
        firsts, laters = [], []
        for seed in range(args.graphs):
            loss, feeds, wrt = big_dag(seed)
            nodes = len(loss.graph)
            reference = local.run(loss, feeds, wrt=wrt)  # warm: validation done once
            client = gg.connect(address)
            t = time.perf_counter()
            res = client.run(loss, feeds, wrt=wrt, executor=args.executor)
            first = time.perf_counter() - t
            for k in wrt:
                np.testing.assert_allclose(res.grads[k], reference.grads[k], rtol=1e-5, atol=1e-7)
            med = interleaved_medians(
                {
                    "local": lambda: local.run(loss, feeds, wrt=wrt),  # noqa: B023
                    "remote": lambda: client.run(loss, feeds, wrt=wrt, executor=args.executor),  # noqa: B023
                },
                args.calls,
                block=2,
            )
            firsts.append(first / med["local"])
            laters.append(med["remote"] / med["local"])
            print(
                f"graph {seed}: {nodes} nodes  in-process {med['local'] * 1e3:7.1f} ms   "
                f"remote first call {first * 1e3:7.1f} ms   "
                f"later calls {med['remote'] * 1e3:7.1f} ms"
                f"   ({res.stats.executor})"
            )
            client.close()
    first, later = float(np.median(firsts)), float(np.median(laters))
    verdict = {True: "OK", False: "MISSED"}
    print(f"first call / in-process = {first:.2f}   target <= 2.0   {verdict[first <= 2]}")
    print(f"later calls / in-process = {later:.2f}   target <= 1.2   {verdict[later <= 1.2]}")


if __name__ == "__main__":
    main()
