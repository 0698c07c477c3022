"""The plan simulator's predictions against measurements on this machine, then its predictions
for clusters this machine is not.

Workloads: bench/wide.py's graph (8 branches), a deep chain (400 tanh layers on a vector),
the seed's two-layer network (bench/seednet.py), and a training job (bench/ensemble.py's
networks, N = 1,000, 50 steps). Each is timed inline with BLAS on one thread (a
subprocess, so the pin holds) and on a local Ray of 1 and of 2 CPUs (a subprocess each,
which also measures that Ray's figures for the calibration), and predicted with the
calibration measured here (`graphgrad calibrate`'s routine), in interleaved rounds: each
workload once a round (a fast one repeated to ~20 ms), and on Ray the calibration's Ray probes
once a round among them. Target: every prediction within 25 % of its measurement, medians
over the rounds; beside it, the least disturbed (the fastest sample against the prediction
from the probes' best figures), which a loaded shared machine disturbs least. Then the
predicted speedups of the wide graph with B = 64 branches and of 100,000-network training at
16, 64 and 256 CPUs, and what bounds each.

    python bench/simulate.py [--runs 5] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # this machine only

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ensemble
import numpy as np
import seednet
import wide

import graphgrad as gg
from graphgrad._request import build_request
from graphgrad.engine import ExecutorKind, RunOptions, calibration
from graphgrad.engine.calibration import ONE_THREAD, Calibration
from graphgrad.engine.simulator import (
    Cluster,
    Prediction,
    choose_partitions,
    predict,
    predict_training,
)

CHAIN_DEPTH, CHAIN_WIDTH = 400, 4096
TRAIN_N, TRAIN_STEPS = 1000, 50
WORKLOADS = ("wide", "chain", "seed", "training")
PARAMS, DATA = ["W1", "b1", "W2", "b2"], ["x", "t"]  # bench/ensemble.py's: data per network
OPTIMIZER = gg.optim.SGD(lr=0.1)


def chain() -> tuple[gg.Tensor, dict[str, np.ndarray], list[str]]:
    with gg.Graph():
        x = gg.input("x", shape=(CHAIN_WIDTH,))
        h = x
        for _ in range(CHAIN_DEPTH):
            h = gg.tanh(h) + x
        loss = gg.sum(h * h)
    return loss, {"x": np.random.default_rng(0).standard_normal(CHAIN_WIDTH)}, ["x"]


def seed() -> tuple[gg.Tensor, dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s) for k, s in seednet.SHAPES.items()}
    return seednet.network(), feeds, seednet.WRT


def graphs() -> dict[str, tuple[gg.Tensor, dict[str, np.ndarray], list[str]]]:
    return {"wide": wide.build(), "chain": chain(), "seed": seed()}


SAMPLE_S = 0.02  # a sample repeats a fast workload until it lasts about this long


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    clock: Callable[[], float],
    each_round: Callable[[], object] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each workload, one sample a round (each workload once a round,
    so a shared machine's load drifting over minutes falls on all of them alike). A sample
    repeats a workload faster than SAMPLE_S until it lasts that long: what is predicted is
    a warm run, and one call of the seed's network right after the wide graph's (its caches
    cold) takes twice its steady time. `each_round` runs before each round (the
    calibration's probes, sampled among the workloads)."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm: compiled programs, Ray's workers
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        each_round()
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(calls[name]):
                fn()
            samples[name].append((clock() - t0) / calls[name])
    return samples


def workloads(executor: str, client: gg.LocalClient) -> dict[str, Callable[[], object]]:
    """Each workload as one call: the engine's run (what a server runs once a request is
    decoded, and what the simulator predicts: the SDK's own conversions cost tens of
    microseconds more), and the training job from submission to its end."""
    options = RunOptions(ExecutorKind.parse(executor))
    out: dict[str, Callable[[], object]] = {}
    for name, (loss, feeds, wrt) in graphs().items():
        _, graph, request = build_request(loss, feeds, wrt, None)
        out[name] = lambda g=graph, r=request: client.session.run(g, r, options)
    params, data = ensemble.problem(TRAIN_N)
    loss = ensemble.template()

    def train() -> None:
        client.train(loss, params, data, OPTIMIZER, steps=TRAIN_STEPS, executor=executor).wait(
            progress=False
        )

    out["training"] = train
    return out


def measure(
    executor: str,
    runs: int,
    client: gg.LocalClient,
    each_round: Callable[[], object] = lambda: None,
) -> dict[str, list[float]]:
    """Samples of seconds of each workload on `executor` (in this process): inline in CPU time
    (what one dedicated CPU takes, whatever else this shared machine runs), on Ray in wall
    time (several processes: the machine's load counts, so the calibration's Ray figures
    are sampled between the same rounds, `each_round`)."""
    clock = time.perf_counter if executor == "ray" else time.process_time
    return interleaved_samples(workloads(executor, client), runs, clock, each_round)


def predictions(cal: Calibration, cluster: Cluster) -> dict[str, Prediction]:
    out = {}
    for name, (loss, _, wrt) in graphs().items():
        _, graph, request = build_request(loss, None, wrt, None)
        out[name] = predict(graph, request, cluster, cal)
    template = ensemble.template()
    _, graph, _ = build_request(template, None, (), None)
    out["training"] = predict_training(
        graph, template.name, PARAMS, TRAIN_N, TRAIN_STEPS, cluster, cal, DATA, OPTIMIZER
    )
    return out


def child(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        env={**os.environ, **ONE_THREAD},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Per figure, the least disturbed of the rounds' probes: the shortest time, the most bytes/s.
LARGER_IS_BETTER = {"store_bytes_per_s", "cores"}


def best(values: list[float], name: str) -> float:
    return max(values) if name in LARGER_IS_BETTER else min(values)


def median(values: list[float], name: str) -> float:
    return statistics.median(values)


def ray_figures(
    probes: list[dict[str, float]], pick: Callable[[list[float], str], float]
) -> calibration.RayFigures:
    """Ray's figures from the rounds' probes, each `pick`ed over them (median, best)."""
    return calibration.RayFigures(**{k: pick([p[k] for p in probes], k) for k in probes[0]})


def describe(cpus: int, figures: calibration.RayFigures) -> str:
    return (
        f"ray at {cpus} CPU(s): object store {figures.store_bytes_per_s / 1e9:.2f} GB/s"
        f" + {figures.store_object_s * 1e3:.2f} ms an export's object (read"
        f" {figures.store_wait_s * 1e3:.2f} ms later)"
        f" + {figures.put_overhead_s * 1e3:.2f} ms a put, submit "
        f"{figures.submit_s * 1e3:.2f} ms, task overhead "
        f"{figures.task_overhead_s * 1e3:.2f} ms, latency "
        f"{figures.task_latency_s * 1e3:.2f} ms, work {figures.task_slowdown:.2f}x "
        f"slower than one CPU of its own; CPU a task costs the driver "
        f"{figures.driver_task_s * 1e3:.2f} ms and Ray's daemons "
        f"{figures.daemon_task_s * 1e3:.2f} ms"
        + (" (charged: no core of their own)" if cpus >= figures.cores > 0 else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true", help="inline only")
    parser.add_argument("--inline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ray-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Each child calibrates (BLAS on one thread, as the child itself runs) just before it
    # measures: the load of a shared machine changes by the minute.
    if args.inline_child:
        cal = calibration.measure_compute_here(quick=False, cpu_clock=True)
        times = measure("local", args.runs, gg.connect())
        print(json.dumps({"samples": times, "cal": cal.to_json()}))
        return
    if args.ray_child:
        cal = calibration.measure_compute_here(quick=False, cpu_clock=True)
        client = gg.connect(ray_num_cpus=args.ray_child)
        client.session.start_for(ExecutorKind.RAY)
        # Ray's figures once a round, among the workloads' samples: the load of a shared
        # machine drifts while they run.
        probes: list[dict[str, float]] = []

        def probe() -> None:
            probes.append(dataclasses.asdict(calibration.measure_ray()))

        times = measure("ray", args.runs, client, probe)
        print(json.dumps({"samples": times, "probes": probes, "cal": cal.to_json()}))
        return

    print(
        f"machine shared with other work: medians of {args.runs} interleaved rounds (the "
        "target), and the least disturbed (the fastest sample; Ray's best figures)"
    )
    rows: list[tuple[str, str, float, float, float, float]] = []
    inline = child(["--inline-child", "--runs", str(args.runs)])
    cal = Calibration.from_json(inline["cal"])
    inline_pred = predictions(cal, Cluster(1, 1))
    for name in WORKLOADS:
        p, got = inline_pred[name].one_cpu, inline["samples"][name]
        rows.append((name, "inline, 1 CPU", p, statistics.median(got), p, min(got)))
    if not args.no_ray:
        for cpus in (1, 2):
            got = child(["--ray-child", str(cpus), "--runs", str(args.runs)])
            compute = Calibration.from_json(got["cal"])
            figures = ray_figures(got["probes"], median)
            least = ray_figures(got["probes"], best)
            print(describe(cpus, figures))
            pred = predictions(calibration.with_ray(compute, figures), Cluster(1, cpus))
            fast = predictions(calibration.with_ray(compute, least), Cluster(1, cpus))
            for name in WORKLOADS:
                t = got["samples"][name]
                m, q = pred[name].makespan, fast[name].makespan
                rows.append((name, f"ray, {cpus} CPU(s)", m, statistics.median(t), q, min(t)))
            cal = calibration.with_ray(compute, figures)
    print(
        f"{'workload':10s} {'where':14s} {'predicted':>11s} {'measured':>11s}  ratio"
        "   least disturbed: predicted, measured, ratio"
    )
    within = within_least = 0
    for name, where, p, m, q, n in rows:
        ok, ok_least = abs(p / m - 1) <= 0.25, abs(q / n - 1) <= 0.25
        within += ok
        within_least += ok_least
        print(
            f"{name:10s} {where:14s} {p * 1e3:9.3g} ms {m * 1e3:9.3g} ms  {p / m:5.2f}"
            f"{'' if ok else ' *'}  {q * 1e3:9.3g} ms {n * 1e3:9.3g} ms  {q / n:5.2f}"
            f"{'' if ok_least else ' *'}"
        )
    print(
        f"within 25 %: {within} of {len(rows)} (least disturbed: {within_least})   target: "
        "all, medians   (* off by more than 25 %)"
    )

    # At scale: this machine's rates, on machines of their own (no other work slowing tasks);
    # Ray's own processes charged as on nodes whose Ray CPUs are all their cores.
    cal = dataclasses.replace(cal, task_slowdown=1.0)
    print(
        "\npredicted at scale (the calibration above, tasks' work at one dedicated CPU's pace, "
        "the driver's and daemons' CPU charged where every CPU is busy; one node per 16 CPUs, "
        "10 Gb/s between):"
    )
    wide.B = 64
    loss, _, wrt = wide.build()
    _, graph, request = build_request(loss, None, wrt, None)
    template = ensemble.template()
    _, tgraph, _ = build_request(template, None, (), None)
    for cpus in (16, 64, 256):
        cluster = Cluster(max(1, cpus // 16), min(cpus, 16))
        choice = choose_partitions(graph, request, cluster, cal)
        p = choice.prediction or predict(graph, request, cluster, cal)
        t = predict_training(
            tgraph, template.name, PARAMS, 100_000, 200, cluster, cal, DATA, OPTIMIZER
        )
        for what, q in (("wide B=64", p), ("train 100,000", t)):
            bounds = ", ".join(f"{name} {s * 1e3:.0f}" for name, s in q.bounds)
            print(
                f"{what:14s} {cpus:4d} CPUs: {q.makespan * 1e3:9.1f} ms, {q.speedup:6.1f}x one "
                f"CPU ({q.one_cpu * 1e3:.0f} ms), {q.tasks} tasks, bound by {q.bound} "
                f"(ms: {bounds})"
            )


if __name__ == "__main__":
    main()
