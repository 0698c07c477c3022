"""Planning time on wide graphs (x -> N `neg` -> concat -> sum), 2k, 20k and 200k nodes.

Plans as the Ray executor does (gradient graph, partitions, tasks) without starting Ray,
and prints the seconds of each size and the ratio per 10x more nodes: near-linear planning
gives about 10 (quadratic gave about 100).

    python bench/planning.py [--sizes 2000 20000 200000]
"""

from __future__ import annotations

import argparse
import time

from graphgrad.engine import Graph, Node
from graphgrad.engine.driver import schedule
from graphgrad.engine.planner import partition


def wide(n: int) -> Graph:
    nodes = [Node("x", "input", shape=(4,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", ("x",)) for i in range(n)]
    nodes += [Node("c", "concat", tuple(f"n{i}" for i in range(n))), Node("L", "sum", ("c",))]
    return Graph(nodes)


def plan_seconds(graph: Graph) -> tuple[float, int]:
    t = time.perf_counter()
    sched = schedule(graph, ["L"], ["x"], (), lambda pp: partition(graph, pp))
    return time.perf_counter() - t, len(sched.plan.partitions)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 200000])
    args = ap.parse_args()
    previous = None
    for n in args.sizes:
        graph = wide(n)
        seconds, parts = plan_seconds(graph)
        ratio = f"{seconds / previous:6.1f}x" if previous else "      "
        print(f"{len(graph):>8} nodes  {seconds:8.3f} s  {parts:4} partitions  {ratio}")
        previous = seconds


if __name__ == "__main__":
    main()
