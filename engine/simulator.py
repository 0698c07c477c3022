"""Plan simulator: predict how long a request or a training job takes on a cluster.

A discrete-event replay of the task DAG as Ray runs it. The caller stages the fed inputs
into the object store (on its node) and submits the tasks; a task reaches a worker one
task-to-task latency after its submit and runs on the first CPU that can start it (a CPU
of the node holding most of its inputs wins a tie, as Ray's locality-aware scheduling
does). A task starts when its CPU is free and its inputs have arrived: each
upstream task's exports one task-to-task latency after it ended, plus bytes / network
bandwidth when they come from another node. On its CPU it costs the per-task overhead, its
nodes' compute (the calibrated cost model) and writing its exports into the object store.
The caller's own task (gradients of nodes no partition owns) runs in the driver once every
task it reads has ended. Forward tasks come in topological order and backward tasks in
reverse, as the schedule lists them (engine/driver.py), and a backward task waits for the
last gradient contribution it sums, because it reads every downstream backward task.

What it reports: the makespan, the one-CPU inline time (the local executor: every node in
one thread, no task costs) and their ratio, the critical path, the lower bound each
resource sets (critical path, CPU work, task overhead, object store, network) and which
binds, and a per-task timeline.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.calibration import CACHE_BYTES, INLINE_BYTES, Calibration, in_force
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.driver import CALLER, Schedule
from graphgrad.engine.errors import RequestError
from graphgrad.engine.ir import Graph
from graphgrad.engine.ops import INPUT
from graphgrad.engine.planner import MIN_PARTITION_S, node_costs
from graphgrad.engine.training import SGD, Adam, activation_bytes
from graphgrad.engine.training_run import CACHE_BYTES as TRAINING_CACHE_BYTES
from graphgrad.engine.training_run import next_segment

SEGMENT_STEPS = 25  # engine/training_run.py's TrainingRun.segment_steps

NETWORK_BYTES_PER_S = 1.25e9  # 10 Gb/s between nodes, when not given
# A replay costs O(tasks x nodes): these bound what one explain() may ask for.
MAX_NODES, MAX_CPUS_PER_NODE = 256, 4096
BOUND_NAMES = ("critical path", "cpu", "task overhead", "object store", "network")
MAX_TIMELINE = 10_000  # tasks kept in a prediction's timeline (the makespan counts them all)
# Ray must be predicted to win by more than the simulator's error (bench/simulate.py's
# target: within 25 %) before the auto policy sends a request to it.
RAY_MARGIN = 0.8


@dataclass(frozen=True, slots=True)
class Cluster:
    """`nodes` machines of `cpus_per_node` CPUs each, joined by `network_bytes_per_s`."""

    nodes: int = 1
    cpus_per_node: int = 1
    network_bytes_per_s: float = NETWORK_BYTES_PER_S

    def __post_init__(self) -> None:
        for name, most in (("nodes", MAX_NODES), ("cpus_per_node", MAX_CPUS_PER_NODE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ValueError(
                    f"cluster {name} must be an integer from 1 to {most}, got {value!r}"
                )
        bw = self.network_bytes_per_s
        if not (isinstance(bw, int | float) and math.isfinite(bw) and bw > 0):
            raise ValueError(f"cluster network_bytes_per_s must be a positive number, got {bw!r}")

    @property
    def cpus(self) -> int:
        return self.nodes * self.cpus_per_node

    def __str__(self) -> str:
        if self.nodes == 1:
            return f"{self.cpus_per_node} CPU(s)"
        return (
            f"{self.nodes} nodes x {self.cpus_per_node} CPUs ({self.network_bytes_per_s:.3g} B/s)"
        )


def cluster_from(
    cpus: int | None = None,
    nodes: int | None = None,
    cpus_per_node: int | None = None,
    network_bytes_per_s: float | None = None,
    field: str = "cluster",
) -> Cluster | None:
    """The cluster an explain() asks about: `cpus` alone (one node), or `nodes` and
    `cpus_per_node`; None when none is asked. A bad shape is a RequestError naming it."""
    if cpus is None and nodes is None and cpus_per_node is None:
        if network_bytes_per_s is not None:
            raise RequestError("network_bytes_per_s needs nodes and cpus_per_node", field=field)
        return None
    if cpus is not None and (nodes is not None or cpus_per_node is not None):
        raise RequestError("give cpus (one node), or nodes and cpus_per_node", field=field)
    if cpus is None and (nodes is None or cpus_per_node is None):
        raise RequestError("nodes and cpus_per_node go together", field=field)
    try:
        if cpus is not None:
            return Cluster(1, cpus, network_bytes_per_s or NETWORK_BYTES_PER_S)
        return Cluster(nodes, cpus_per_node, network_bytes_per_s or NETWORK_BYTES_PER_S)  # type: ignore[arg-type]
    except ValueError as e:
        raise RequestError(str(e), field=field) from None


@dataclass(frozen=True, slots=True)
class SimTask:
    """One task of the DAG. `deps` are (earlier task, bytes it reads from that task)."""

    name: str
    seconds: float  # compute (what it would take inline)
    deps: tuple[tuple[int, int], ...] = ()
    fed_bytes: int = 0  # fed inputs it reads (staged by the caller)
    out_bytes: int = 0  # exports it writes into the object store
    on_caller: bool = False  # runs in the driver: no CPU slot, no task overhead
    # Submitted by the driver once it has got its upstream's results (a training chunk's
    # next segment), not with the tasks it submits at the start.
    after_get: bool = False


@dataclass(frozen=True, slots=True)
class TaskTiming:
    name: str
    node: int
    cpu: int  # -1: the caller (the driver process)
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Prediction:
    makespan: float
    one_cpu: float  # inline on one CPU
    bound: str  # the resource whose lower bound binds
    bounds: tuple[tuple[str, float], ...]  # each resource's lower bound on the makespan
    critical_path: tuple[str, ...]
    critical_seconds: float
    timeline: tuple[TaskTiming, ...]  # in start order (the first MAX_TIMELINE)
    tasks: int
    cluster: Cluster
    calibration: str
    bytes_across_nodes: int = 0
    choice: str = ""  # the auto policy's choice on this cluster (Choice), when asked

    @property
    def speedup(self) -> float:
        return self.one_cpu / self.makespan if self.makespan > 0 else 1.0

    def __str__(self) -> str:
        path = self.critical_path
        shown = " -> ".join(path if len(path) <= 6 else (*path[:3], "...", *path[-2:]))
        bounds = ", ".join(f"{name} {_s(s)}" for name, s in self.bounds)
        return (
            f"predicted on {self.cluster}: {_s(self.makespan)} ({self.speedup:.2f}x one CPU "
            f"inline, {_s(self.one_cpu)}), {self.tasks} tasks, bound by {self.bound}\n"
            f"  critical path {_s(self.critical_seconds)}: {shown}\n"
            f"  lower bounds: {bounds}\n"
            f"  calibration: {self.calibration}" + (f"\n  {self.choice}" if self.choice else "")
        )


def _s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def simulate(
    tasks: Sequence[SimTask],
    cal: Calibration,
    cluster: Cluster,
    staged_bytes: int = 0,
    staged_objects: int = 0,
    placement: Sequence[int] | None = None,
) -> Prediction:
    """Replay `tasks` (in submission order; deps point to earlier tasks) on `cluster`. The
    caller first puts `staged_objects` objects of `staged_bytes` in all into the store, then
    submits the tasks one by one. `placement`: the node of each task, where it is known
    (what Ray did), instead of the simulator's choice."""
    n = len(tasks)
    store, net = cal.store_bytes_per_s, cluster.network_bytes_per_s
    shared = shares_cpus(cal, cluster)
    staged_at = staged_objects * cal.put_overhead_s + staged_bytes / store
    submitted, upfront = [], 0  # the tasks submitted at the start, one after another
    for t in tasks:
        upfront += not t.after_get
        submitted.append(staged_at + upfront * cal.submit_s)
    # A worker task starts one latency after its submit at the earliest, as it starts one
    # after the end of a task it reads: Ray leases it a worker and pushes it there.
    reachable = [
        at + (0.0 if t.on_caller else cal.task_latency_s)
        for at, t in zip(submitted, tasks, strict=True)
    ]
    # Per node: a heap of (free at, cpu) over the CPUs used so far, and how many are unused
    # (free from the start), so a large cluster costs only the CPUs the tasks occupy.
    busy: list[list[tuple[float, int]]] = [[] for _ in range(cluster.nodes)]
    unused = [cluster.cpus_per_node] * cluster.nodes
    start, end = [0.0] * n, [0.0] * n
    where: list[tuple[int, int]] = [(0, -1)] * n
    waits: list[int] = [-1] * n  # the task each one last waited for (critical path)
    consumers: list[list[int]] = [[] for _ in tasks]
    missing = [len(t.deps) for t in tasks]
    for k, t in enumerate(tasks):
        for d, _ in t.deps:
            if not 0 <= d < k:
                raise ValueError(f"task {k} ({t.name}) depends on task {d}, not an earlier one")
            consumers[d].append(k)
    across = 0
    ready = [(reachable[k], k) for k, t in enumerate(tasks) if not t.deps]
    heapq.heapify(ready)
    while ready:
        _, k = heapq.heappop(ready)  # earliest ready first, then submission order
        t = tasks[k]
        on_cpu = not t.on_caller or shared  # the driver's work takes a CPU when shared
        if t.on_caller:
            nodes: Sequence[int] = [0]
        elif placement is not None:
            nodes = [placement[k]]
        else:
            nodes = range(cluster.nodes)
        best: tuple[float, int, int, int] | None = None  # (start, -local bytes, node, cpu)
        for node in nodes:
            arrive, local, waited = reachable[k], 0, -1
            if t.fed_bytes:
                arrive = max(arrive, staged_at + (t.fed_bytes / net if node else 0.0))
                local += t.fed_bytes if node == 0 else 0
            for d, nbytes in t.deps:
                at = end[d] + dependency_wait(nbytes, cal, t)  # the driver's get waits as a task
                if where[d][0] != node:
                    at += nbytes / net
                else:
                    local += nbytes
                if at >= arrive:
                    arrive, waited = at, d
            if not on_cpu:
                cpu, at = -1, arrive
            else:
                if unused[node]:
                    idle, cpu = 0.0, cluster.cpus_per_node - unused[node]
                else:
                    idle, cpu = busy[node][0]
                at = max(arrive, idle)
            key = (at, -local, node, cpu)
            if best is None or key < best:
                best = key
                waits[k] = waited
        assert best is not None
        at, _, node, cpu = best
        cost = task_cost(t, cal)
        fresh = cpu == cluster.cpus_per_node - unused[node]
        if shared and not t.on_caller and not _another_idle(busy[node], unused[node], fresh, at):
            cost += cal.driver_task_s + cal.daemon_task_s
        start[k], end[k], where[k] = at, at + cost, (node, cpu)
        if cpu >= 0:
            if fresh:
                unused[node] -= 1
                heapq.heappush(busy[node], (end[k], cpu))
            else:
                heapq.heapreplace(busy[node], (end[k], cpu))
        for d, nbytes in t.deps:
            across += nbytes if where[d][0] != node else 0
        across += t.fed_bytes if node else 0
        for c in consumers[k]:
            missing[c] -= 1
            if missing[c] == 0:
                dep_ready = max(end[d] for d, _ in tasks[c].deps)
                heapq.heappush(ready, (max(dep_ready, reachable[c]), c))
    if any(missing):
        raise ValueError("the task DAG has a task whose dependencies never finish")
    makespan = max(end, default=0.0) + cal.request_overhead_s
    path, critical = _critical_path(tasks, cal, reachable)
    workers = [t for t in tasks if not t.on_caller]
    cpus = cluster.cpus
    ray_own = len(workers) * (cal.driver_task_s + cal.daemon_task_s) if shared else 0.0
    figures = (
        critical,
        (sum(t.seconds for t in workers) * cal.task_slowdown + ray_own) / cpus,
        len(workers) * cal.task_overhead_s / cpus,
        staged_at + sum(t.out_bytes for t in workers) / store / cpus,
        across / net / max(1, cluster.nodes - 1),
    )
    bounds = tuple(zip(BOUND_NAMES, figures, strict=True))
    order = sorted(range(n), key=lambda k: (start[k], k))[:MAX_TIMELINE]
    return Prediction(
        makespan,
        sum(t.seconds for t in tasks) + cal.request_overhead_s,
        max(bounds, key=lambda b: b[1])[0],
        bounds,
        path,
        critical,
        tuple(TaskTiming(tasks[k].name, *where[k], start[k], end[k]) for k in order),
        n,
        cluster,
        cal.source,
        across,
    )


def shares_cpus(cal: Calibration, cluster: Cluster) -> bool:
    """Whether the driver and Ray's daemons share the workers' CPUs: a node whose Ray CPUs
    are as many as the calibrated machine's cores (none known: they have cores of their
    own, as the default calibration has them). Then the driver's own task takes a CPU,
    and a task starting while every other CPU of its node is busy also pays the driver's
    and the daemons' CPU for it (with a CPU idle, they run there: a chain of tasks only
    waits for them, which the calibrated latency counts)."""
    return 0 < cal.cores <= cluster.cpus_per_node


def _another_idle(busy: list[tuple[float, int]], unused: int, fresh: bool, at: float) -> bool:
    """Whether a CPU of the node is idle at `at` besides the one a task takes there: a `fresh`
    one (never used: `unused` counts those) or the earliest free of `busy` (a heap of (free
    at, cpu)), whose next earliest is then one of its two children."""
    if fresh:
        return unused > 1 or (bool(busy) and busy[0][0] <= at)
    return unused > 0 or any(free <= at for free, _ in busy[1:3])


def dependency_wait(nbytes: int, cal: Calibration, reader: SimTask | None = None) -> float:
    """From a task's end to a reader's start: the latency, and longer when the export went
    through the object store (too large for the task's reply); for a reader submitted
    after the driver's get, that get, its submit and its way to a worker."""
    wait = cal.task_latency_s + (cal.store_wait_s if nbytes > INLINE_BYTES else 0.0)
    if reader is not None and reader.after_get:
        wait += cal.submit_s + cal.task_latency_s
    return wait


def task_cost(t: SimTask, cal: Calibration) -> float:
    """Seconds a task holds its CPU: in the driver, its work; on a worker, the task overhead,
    its work at the busy cluster's pace, and writing its exports into the object store (an
    object there when too large for the task's reply)."""
    if t.on_caller:
        return t.seconds
    store = t.out_bytes / cal.store_bytes_per_s
    if t.out_bytes > INLINE_BYTES:
        store += cal.store_object_s
    return cal.task_overhead_s + t.seconds * cal.task_slowdown + store


def _critical_path(
    tasks: Sequence[SimTask], cal: Calibration, reachable: Sequence[float]
) -> tuple[tuple[str, ...], float]:
    """The longest chain with as many CPUs as tasks, on one node (no network); `reachable`:
    when each task could start at the earliest, whatever it reads."""
    finish: list[float] = []
    via: list[int] = []
    for k, t in enumerate(tasks):
        begin, came = reachable[k], -1
        for d, nbytes in t.deps:
            if finish[d] + dependency_wait(nbytes, cal, t) > begin:
                begin, came = finish[d] + dependency_wait(nbytes, cal, t), d
        finish.append(begin + task_cost(t, cal))
        via.append(came)
    if not tasks:
        return (), 0.0
    k = max(range(len(tasks)), key=finish.__getitem__)
    chain = []
    while k >= 0:
        chain.append(tasks[k].name)
        first, k = k, via[k]
    if reachable[first] > 0:
        chain.append("stage and submit")  # ray.put of the inputs, .remote()s, reaching a worker
    return tuple(reversed(chain)), max(finish)


# --- what to simulate ------------------------------------------------------------------


def node_seconds(graph: Graph, nodes: Sequence[int], cal: Calibration) -> float:
    """The calibrated cost model's time for these nodes of `graph` run as one program
    (inputs are free); a program whose values outgrow the last-level cache streams them."""
    costs = node_costs(graph)
    ops, types = graph.ops, graph.types
    made = sum(types[i].nbytes for i in nodes if ops[i] is not INPUT)
    streaming = made > cal.last_cache_bytes
    total = 0.0
    for i in nodes:
        if ops[i] is INPUT:
            continue
        c = costs[i]
        t = types[i]
        total += cal.node_seconds(ops[i], t.dtype, c.flops, c.bytes, c.loops, streaming, t.nbytes)
    return total


def schedule_tasks(sched: Schedule, cal: Calibration) -> tuple[list[SimTask], int, int]:
    """The tasks of a request's schedule, the bytes of the fed inputs staged and the objects
    they are staged in (engine/ray_executor.py's FeedBundles: one per set of readers)."""
    graph = sched.graph
    nbytes = [t.nbytes for t in graph.types]
    out: list[SimTask] = []
    readers: dict[int, set[int]] = {}
    for spec in sched.tasks:
        caller = spec.phase == CALLER
        # Ray moves a task's exports as one object: a reader on another node fetches it all.
        deps = tuple((u, sum(nbytes[j] for j in sched.tasks[u].exports)) for u in spec.upstream)
        name = "caller" if caller else f"P{spec.partition} {spec.phase}"
        if not caller:
            for j in spec.feeds:
                readers.setdefault(j, set()).add(spec.index)
        out.append(
            SimTask(
                name,
                node_seconds(graph, spec.nodes, cal),
                deps,
                0 if caller else sum(nbytes[j] for j in spec.feeds),
                0 if caller else sum(nbytes[j] for j in spec.exports),
                caller,
            )
        )
    bundles = {frozenset(r) for r in readers.values()}
    return out, sum(nbytes[j] for j in readers), len(bundles)


def predict_schedule(
    sched: Schedule,
    cluster: Cluster,
    cal: Calibration | None = None,
    placement: Sequence[int] | None = None,
) -> Prediction:
    """The schedule's tasks replayed on `cluster` (`placement`: see `simulate`)."""
    cal = cal or in_force()
    tasks, staged, objects = schedule_tasks(sched, cal)
    return simulate(tasks, cal, cluster, staged, objects, placement)


@dataclass(frozen=True, slots=True)
class Choice:
    """The auto policy's decision for a request on a cluster: Ray with `partitions`
    partitions, or inline (`partitions` 0), from the simulated makespans of the candidate
    partition counts (`candidates`: partitions and makespan, fewest first)."""

    partitions: int
    inline_s: float
    candidates: tuple[tuple[int, float], ...]
    prediction: Prediction | None  # of the Ray plan chosen (the fastest) when there is one

    @property
    def ray(self) -> bool:
        return self.partitions > 0

    def __str__(self) -> str:
        tried = ", ".join(f"{k}: {_s(t)}" for k, t in self.candidates) or "none"
        picked = f"ray with {self.partitions} partitions" if self.ray else "inline"
        return f"auto picks {picked} (simulated inline {_s(self.inline_s)}; ray {tried})"


CANDIDATE_FACTORS = (1, 2, 4)  # partition counts tried: these times the CPUs, 2, and all


def choose_partitions(
    graph: Graph,
    request: RunRequest,
    cluster: Cluster,
    cal: Calibration | None = None,
    cancel: Cancellation | None = None,
) -> Choice:
    """Simulate the Ray plan at each candidate partition count (at most 2, the CPUs, twice
    and four times them, and as many as the planner makes) and pick the fastest, a tie
    going to fewer; Ray only if that beats one CPU inline by more than the simulator's
    error (RAY_MARGIN)."""
    from graphgrad.engine.executor import LocalExecutor  # the Ray executor's plans, without Ray

    cal = cal or in_force()
    widest, _ = LocalExecutor(MIN_PARTITION_S).plan(graph, request, cancel)
    most = len(widest.partitions)
    counts = sorted(
        {most, *(c for c in (2, *(f * cluster.cpus for f in CANDIDATE_FACTORS)) if c < most)}
    )
    seen: dict[int, Prediction] = {}
    for k in counts:
        plan, sched = LocalExecutor(MIN_PARTITION_S, k).plan(graph, request, cancel)
        n = len(plan.partitions)
        if n >= 2 and n not in seen:
            seen[n] = predict_schedule(sched, cluster, cal)
    inline = _inline_seconds(graph, request, cal)
    seen = {k: dataclasses.replace(p, one_cpu=inline) for k, p in seen.items()}
    candidates = tuple(sorted((k, p.makespan) for k, p in seen.items()))
    best: tuple[int, float] | None = None
    for k, t in candidates:  # fewest first: a later count must be faster to win
        if best is None or t < best[1] * (1 - TIE):
            best = (k, t)
    if best is None or cluster.cpus < 2 or best[1] >= RAY_MARGIN * inline:
        return Choice(0, inline, candidates, seen[best[0]] if best else None)
    return Choice(best[0], inline, candidates, seen[best[0]])


TIE = 0.02  # makespans closer than this are a tie


def _inline_seconds(graph: Graph, request: RunRequest, cal: Calibration) -> float:
    """The request inline on one CPU: its single-partition program (the local executor's)."""
    from graphgrad.engine.executor import LocalExecutor

    _, sched = LocalExecutor().plan(graph, request)
    return predict_schedule(sched, Cluster(1, 1), cal).one_cpu


def predict(
    graph: Graph,
    request: RunRequest,
    cluster: Cluster,
    cal: Calibration | None = None,
    cancel: Cancellation | None = None,
) -> Prediction:
    """A request on `cluster`, partitioned as the Ray executor partitions it by default; its
    one-CPU time is the local executor's (one program)."""
    from graphgrad.engine.executor import LocalExecutor  # the Ray executor's plan, made without Ray

    cal = cal or in_force()
    _, sched = LocalExecutor(MIN_PARTITION_S).plan(graph, request, cancel)
    p = predict_schedule(sched, cluster, cal)
    return dataclasses.replace(p, one_cpu=_inline_seconds(graph, request, cal))


def training_step_seconds(
    template: Graph,
    loss: str,
    params: Sequence[str],
    per_network: Sequence[str],
    networks: int,
    cal: Calibration,
    update_ops: int = 2,
) -> float:
    """One step of a chunk of `networks` networks, as engine/training.py's ChunkTrainer runs
    it: the stacked gradient graph (the batching transform of `template`, then the gradient
    transform) costed node by node at its stacked shapes, the optimizer's `update_ops`
    elementwise ops per parameter, and the step's own bookkeeping (one request's)."""
    from graphgrad.engine.batching import batch_graph
    from graphgrad.engine.grad import grad_graph

    stacked, refs = batch_graph(template, {*params, *per_network}, networks)
    losses = refs[loss].name
    grads = grad_graph(stacked, [losses], list(params), [losses])
    full, pos = grads.graph, grads.graph.index
    needed = full.ancestors([pos[losses], *(pos[g] for g in grads.grads)])
    seconds = node_seconds(full, [i for i in needed if full.ops[i] is not INPUT], cal)
    for p in params:
        nbytes = 3 * full.types[pos[refs[p].name]].nbytes  # reads two arrays, writes one
        bw = cal.cache_bytes_per_s if nbytes <= CACHE_BYTES else cal.bytes_per_s
        seconds += update_ops * (cal.node_overhead_s + nbytes / bw)
    return seconds + cal.request_overhead_s


def update_ops(optimizer: object) -> int:
    """Elementwise ops the optimizer's update runs per parameter (engine/training.py)."""
    if isinstance(optimizer, Adam):
        return 12
    return 4 if isinstance(optimizer, SGD) and optimizer.momentum else 2


LOSS_BYTES = 8  # a network's loss at one step, as a segment returns it (ChunkState.losses)


def training_tasks(
    step_seconds: Callable[[int], float],
    state_bytes_per_network: int,
    networks: int,
    steps: int,
    chunks: int,
    first_segment: int = SEGMENT_STEPS,
) -> tuple[list[SimTask], int]:
    """A batched training job as Ray runs it (engine/ray_training.py's RaySegmentRunner):
    `chunks` independent chains of segments, each segment a task that reads its chunk's
    state (parameters and optimizer state) and writes it back with the loss of each of its
    networks at each step it ran, the driver submitting a chunk's next segment once it has
    the last one's result; the first `first_segment` steps long, the next sized by
    engine/training_run.py's `next_segment`. Also the bytes of every chunk's first state.
    `step_seconds(m)`: one step of m networks."""
    tasks: list[SimTask] = []
    sizes = [len(c) for c in np.array_split(np.arange(networks), chunks) if len(c)]
    for c, m in enumerate(sizes):
        step = step_seconds(m)
        state = m * state_bytes_per_network
        done, prev, length = 0, -1, first_segment
        while done < steps:
            run = min(length, steps - done)
            deps = ((prev, tasks[prev].out_bytes),) if prev >= 0 else ()
            name = f"chunk {c} steps {done}-{done + run}"
            out = state + m * run * LOSS_BYTES
            tasks.append(
                SimTask(name, run * step, deps, 0 if deps else state, out, False, bool(deps))
            )
            prev, done = len(tasks) - 1, done + run
            length = next_segment(run, run * step, length)
    return tasks, networks * state_bytes_per_network


def predict_training(
    template: Graph,
    loss: str,
    params: Sequence[str],
    networks: int,
    steps: int,
    cluster: Cluster,
    cal: Calibration | None = None,
    per_network: Sequence[str] = (),
    optimizer: object = None,
) -> Prediction:
    """A job training `networks` copies of `template` for `steps` steps on `cluster`, its
    data in `per_network` with a network axis (the rest shared): cut into chunks as
    engine/training_run.py's chunk_count cuts it (by cache size, and three per CPU on
    more than one), every chunk's step costed at its stacked shapes. One CPU: the chunks
    in turn, in this process; more: the chunks' segments as Ray tasks."""
    cal = cal or in_force()
    ops = update_ops(optimizer)
    memo: dict[int, float] = {}

    def step_seconds(m: int) -> float:
        if m not in memo:
            memo[m] = training_step_seconds(template, loss, params, per_network, m, cal, ops)
        return memo[m]

    state = sum(template.types[template.index[p]].nbytes for p in params)
    state *= 1 + (optimizer.slots if isinstance(optimizer, SGD | Adam) else 0)
    by_cache = math.ceil(networks * activation_bytes(template) / TRAINING_CACHE_BYTES)

    def chunk_sizes(cpus: int) -> list[int]:
        by_cpu = 3 * cpus if cpus > 1 else 1
        count = max(1, min(networks, max(by_cache, by_cpu)))
        return [len(c) for c in np.array_split(np.arange(networks), count) if len(c)]

    inline = steps * sum(step_seconds(m) for m in chunk_sizes(1)) + cal.request_overhead_s
    sizes = chunk_sizes(cluster.cpus)
    tasks, _ = training_tasks(step_seconds, state, networks, steps, len(sizes))
    staged = spec_bytes(template, params, per_network, networks, len(sizes))
    p = simulate(tasks, cal, cluster, staged, len(sizes))
    return dataclasses.replace(p, one_cpu=inline)


def spec_bytes(
    template: Graph, params: Sequence[str], per_network: Sequence[str], networks: int, chunks: int
) -> int:
    """What the driver puts into the object store for a training job, a chunk's spec at a
    time (engine/ray_training.py): every network's initial parameters and its own data,
    and each chunk's copy of the data the networks share."""
    inputs = [i for i, op in enumerate(template.ops) if op is INPUT]
    sizes = {template.nodes[i].name: template.types[i].nbytes for i in inputs}
    own = sum(n for name, n in sizes.items() if name in {*params, *per_network})
    return networks * own + chunks * (sum(sizes.values()) - own)
