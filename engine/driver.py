"""The one execution core: a request becomes a forward graph (its gradients are nodes, see
engine/grad.py) cut into tasks, which one driver runs through a runner.

Each partition of the plan has a forward task (its primal nodes) and a backward task (the
gradient nodes of its primal nodes: their VJPs and the sums of the contributions that the
backward tasks of downstream partitions send). Gradient nodes of nodes no partition owns
(graph inputs, constants, nodes off the outputs' paths) run at the caller, after the
tasks. A runner runs tasks: inline (engine/driver.py's `InlineRunner`, what the local
executor uses over a single partition) or on Ray (engine/ray_executor.py). Whatever the
partitioning, the same nodes compute the same values: results are bit-identical.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from graphgrad.engine.autodiff import (
    PassPlan,
    RunRequest,
    check_feeds,
    owned,
    plan_pass,
    seed_cotangents,
)
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.codegen import Program, Values, compile_program
from graphgrad.engine.grad import grad_graph
from graphgrad.engine.ir import Graph
from graphgrad.engine.ops import CONSTANT, INPUT
from graphgrad.engine.plan_cache import DerivedCache
from graphgrad.engine.planner import Plan

FORWARD, BACKWARD, CALLER = "forward", "backward", "caller"
# A schedule's id: this process's random token and a counter. Unique whichever driver made it
# (workers cache programs by it), and free to make (no hash of the graph on the first call).
_PROCESS, _SCHEDULE_IDS = os.urandom(8).hex(), itertools.count()
# A gradient graph's index, types and positions per node, and its own nodes (the request's
# are shared): what the plan cache counts (tests/test_caches.py checks the estimate).
GRAD_GRAPH_BYTES, GRAD_NODE_BYTES = 200, 300


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What one task runs. Positions index the schedule's graph (primal and gradient nodes)."""

    plan_id: str  # identifies the schedule (unique across processes): worker program caches
    index: int  # position in the schedule
    partition: int  # -1: the caller
    phase: str  # FORWARD | BACKWARD | CALLER
    nodes: tuple[int, ...]  # evaluated here, topological order (constants read included)
    feeds: tuple[int, ...]  # fed values read (graph inputs, seed cotangents)
    upstream: tuple[int, ...]  # tasks whose exports it reads
    reads: tuple[int, ...]  # the values it reads from those exports
    exports: tuple[int, ...]  # values later tasks or the caller read


@dataclass(frozen=True, slots=True)
class TaskMeta:
    start: float
    end: float
    where: str
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class Schedule:
    """A request's forward graph, its partition plan and its tasks (the caller's last)."""

    graph: Graph
    plan: Plan
    tasks: tuple[TaskSpec, ...]
    outputs: tuple[int, ...]  # positions of the requested outputs
    grads: tuple[int, ...]  # position of each wrt entry's gradient
    wrt_names: tuple[str, ...]
    seeds: dict[int, int]  # seeded output (position in the request's graph) -> seed input
    feed_pos: dict[int, int]  # input position in the request's graph -> in `graph`
    added: int  # nodes the gradient transform added (the rest are the request's graph's)

    def approx_bytes(self) -> int:
        """Estimated memory (what the plan cache counts): the gradient graph's own nodes and
        the tasks' positions; the request's graph is the graph cache's."""
        positions = sum(
            len(t.nodes) + len(t.feeds) + len(t.reads) + len(t.exports) for t in self.tasks
        )
        graph = GRAD_GRAPH_BYTES * len(self.graph) + GRAD_NODE_BYTES * self.added
        return (graph if self.added else 0) + 16 * positions + 200 * len(self.tasks)


def schedule(
    graph: Graph,
    outputs: Sequence[str],
    wrt: Sequence[str],
    seeded: Sequence[str],
    partitioner: Callable[[PassPlan], Plan],
) -> Schedule:
    """The tasks of a request (memoise it: it is linear in the graph)."""
    pp = plan_pass(graph, outputs, wrt, seeded)
    parts = partitioner(pp)
    owners: dict[str, str] = {}
    if pp.wrt:
        gg = grad_graph(graph, outputs, wrt, seeded)
        full, grad_names, owners = gg.graph, gg.grads, dict(gg.owners)
        seeds = {graph.index[o]: full.index[s] for o, s in gg.seeds.items()}
    else:
        full, grad_names, seeds = graph, (), {}
    pos = full.index
    part_of = {pos[graph.nodes[i].name]: p.index for p in parts.partitions for i in p.nodes}
    backward: dict[int, list[int]] = {p.index: [] for p in parts.partitions}
    caller: list[int] = []
    for name, owner in owners.items():
        k = part_of.get(pos[owner])
        (caller if k is None else backward[k]).append(pos[name])
    groups: list[tuple[int, str, list[int]]] = [
        (p.index, FORWARD, [pos[graph.nodes[i].name] for i in p.nodes]) for p in parts.partitions
    ]
    groups += [(k, BACKWARD, sorted(backward[k])) for k in reversed(range(len(parts.partitions)))]
    out_pos = tuple(pos[graph.nodes[o].name] for o in pp.outputs)
    grad_pos = tuple(pos[n] for n in grad_names)
    caller += [i for i in (*out_pos, *grad_pos) if full.ops[i] is CONSTANT]
    groups = [g for g in groups if g[2]]
    groups.append((-1, CALLER, sorted(set(caller))))
    plan_id = f"{_PROCESS}.{next(_SCHEDULE_IDS)}"
    tasks = _tasks(full, groups, set(out_pos + grad_pos), plan_id)
    return Schedule(
        full,
        parts,
        tasks,
        out_pos,
        grad_pos,
        tuple(graph.nodes[w].name for w in pp.wrt),
        seeds,
        {i: pos[graph.nodes[i].name] for i in pp.needed_inputs},
        len(full) - len(graph),
    )


def _tasks(
    graph: Graph, groups: list[tuple[int, str, list[int]]], wanted: set[int], plan_id: str
) -> tuple[TaskSpec, ...]:
    task_of: dict[int, int] = {}
    for t, (_, _, nodes) in enumerate(groups):
        for i in nodes:
            task_of[i] = t
    exports: list[set[int]] = [set() for _ in groups]
    for i in wanted:
        if i in task_of:
            exports[task_of[i]].add(i)
    made = []
    for t, (partition, phase, nodes) in enumerate(groups):
        mine = set(nodes)
        consts: set[int] = set()
        feeds: set[int] = set()
        reads: set[int] = set()
        for i in nodes:
            for j in graph.input_pos[i]:
                if j in mine:
                    continue
                if graph.ops[j] is CONSTANT:
                    consts.add(j)  # recomputed where it is read: nothing to ship
                elif graph.ops[j] is INPUT:
                    feeds.add(j)
                else:
                    reads.add(j)
                    exports[task_of[j]].add(j)
        if phase == CALLER:
            reads |= {i for i in wanted if i in task_of and task_of[i] != t}
        made.append((t, partition, phase, sorted(consts | mine), feeds, reads))
    return tuple(
        TaskSpec(
            plan_id,
            t,
            partition,
            phase,
            tuple(nodes),
            tuple(sorted(feeds)),
            tuple(sorted({task_of[j] for j in reads})),
            tuple(sorted(reads)),
            tuple(sorted(exports[t])),
        )
        for t, partition, phase, nodes, feeds, reads in made
    )


def run_task(
    graph: Graph,
    spec: TaskSpec,
    feeds: Values,
    upstream: Sequence[Values],
    cancel: Cancellation,
    where: str,
    measure: bool = True,
) -> tuple[Values, TaskMeta]:
    """One task's body (inline, or inside a Ray worker): its program over what it reads;
    `measure`: count the bytes in and out (what crosses between Ray tasks)."""
    start = time.time()
    merged: Values = {}
    for exports in upstream:
        merged.update(exports)
    values: Values = {j: feeds[j] for j in spec.feeds}
    values.update((j, merged[j]) for j in spec.reads)
    bytes_in = _nbytes(values) if measure else 0
    out = program(graph, spec)(values, cancel)
    return out, TaskMeta(start, time.time(), where, bytes_in, _nbytes(out) if measure else 0)


@dataclass(frozen=True, slots=True)
class TaskKey:
    graph: int  # the schedule's graph's serial
    plan_id: str
    index: int


_PROGRAMS: DerivedCache[TaskKey, Program] = DerivedCache("task programs")


def program(graph: Graph, spec: TaskSpec) -> Program:
    """The task's compiled program, made once per graph and task (in the plan cache)."""
    return _PROGRAMS.get_or_make(
        TaskKey(graph.serial, spec.plan_id, spec.index),
        lambda: compile_program(graph, spec.nodes, spec.exports),
    )


def task_source(sched: Schedule, partition: int, phase: str = BACKWARD) -> str:
    """The generated Python of one partition's forward or backward task."""
    for spec in sched.tasks:
        if spec.partition == partition and spec.phase == phase:
            return program(sched.graph, spec).source
    known = sorted({(s.partition, s.phase) for s in sched.tasks if s.partition >= 0})
    raise KeyError(f"no {phase} task for partition {partition} (tasks: {known})")


def _nbytes(values: Values) -> int:
    return sum(v.nbytes for v in values.values())


class Runner(Protocol):
    """Runs the tasks of a schedule: `submit` each (in schedule order, without waiting),
    then `gather` the results wanted."""

    name: str

    def begin(self, schedule: Schedule, feeds: Values, cancel: Cancellation) -> None: ...

    def submit(self, spec: TaskSpec, upstream: Sequence[Any]) -> tuple[Any, Any]:
        """Start a task given its upstream tasks' export handles: (exports, meta) handles."""
        ...

    def gather(self, handles: Sequence[Any], cancel: Cancellation) -> list[Any]: ...


class InlineRunner:
    """Runs each task in this process when it is submitted."""

    name = "inline"

    def begin(self, schedule: Schedule, feeds: Values, cancel: Cancellation) -> None:
        self._graph, self._feeds, self._cancel = schedule.graph, feeds, cancel

    def submit(self, spec: TaskSpec, upstream: Sequence[Any]) -> tuple[Any, Any]:
        return run_task(self._graph, spec, self._feeds, upstream, self._cancel, "inline", False)

    def gather(self, handles: Sequence[Any], cancel: Cancellation) -> list[Any]:
        return list(handles)


@dataclass(frozen=True, slots=True)
class Outcome:
    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    tasks: tuple[tuple[TaskSpec, TaskMeta], ...]


def run_schedule(
    graph: Graph,
    sched: Schedule,
    request: RunRequest,
    runner: Runner,
    cancel: Cancellation,
) -> Outcome:
    """Run a request's schedule: feeds and seeds checked, every task submitted, the
    caller's task run here; values by output name, gradients by wrt name."""
    pp = plan_pass(graph, request.outputs, request.wrt, tuple(request.grad_outputs or ()))
    fed = check_feeds(graph, pp, request.feeds)
    feeds = {sched.feed_pos.get(i, i): v for i, v in fed.items() if i in sched.feed_pos}
    for o, seed in seed_cotangents(graph, pp, request.grad_outputs).items():
        if o in sched.seeds:
            feeds[sched.seeds[o]] = seed
    runner.begin(sched, feeds, cancel)
    handles: list[Any] = []
    metas: list[Any] = []
    *tasks, last = sched.tasks
    for spec in tasks:
        cancel.check()
        exports, meta = runner.submit(spec, [handles[u] for u in spec.upstream])
        handles.append(exports)
        metas.append(meta)
    got = runner.gather([*(handles[u] for u in last.upstream), *metas], cancel)
    del handles  # a task's exports are freed once the tasks reading them have run
    upstream, task_metas = got[: len(last.upstream)], got[len(last.upstream) :]
    merged: Values = {}
    for exports in upstream:
        merged.update(exports)
    merged.update(run_task(sched.graph, last, feeds, upstream, cancel, "caller", False)[0])
    merged.update(feeds)

    def value(i: int) -> np.ndarray:
        return merged[i]

    names = sched.graph.nodes
    values = {names[o].name: value(o) for o in sched.outputs}
    grads = {w: owned(value(g)) for w, g in zip(sched.wrt_names, sched.grads, strict=True)}
    return Outcome(values, grads, tuple(zip(tasks, task_metas, strict=True)))


FeedCheck = tuple[str, int, tuple[int, ...], np.dtype]  # name, position, shape, dtype


@dataclass(frozen=True, slots=True, eq=False)
class InlineProgram:
    """A request run in this process with nothing to coordinate: its schedule's nodes as one
    program (the same nodes as its tasks: the same bits), its feeds checked against types
    worked out once. The warm path of the in-process executor."""

    pass_plan: PassPlan
    feeds: tuple[FeedCheck, ...]  # the inputs it needs, by name, position in the program
    feed_pos: dict[int, int]  # input position in the request's graph -> in the program's
    seeds: dict[int, int]  # seeded output (request graph) -> seed input (program)
    program: Program
    outputs: tuple[tuple[str, int], ...]
    grads: tuple[tuple[str, int], ...]

    def approx_bytes(self) -> int:
        return self.program.approx_bytes() + 200 * (len(self.feeds) + len(self.grads))


def inline_program(graph: Graph, sched: Schedule, pass_plan: PassPlan) -> InlineProgram:
    full = sched.graph
    nodes = sorted({i for t in sched.tasks for i in t.nodes})  # positions: topological
    wanted = (*sched.outputs, *sched.grads)
    feeds = tuple(
        (graph.nodes[i].name, p, full.types[p].shape, np.dtype(full.types[p].dtype))
        for i, p in sched.feed_pos.items()
    )
    return InlineProgram(
        pass_plan,
        feeds,
        sched.feed_pos,
        sched.seeds,
        compile_program(full, nodes, wanted),
        tuple((full.nodes[o].name, o) for o in sched.outputs),
        tuple(zip(sched.wrt_names, sched.grads, strict=True)),
    )


def run_inline(
    graph: Graph, ip: InlineProgram, request: RunRequest, cancel: Cancellation
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values by output name and gradients by wrt name; feeds and seeds checked first."""
    given = request.feeds
    feeds: Values = {}
    if len(given) == len(ip.feeds):
        for name, pos, shape, dtype in ip.feeds:
            v = given.get(name)
            if v.__class__ is not np.ndarray or v.shape != shape or v.dtype != dtype:
                break
            feeds[pos] = v
    if len(feeds) != len(ip.feeds) or len(given) != len(ip.feeds):
        # Not the plain case (a bad feed, an extra input, an ndarray subclass): the full check
        # names what is wrong, or accepts it.
        fed = check_feeds(graph, ip.pass_plan, given)
        feeds = {ip.feed_pos[i]: v for i, v in fed.items() if i in ip.feed_pos}
    if request.grad_outputs is not None:
        for o, seed in seed_cotangents(graph, ip.pass_plan, request.grad_outputs).items():
            if o in ip.seeds:
                feeds[ip.seeds[o]] = seed
    out = ip.program(feeds, cancel)
    values = {name: out[i] for name, i in ip.outputs}
    return values, {name: owned(out[i]) for name, i in ip.grads}
