"""Partitioned execution without the scheduler: what each partition's forward and backward
task does, and the specs that tell it. The Ray executor ships these; tests can call them
directly. They reuse the autodiff steps, so results are bit-identical to the local executor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .autodiff import Contribution, Cotangents, PassPlan, backward_step, evaluate, steps
from .ir import Graph
from .ops import CONSTANT
from .planner import Plan

Values = dict[int, np.ndarray]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What one partition's two tasks do. Positions index the graph's nodes."""

    plan_id: str  # identifies the request plan, for worker-side caches
    index: int
    forward: tuple[int, ...]  # nodes to evaluate, topological order
    feeds: tuple[int, ...]  # graph inputs read
    upstream: tuple[int, ...]  # partitions whose exports the forward reads
    exports: tuple[int, ...]  # values other partitions or the caller need
    backward: tuple[int, ...]  # nodes whose VJP runs, reverse topological order
    saved: tuple[int, ...]  # computed values the backward reads (kept in the object store)
    saved_feeds: tuple[int, ...]  # graph inputs the backward reads (already stored as feeds)
    wants: frozenset[int]  # inputs of backward nodes that need a gradient
    to_caller: frozenset[int]  # wanted nodes no partition owns (inputs, constants)
    downstream: tuple[int, ...]  # partitions whose backward sends contributions here
    owned: frozenset[int]
    grads: tuple[int, ...]  # wrt nodes owned here: their totals go to the caller
    seeds: tuple[int, ...]  # seeded outputs owned here

    @property
    def has_backward(self) -> bool:
        return bool(self.backward or self.grads or self.seeds)


@dataclass(frozen=True, slots=True)
class TaskMeta:
    start: float
    end: float
    where: str
    bytes_in: int
    bytes_out: int


def nbytes(values: object) -> int:
    if isinstance(values, dict):
        return sum(v.nbytes for v in values.values())
    return sum(c[3].nbytes for c in values)  # type: ignore[attr-defined]


def task_specs(
    graph: Graph, plan: PassPlan, parts: Plan, seeded: tuple[int, ...], plan_id: str
) -> list[TaskSpec]:
    owner = parts.owner
    forward_set = set(plan.forward)
    feed_set = set(plan.needed_inputs)
    needed_elsewhere: set[int] = set(plan.outputs)
    for i in plan.forward:
        for j in graph.input_pos[i]:
            if j in owner and owner[j] != owner[i]:
                needed_elsewhere.add(j)
    sends: dict[int, set[int]] = {p.index: set() for p in parts.partitions}
    for i in plan.backward:
        for j in graph.input_pos[i]:
            if j in plan.relevant and j in owner and owner[j] != owner[i]:
                sends[owner[j]].add(owner[i])
    specs = []
    for p in parts.partitions:
        k = p.index
        back = tuple(i for i in plan.backward if owner.get(i) == k)
        wants = {j for i in back for j in graph.input_pos[i] if j in plan.relevant}
        reads = sorted({*back, *(j for i in back for j in graph.input_pos[i])})
        specs.append(
            TaskSpec(
                plan_id=plan_id,
                index=k,
                forward=constants_read(graph, p.nodes) + p.nodes,
                feeds=tuple(
                    sorted({j for i in p.nodes for j in graph.input_pos[i] if j not in forward_set})
                ),
                upstream=tuple(
                    sorted(
                        {
                            owner[j]
                            for i in p.nodes
                            for j in graph.input_pos[i]
                            if j in owner and owner[j] != k
                        }
                    )
                ),
                exports=tuple(i for i in p.nodes if i in needed_elsewhere),
                backward=back,
                saved=tuple(j for j in reads if j not in feed_set),
                saved_feeds=tuple(j for j in reads if j in feed_set),
                wants=frozenset(wants),
                to_caller=frozenset(j for j in wants if j not in owner),
                downstream=tuple(sorted(sends[k])),
                owned=frozenset(p.nodes),
                grads=tuple(w for w in plan.wrt if owner.get(w) == k),
                seeds=tuple(o for o in seeded if owner.get(o) == k),
            )
        )
    return specs


def constants_read(graph: Graph, nodes: tuple[int, ...]) -> tuple[int, ...]:
    """Constants the nodes read: partitions recompute them rather than receive them."""
    return tuple(sorted({j for i in nodes for j in graph.input_pos[i] if graph.ops[j] is CONSTANT}))


def unowned_value(graph: Graph, node: int, feeds: Values) -> np.ndarray:
    """The value of an output no partition computes: a fed input or a constant."""
    if node in feeds:
        return feeds[node]
    return evaluate(steps(graph, [node])[0], {})


def run_forward(
    graph: Graph, spec: TaskSpec, feeds: Values, upstream: list[Values], where: str
) -> tuple[Values, Values, TaskMeta]:
    """Evaluate the partition's nodes; returns (exports, saved, meta)."""
    start = time.time()
    values: Values = {j: feeds[j] for j in spec.feeds}
    for exports in upstream:
        values.update(exports)
    bytes_in = nbytes(values)
    fwd = graph.memo(("task-forward", spec.plan_id, spec.index), lambda: steps(graph, spec.forward))
    with np.errstate(all="ignore"):
        for step in fwd:
            values[step.node] = evaluate(step, values)
    exports = {i: values[i] for i in spec.exports}
    saved = {i: values[i] for i in spec.saved}
    meta = TaskMeta(start, time.time(), where, bytes_in, nbytes(exports))
    return exports, saved, meta


def run_backward(
    graph: Graph,
    spec: TaskSpec,
    saved: Values,
    seeds: Values,
    incoming: list[list[Contribution]],
    where: str,
) -> tuple[list[Contribution], list[Contribution], Values, TaskMeta]:
    """Run the partition's VJPs with the contributions that downstream partitions sent.

    Returns (contributions for other partitions, contributions for graph inputs, totals of
    the wrt nodes owned here, meta).
    """
    start = time.time()
    cot = Cotangents()
    for o in spec.seeds:
        cot.seed(o, seeds[o])
    bytes_in = 0
    for contributions in incoming:
        mine = [c for c in contributions if c[0] in spec.owned]
        bytes_in += nbytes(mine)
        cot.extend(mine)
    back = graph.memo(
        ("task-backward", spec.plan_id, spec.index), lambda: steps(graph, spec.backward, spec.wants)
    )
    grads: Values = {}
    wanted = set(spec.grads)
    with np.errstate(all="ignore"):
        for step in back:
            g = cot.total(step.node)
            if step.node in wanted and g is not None:
                grads[step.node] = g
            if g is not None:
                backward_step(step, g, saved, cot)
    for w in spec.grads:
        if w not in grads:
            g = cot.total(w)
            if g is not None:
                grads[w] = g
    rest = [c for c in cot.drain() if c[0] not in spec.owned]
    to_partitions = [c for c in rest if c[0] not in spec.to_caller]
    to_caller = [c for c in rest if c[0] in spec.to_caller]
    meta = TaskMeta(
        start,
        time.time(),
        where,
        bytes_in,
        nbytes(to_partitions) + nbytes(to_caller) + nbytes(grads),
    )
    return to_partitions, to_caller, grads, meta


def gradient_totals(
    graph: Graph,
    wrt: tuple[int, ...],
    seeds: Values,
    to_caller: list[list[Contribution]],
    owned_totals: Values,
) -> dict[str, np.ndarray]:
    """The caller's side of a partitioned backward: each wrt node's gradient, by name.

    A node some partition owns has the total that partition computed (`owned_totals`); any
    other (a graph input, a constant) sums what the tasks sent the caller, after `seeds` (of
    outputs no partition owns), in the fixed order; nothing reached: zeros of its type. Each
    distinct node is totalled once, however often `wrt` names it.
    """
    wanted = set(wrt)
    cot = Cotangents()
    for o, s in seeds.items():
        if o in wanted:
            cot.seed(o, s)
    for contributions in to_caller:
        cot.extend(c for c in contributions if c[0] in wanted)
    out = {}
    for w in dict.fromkeys(wrt):
        g = owned_totals[w] if w in owned_totals else cot.total(w)
        t = graph.types[w]
        # Read-only views on the object store (no copy), like the remote client's results.
        out[graph.nodes[w].name] = np.zeros(t.shape, t.dtype) if g is None else np.asarray(g)
    return out
