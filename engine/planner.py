"""Cost model and partitioner: cut a graph into partitions each worth a Ray task.

The cost model estimates each node's time from its flops and the bytes it touches. The
partitioner starts from one partition per node and merges, never creating a cycle:
  1. chains: a partition whose only consumer has it as its only producer is fused with that
     consumer (cutting a chain buys no parallelism);
  2. small partitions (worth less than a few task overheads) join a neighbour they can join
     without a cycle and without delaying other work, the cheapest first.
What remains are independent branches worth a task each, joined by few, small cuts (and
small join partitions where branches meet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphgrad.engine.autodiff import PassPlan
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.ir import Graph
from graphgrad.engine.loops import inner_loops
from graphgrad.engine.ops import CONSTANT, INPUT
from graphgrad.engine.plan_cache import DerivedCache

TASK_OVERHEAD_S = 1e-3  # what one Ray task costs on this kind of machine
NODE_OVERHEAD_S = 4e-6  # Python dispatch per node
FLOPS_PER_S = 2e10  # one core, BLAS-heavy work
BYTES_PER_S = 4e9  # memory traffic of elementwise numpy
MIN_PARTITION_S = 5 * TASK_OVERHEAD_S  # smaller partitions are merged away
STAGE_BYTES_PER_S = 7e8  # ray.put of fed inputs into the object store, measured here
MAX_PARTITIONS = 512  # more tasks than this cost more to schedule than they can gain


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    bytes: float
    loops: int = 0  # numpy inner loops beyond the first (engine/loops.py)

    @property
    def seconds(self) -> float:
        return NODE_OVERHEAD_S + self.flops / FLOPS_PER_S + self.bytes / BYTES_PER_S


def node_costs(graph: Graph) -> list[NodeCost]:
    # Costs of nodes without attributes depend on their op and types alone: large graphs
    # repeat a few such signatures, worked out once each (and their costs shared).
    same: dict[tuple[Any, ...], NodeCost] = {}
    free = NodeCost(0.0, 0.0, 0)

    def make(i: int) -> NodeCost:
        op, t, attrs = graph.ops[i], graph.types[i], graph.nodes[i].attrs
        if op is INPUT:
            return free
        ins = [graph.types[j] for j in graph.input_pos[i]]
        key = (op.name, t.shape, t.dtype, *[(x.shape, x.dtype) for x in ins])  # hashed in C
        cost = None if attrs else same.get(key)
        if cost is None:
            cost = NodeCost(
                op.flops(ins, t, attrs),
                float(t.nbytes + sum(x.nbytes for x in ins)),
                inner_loops(op, ins, t, attrs),
            )
            if not attrs:
                same[key] = cost
        return cost

    return _COSTS.get_or_make(graph.serial, lambda: [make(i) for i in range(len(graph))])


_COSTS: DerivedCache[int, list[NodeCost]] = DerivedCache("node costs")  # by Graph.serial


@dataclass(frozen=True, slots=True)
class Partition:
    index: int
    nodes: tuple[int, ...]  # positions, topological order
    seconds: float  # estimated forward time
    flops: float
    bytes: float


@dataclass(frozen=True, slots=True)
class Cut:
    src: int  # producing partition, or -1 for the fed inputs
    dst: int
    node: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Plan:
    """A DAG of partitions (in topological order) and the tensors crossing between them."""

    partitions: tuple[Partition, ...]
    cuts: tuple[Cut, ...]
    owner: dict[int, int]  # node position -> partition index
    total_seconds: float
    critical_seconds: float  # longest chain of partitions, in estimated seconds

    @property
    def cut_bytes(self) -> int:
        return sum(c.bytes for c in self.cuts if c.src >= 0)


def partition(
    graph: Graph,
    plan: PassPlan,
    *,
    min_seconds: float = MIN_PARTITION_S,
    max_partitions: int = MAX_PARTITIONS,
    cancel: Cancellation | None = None,
) -> Plan:
    """Near-linear in the graph (see bench/planning.py); `cancel` is checked as it goes, so a
    deadline that passes while planning stops it with CancelledError."""
    check = (cancel or Cancellation()).check
    costs = node_costs(graph)
    # Constants are recomputed by every partition that reads them (free; no cut to ship).
    nodes = [i for i in plan.forward if graph.ops[i] is not CONSTANT]
    part_of = {i: i for i in nodes}
    members: dict[int, list[int]] = {i: [i] for i in nodes}
    seconds = {i: costs[i].seconds for i in nodes}
    preds: dict[int, set[int]] = {i: {j for j in graph.input_pos[i] if j in part_of} for i in nodes}
    succs: dict[int, set[int]] = {i: set() for i in nodes}
    for i in nodes:
        for j in preds[i]:
            succs[j].add(i)

    def merge(a: int, b: int) -> int:
        """Join partitions a and b; returns the one kept. The smaller (in nodes and edges)
        is folded into the larger, so a node or edge moves O(log n) times in all."""
        if len(members[a]) + len(preds[a]) + len(succs[a]) < (
            len(members[b]) + len(preds[b]) + len(succs[b])
        ):
            a, b = b, a
        members[a] += members.pop(b)
        seconds[a] += seconds.pop(b)
        for p in preds.pop(b):
            succs[p].discard(b)
            if p != a:
                succs[p].add(a)
                preds[a].add(p)
        for s in succs.pop(b):
            preds[s].discard(b)
            if s != a:
                preds[s].add(a)
                succs[a].add(s)
        preds[a].discard(a)
        succs[a].discard(a)
        preds[a].discard(b)
        succs[a].discard(b)
        return a

    # 1. Fuse chains (in topological order so each link is seen once).
    for i in nodes:
        check()
        if i in members:
            while len(succs[i]) == 1:
                s = next(iter(succs[i]))
                if len(preds[s]) != 1:
                    break
                i = merge(i, s)

    def neighbours(p: int, relaxed: bool) -> list[int]:
        """Where small partition p can go without a cycle and without making any partition
        wait for work it did not wait for: into its only producer, or into its only consumer
        (a join of branches stays its own small task rather than serialising the branches).
        `relaxed` also allows what is merely acyclic, for when there are too many tasks."""
        into = [q for q in preds[p] if len(preds[p]) == 1 or (relaxed and len(succs[q]) == 1)]
        into += [q for q in succs[p] if len(succs[p]) == 1 or (relaxed and len(preds[q]) == 1)]
        return into

    # 2. Merge small partitions into a neighbour.
    def merge_small(threshold: float, relaxed: bool) -> None:
        changed = True
        while changed:
            changed = False
            for p in sorted(members, key=lambda k: seconds[k]):
                check()
                if p not in members or seconds[p] >= threshold:
                    continue
                safe = neighbours(p, relaxed)
                if safe:
                    merge(p, min(safe, key=lambda k: seconds[k]))
                    changed = True

    merge_small(min_seconds, False)
    # 3. Too many (independent branches merge with no neighbour): pack partitions of one
    #    level (their longest path from a source; no path joins two of a level), the two
    #    smallest of the fullest level first.
    if len(members) > max_partitions:
        level: dict[int, int] = {}
        for p in _topological(members, preds):
            level[p] = 1 + max((level[q] for q in preds[p]), default=-1)
        by_level: dict[int, list[int]] = {}
        for p, d in level.items():
            by_level.setdefault(d, []).append(p)
        while len(members) > max_partitions:
            check()
            row = max(by_level.values(), key=len)
            if len(row) < 2:
                break
            row.sort(key=lambda k: seconds[k])
            a, b = row.pop(0), row.pop(0)
            row.append(merge(a, b))
    # 4. Still too many (long paths of small partitions): raise the bar, relaxing the
    #    no-waiting rule, until they fit.
    threshold = min_seconds
    while len(members) > max_partitions and threshold <= sum(seconds.values()):
        threshold = max(threshold * 2, TASK_OVERHEAD_S)
        merge_small(threshold, True)

    return _build_plan(graph, plan, members, costs)


def _topological(members: dict[int, list[int]], preds: dict[int, set[int]]) -> list[int]:
    waiting = {p: len(preds[p]) for p in members}
    succs: dict[int, list[int]] = {p: [] for p in members}
    for p in members:
        for q in preds[p]:
            succs[q].append(p)
    order = [p for p, n in waiting.items() if n == 0]
    for p in order:  # grows as it goes
        for s in succs[p]:
            waiting[s] -= 1
            if waiting[s] == 0:
                order.append(s)
    return order


def _build_plan(
    graph: Graph, plan: PassPlan, members: dict[int, list[int]], costs: list[NodeCost]
) -> Plan:
    # Order partitions topologically by their first node (merges kept the DAG acyclic and
    # each partition's nodes are a topologically ordered list once sorted).
    groups = sorted((sorted(m) for m in members.values()), key=lambda m: m[0])
    owner = {i: k for k, m in enumerate(groups) for i in m}
    order = _topological_partitions(graph, groups, owner)
    groups = [groups[k] for k in order]
    owner = {i: k for k, m in enumerate(groups) for i in m}
    parts = tuple(
        Partition(
            k,
            tuple(m),
            sum(costs[i].seconds for i in m),
            sum(costs[i].flops for i in m),
            sum(costs[i].bytes for i in m),
        )
        for k, m in enumerate(groups)
    )
    cuts: dict[tuple[int, int, int], Cut] = {}
    for k, m in enumerate(groups):
        for i in m:
            for j in graph.input_pos[i]:
                if graph.ops[j] is CONSTANT:
                    continue  # recomputed where it is read
                src = owner.get(j, -1)
                if src != k:
                    cuts.setdefault((src, k, j), Cut(src, k, j, graph.types[j].nbytes))
    incoming: list[list[int]] = [[] for _ in groups]
    for c in cuts.values():
        if c.src >= 0:
            incoming[c.dst].append(c.src)
    finish: list[float] = []
    for k in range(len(groups)):
        finish.append(max((finish[j] for j in incoming[k]), default=0.0) + parts[k].seconds)
    return Plan(
        parts, tuple(cuts.values()), owner, sum(p.seconds for p in parts), max(finish, default=0.0)
    )


def _topological_partitions(
    graph: Graph, groups: list[list[int]], owner: dict[int, int]
) -> list[int]:
    deps = [
        {owner[j] for i in m for j in graph.input_pos[i] if j in owner} - {k}
        for k, m in enumerate(groups)
    ]
    done: set[int] = set()
    order: list[int] = []
    pending = list(range(len(groups)))
    while pending:
        ready = [k for k in pending if deps[k] <= done]
        if not ready:
            raise AssertionError("partitioning produced a cycle")
        for k in ready:
            done.add(k)
            order.append(k)
        pending = [k for k in pending if k not in done]
    return order


def single_partition(graph: Graph, plan: PassPlan) -> Plan:
    """The plan of the local executor: everything in one partition."""
    costs = node_costs(graph)
    return (
        _build_plan(graph, plan, {0: list(plan.forward)}, costs)
        if plan.forward
        else Plan((), (), {}, 0.0, 0.0)
    )


def may_prefer_ray(graph: Graph, plan: PassPlan, cpus: int) -> bool:
    """A linear bound, checked before partitioning: could any partitioning win? Even perfectly
    parallel, Ray pays for two tasks per partition (at least two partitions) and for staging
    the fed inputs; when that bound is not below `prefers_ray`'s bar, inline it is."""
    if cpus < 2 or len(plan.forward) < 2:
        return False
    costs = node_costs(graph)
    total = sum(costs[i].seconds for i in plan.forward)
    staged = sum(graph.types[i].nbytes for i in plan.needed_inputs)
    best = total / cpus + 4 * TASK_OVERHEAD_S / cpus + staged / STAGE_BYTES_PER_S
    return best < 0.7 * total


def prefers_ray(p: Plan, cpus: int) -> bool:
    """Whether partitioned execution should beat inline execution, by the cost model.

    Ray pays for staging every fed input into its object store (measured here at about
    0.7 GB/s) and for each task; it gains the parallelism of independent partitions.
    """
    if len(p.partitions) < 2 or cpus < 2:
        return False
    tasks = 2 * len(p.partitions)  # a forward and a backward task each
    staged = {c.node: c.bytes for c in p.cuts if c.src < 0}
    ray_time = (
        max(p.critical_seconds, p.total_seconds / cpus)
        + tasks * TASK_OVERHEAD_S / cpus
        + sum(staged.values()) / STAGE_BYTES_PER_S
    )
    return ray_time < 0.7 * p.total_seconds


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    index: int
    nodes: tuple[str, ...]
    flops: float
    bytes: float


@dataclass(frozen=True, slots=True)
class CutInfo:
    src: int  # -1: the fed inputs
    dst: int
    node: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Explanation:
    """How a request would run: the executor, its partitions and the tensors between them."""

    executor: str
    partitions: tuple[PartitionInfo, ...]
    cuts: tuple[CutInfo, ...]
    fingerprint: str

    @property
    def total_flops(self) -> float:
        return sum(p.flops for p in self.partitions)

    @property
    def cut_bytes(self) -> int:
        return sum(c.bytes for c in self.cuts if c.src >= 0)

    def __str__(self) -> str:
        lines = [
            f"{self.executor}: {len(self.partitions)} partition(s), "
            f"{self.total_flops:.3g} flops, {self.cut_bytes} bytes across cuts"
        ]
        for p in self.partitions:
            shown = ", ".join(p.nodes[:6]) + (", ..." if len(p.nodes) > 6 else "")
            lines.append(f"  P{p.index}: {len(p.nodes)} nodes, {p.flops:.3g} flops  [{shown}]")
        for c in self.cuts:
            src = "feeds" if c.src < 0 else f"P{c.src}"
            lines.append(f"  {src} -> P{c.dst}: {c.node} ({c.bytes} bytes)")
        return "\n".join(lines)


def describe(graph: Graph, executor: str, plan: Plan) -> Explanation:
    names = graph.nodes
    return Explanation(
        executor,
        tuple(
            PartitionInfo(p.index, tuple(names[i].name for i in p.nodes), p.flops, p.bytes)
            for p in plan.partitions
        ),
        tuple(CutInfo(c.src, c.dst, names[c.node].name, c.bytes) for c in plan.cuts),
        graph.fingerprint,
    )
