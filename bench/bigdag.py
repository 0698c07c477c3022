"""Big DAGs: K = 100,000 small nodes in process, and a layered DAG remote versus in process.

1. K = 100,000 nodes on float64 vectors of length 16: nodes 0-7 are inputs; node i applies
   OPS[i % 5] (add, mul, tanh, sub, cos); a unary op reads one node drawn from the previous
   64, a binary op two drawn from the last 64 "bounded" nodes (inputs, tanh and cos outputs);
   loss = the sum of the last 8 nodes' sums; gradients for the 8 inputs. Forward+backward in
   process against torch autograd on the same graph where torch is installed (target: torch /
   graphgrad >= 3.5) and, always, against plain numpy evaluating the forward pass alone node
   by node (the interpreter floor); the first call (the request's eager tier, engine/eager.py:
   planning, its tape made (lowered), then run forward and backward; graph
   validation not included) against a warm call (target <= 3), in wall time and, since the
   machine may be shared, in this thread's CPU time (a warm call's once its compiled code is
   specialized, as in the wall-time median), with the first call's parts measured apart on
   another graph; the call on which the gradient graph and program are made and compiled
   (engine/codegen.py TIER_UP_CALLS); and what a server's admission of the request costs: its
   memory estimate from the eager tier's tape (engine/tape_memory.py) against the compiled
   programs' estimate (engine/memory.py: the gradient graph and schedule), in CPU time.
2. 800 nodes in 100 layers of 8; each node is tanh(a @ W_k + b) with a and b drawn from the
   previous layer; loss = sum of mean(h^2) over the last layer; gradients for all 16 weight
   matrices. Targets: first remote call (graph upload included) <= 2 x in-process; later
   calls <= 1.2 x. Beside them, the server's own run time (RunStats) and the rest of each call,
   and the admission's memory estimate as in part 1, on fresh copies of graph 0.

    python bench/bigdag.py [--executor local|ray|auto] [--k 100000] [--skip-remote]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graphgrad_server, interleaved_medians

import graphgrad as gg
from graphgrad.engine import Graph, LocalExecutor, Node, RunRequest
from graphgrad.engine.autodiff import plan_pass
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.codegen import TIER_UP_CALLS
from graphgrad.engine.eager import Tape, held_tape, run_tape
from graphgrad.engine.executor import request_key
from graphgrad.engine.memory import request_memory
from graphgrad.engine.tape_memory import tape_peak

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


OPS = ("add", "mul", "tanh", "sub", "cos")
UNARY = {"tanh": np.tanh, "cos": np.cos}
BINARY = {"add": np.add, "mul": np.multiply, "sub": np.subtract}


def k_dag(k: int) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, np.ndarray]]:
    """The K-node workload: (op, input positions) per node, and the feeds."""
    rng = np.random.default_rng(0)
    spec: list[tuple[str, tuple[int, ...]]] = [("input", ())] * 8
    bounded = list(range(8))
    for i in range(8, k):
        op = OPS[i % 5]
        if op in UNARY:
            spec.append((op, (int(rng.integers(max(0, i - 64), i)),)))
            bounded.append(i)
        else:
            recent = bounded[-64:]
            a, b = rng.integers(len(recent), size=2)
            spec.append((op, (recent[a], recent[b])))
    feeds_rng = np.random.default_rng(1)
    feeds = {f"n{i}": 0.5 * feeds_rng.standard_normal(16) for i in range(8)}
    return spec, feeds


def k_graph(spec: list[tuple[str, tuple[int, ...]]]) -> Graph:
    nodes = [
        Node(
            f"n{i}",
            op,
            tuple(f"n{j}" for j in ins),
            shape=(16,) if op == "input" else None,
            dtype="float64" if op == "input" else None,
        )
        for i, (op, ins) in enumerate(spec)
    ]
    k = len(spec)
    nodes += [Node(f"s{i}", "sum", (f"n{i}",)) for i in range(k - 8, k)]
    nodes += [Node(f"c{i}", "reshape", (f"s{i}",), {"shape": (1,)}) for i in range(k - 8, k)]
    nodes.append(Node("cat", "concat", tuple(f"c{i}" for i in range(k - 8, k)), {"axis": 0}))
    nodes.append(Node("loss", "sum", ("cat",)))
    return Graph(nodes)


def numpy_forward(spec: list[tuple[str, tuple[int, ...]]], feeds: dict[str, np.ndarray]) -> float:
    """The floor: the forward pass alone, one numpy call per node in a Python loop."""
    v: list[np.ndarray] = [feeds[f"n{i}"] for i in range(8)]
    for op, ins in spec[8:]:
        v.append(UNARY[op](v[ins[0]]) if op in UNARY else BINARY[op](v[ins[0]], v[ins[1]]))
    return float(sum(x.sum() for x in v[-8:]))


def torch_step(spec: list[tuple[str, tuple[int, ...]]], feeds: dict[str, np.ndarray]) -> object:
    import torch

    fns = {
        "add": torch.add,
        "mul": torch.mul,
        "sub": torch.sub,
        "tanh": torch.tanh,
        "cos": torch.cos,
    }
    xs = [torch.tensor(feeds[f"n{i}"], requires_grad=True) for i in range(8)]

    def step() -> list[object]:
        v = list(xs)
        for op, ins in spec[8:]:
            v.append(fns[op](*(v[j] for j in ins)))
        loss = sum(x.sum() for x in v[-8:])
        return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)

    return step


def first_call_parts(spec: list[tuple[str, tuple[int, ...]]], request: RunRequest) -> str:
    """The first call's parts, each measured apart on a fresh graph in this thread's CPU time
    (the first call is the three in a row)."""
    graph = k_graph(spec)
    key = request_key(graph, request)
    cpu = time.thread_time
    t = cpu()
    plan_pass(graph, key.outputs, key.wrt, key.seeded)
    plan = cpu() - t
    t = cpu()
    tape = Tape(graph, key)  # on the plan made above
    lower = cpu() - t
    t = cpu()
    run_tape(graph, tape, request, Cancellation())
    run = cpu() - t
    return (
        f"its parts in CPU time: plan {plan * 1e3:6.1f} ms   tape (lowering alone) "
        f"{lower * 1e3:6.1f} ms   a run of the tape (forward + backward) {run * 1e3:6.1f} ms"
    )


def admission_line(fresh: Callable[[], Graph], request: RunRequest, times: int) -> str:
    """What the server's admission of a new request costs, in this thread's CPU time, medians
    over `times` fresh graphs: its memory estimate from the eager tier's tape (the tape is
    then the first call's, which would otherwise make it as it runs) against the compiled
    programs' estimate (the gradient graph and schedule, which admission used to build)."""
    eager, tape, compiled = [], [], []
    cpu = time.thread_time
    for _ in range(times):
        graph = fresh()
        key = request_key(graph, request)
        t = cpu()
        made = held_tape(key) or Tape(graph, key)
        tape.append(cpu() - t)
        tape_peak(graph, made)
        eager.append(cpu() - t)
        graph = fresh()
        t = cpu()
        request_memory(graph, request.outputs, request.wrt)
        compiled.append(cpu() - t)
    e, m, c = (float(np.median(x)) for x in (eager, tape, compiled))
    return (
        f"admission's memory estimate in CPU time: from the tape {e * 1e3:7.1f} ms (the tape "
        f"{m * 1e3:.1f} ms of it)   from the gradient graph {c * 1e3:7.1f} ms   "
        f"gradient graph / tape = {c / e:.1f}"
    )


def bench_k(k: int, calls: int) -> None:
    spec, feeds = k_dag(k)
    wrt = tuple(f"n{i}" for i in range(8))
    request = RunRequest(("loss",), feeds, wrt)
    graph = k_graph(spec)
    executor = LocalExecutor()
    t, cpu = time.perf_counter(), time.thread_time()
    res = executor.run(graph, request)  # the eager tier: tape made, then run
    first, first_cpu = time.perf_counter() - t, time.thread_time() - cpu
    for _ in range(TIER_UP_CALLS - 2):
        executor.run(graph, request)  # eager, on the tape made by the first call
    t = time.perf_counter()
    executor.run(graph, request)  # gradient graph, program and its compilation, then run
    tier_up = time.perf_counter() - t
    fns: dict[str, object] = {
        "graphgrad": lambda: executor.run(graph, request),
        "numpy forward": lambda: numpy_forward(spec, feeds),
    }
    try:
        step = torch_step(spec, feeds)
    except ImportError:
        print("torch is not installed: no torch autograd line (graphgrad vs numpy floor only)")
    else:
        grads = step()  # type: ignore[operator]
        for w, g in zip(wrt, grads, strict=True):
            np.testing.assert_allclose(res.grads[w], g.numpy(), rtol=1e-9, atol=1e-12)
        fns["torch"] = step
    med = interleaved_medians(fns, calls, block=1)  # type: ignore[arg-type]
    # Warm CPU time once warm (after interleaved_medians' warm-up calls): a compiled program's
    # first 8 calls run before CPython 3.11 specializes its straight-line code (it counts a
    # function's calls, not loop iterations), about a third slower than the later ones.
    warm_cpu = []
    for _ in range(calls):
        cpu = time.thread_time()
        executor.run(graph, request)
        warm_cpu.append(time.thread_time() - cpu)
    ours, floor = med["graphgrad"], med["numpy forward"]
    verdict = {True: "OK", False: "MISSED"}
    nodes = len(graph)
    print(
        f"K = {k:,}: graphgrad forward+backward {ours * 1e3:7.1f} ms "
        f"({nodes / ours:,.0f} nodes/s)   numpy forward alone {floor * 1e3:7.1f} ms "
        f"({nodes / floor:,.0f} nodes/s)   graphgrad / numpy floor speed = {floor / ours:.2f}"
    )
    if "torch" in med:
        ratio = med["torch"] / ours
        print(
            f"torch autograd {med['torch'] * 1e3:7.1f} ms   torch / graphgrad = {ratio:.2f}"
            f"   target >= 3.5   {verdict[ratio >= 3.5]}"
        )
    print(
        f"first call (eager: plan + tape + forward + backward) {first * 1e3:7.1f}"
        f" ms   "
        f"first / warm = {first / ours:.2f}   target <= 3   {verdict[first / ours <= 3]}"
    )
    cpu_ratio = first_cpu / float(np.median(warm_cpu))
    print(
        f"in CPU time: first call {first_cpu * 1e3:7.1f} ms   warm "
        f"{float(np.median(warm_cpu)) * 1e3:7.1f} ms   first / warm = {cpu_ratio:.2f}"
    )
    print(first_call_parts(spec, request))
    print(admission_line(lambda: k_graph(spec), RunRequest(("loss",), {}, wrt), 1))
    print(
        f"call {TIER_UP_CALLS} (gradient graph + program + compile + run) {tier_up * 1e3:7.1f} ms"
        f"   tier-up / warm = {tier_up / ours:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", default="local")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--graphs", type=int, default=3)
    parser.add_argument("--k", type=int, default=100_000)
    parser.add_argument("--k-calls", type=int, default=7)
    parser.add_argument("--skip-remote", action="store_true")
    args = parser.parse_args()
    bench_k(args.k, args.k_calls)
    if args.skip_remote:
        return
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
            served: list[float] = []  # the server's run time of each remote call (RunStats)

            def remote() -> None:
                r = client.run(loss, feeds, wrt=wrt, executor=args.executor)  # noqa: B023
                served.append(r.stats.wall_time)  # noqa: B023

            med = interleaved_medians(
                {"local": lambda: local.run(loss, feeds, wrt=wrt), "remote": remote},  # noqa: B023
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
            run = float(np.median(served))
            print(
                f"  the server's run: first call {res.stats.wall_time * 1e3:7.1f} ms (the rest, "
                f"{(first - res.stats.wall_time) * 1e3:.1f} ms: upload, admission, transport)   "
                f"later calls {run * 1e3:7.1f} ms (the rest: transport and codecs "
                f"{(med['remote'] - run) * 1e3:.1f} ms)"
            )
            client.close()
    loss, _, wrt = big_dag(0)
    nodes = loss.graph.freeze().nodes
    print(admission_line(lambda: Graph(nodes), RunRequest(("loss",), {}, tuple(wrt)), 5))
    first, later = float(np.median(firsts)), float(np.median(laters))
    verdict = {True: "OK", False: "MISSED"}
    print(f"first call / in-process = {first:.2f}   target <= 2.0   {verdict[first <= 2]}")
    print(f"later calls / in-process = {later:.2f}   target <= 1.2   {verdict[later <= 1.2]}")


if __name__ == "__main__":
    main()
