"""What stacking saves, in process: the seed's network (x in R^64, h in R^128, y in R^10) and a
small one (x in R^8, h in R^16, y in R^4), the gradient of each request's loss, for n
requests run one at a time against one stacked run of the n requests (engine/stacking.py,
what `graphgrad serve --batch-window-us` does with requests that arrive together), timed in
the same run (interleaved); per-request medians and their ratio. Every stacked answer is checked
bit for bit against the same request run alone first. gRPC costs are not in these numbers:
bench/throughput.py measures the server with batching on and off.

    python bench/batching.py [--calls 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, us

import graphgrad as gg
from graphgrad.engine import Graph, RunOptions, RunRequest, Session
from graphgrad.engine.allocator import set_malloc_thresholds
from graphgrad.engine.stacking import StackKey, run_stacked, stack_key
from graphgrad.server.cli import SERVER_MALLOC_ARENAS, SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD

SIZES = (2, 8, 32)
NETWORKS = {"seednet": (64, 128, 10), "small": (8, 16, 4)}
WRT = ("W", "b", "V", "a")


def network(nx: int, nh: int, ny: int) -> tuple[Graph, dict[str, tuple[int, ...]]]:
    """The seed's two-layer network at these sizes, and its inputs' shapes."""
    shapes = {"x": (nx,), "t": (ny,), "W": (nh, nx), "b": (nh,), "V": (ny, nh), "a": (ny,)}
    with gg.Graph() as g:
        i = {k: gg.input(k, shape=s) for k, s in shapes.items()}
        y = i["V"] @ gg.tanh(i["W"] @ i["x"] + i["b"]) + i["a"]
        0.5 * gg.sum((y - i["t"]) ** 2)
    return g.freeze(), shapes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    # as `graphgrad serve` runs
    set_malloc_thresholds(SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD, SERVER_MALLOC_ARENAS)
    session, rng = Session(), np.random.default_rng(0)
    print("one gradient per request; per-request medians (on a 2-core machine shared with other")
    print("work: compare the ratios, not the times)")
    for name, n in ((name, n) for name in NETWORKS for n in SIZES):
        graph, shapes = network(*NETWORKS[name])
        loss = graph.nodes[-1].name
        requests = [
            RunRequest((loss,), {k: rng.standard_normal(s) * 0.3 for k, s in shapes.items()}, WRT)
            for _ in range(n)
        ]
        found = stack_key(graph, requests[0], RunOptions())
        assert found is not None
        key = found

        def one_by_one(requests: list[RunRequest] = requests, graph: Graph = graph) -> list[object]:
            return [session.run(graph, q) for q in requests]

        def stacked(
            requests: list[RunRequest] = requests, graph: Graph = graph, key: StackKey = key
        ) -> list[object]:
            return run_stacked(
                lambda g, q: session.run(g, q), graph, key, requests, [False] * len(requests)
            )

        for alone, res in zip(one_by_one(), stacked(), strict=True):
            for k in WRT:
                np.testing.assert_array_equal(res.grads[k], alone.grads[k])  # type: ignore[union-attr]
        med = interleaved_medians({"alone": one_by_one, "stacked": stacked}, args.calls, 10)
        alone, stack = med["alone"] / n, med["stacked"] / n
        print(
            f"{name:8s} n={n:3d}: alone {us(alone)}/request   stacked {us(stack)}/request"
            f"   stacked / alone = {stack / alone:.2f}"
        )


if __name__ == "__main__":
    main()
