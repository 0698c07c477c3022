"""A request's peak memory, from declared shapes and the programs the driver runs.

The estimate replays the local executor's schedule (engine/driver.py) without computing
anything, both ways the driver runs it: its tasks (the forward program, the backward program
of the gradient nodes, the caller's) one after another, and all their nodes as the one
inline program of an in-process run; each node in the order its compiled program runs it. Fed
values and seed cotangents are held throughout; a value a task makes is freed after its last
read in that task unless later tasks or the response read it (the driver holds every task's
exports until the caller's task has run); a node whose kernel is more than one numpy call
may hold two temporaries the size of its largest operand while it runs, and any op numpy's
iteration buffers; gradients are copied out, and the response holds a copy of every value
and gradient plus its serialized form. Constants are the program's (the plan cache counts
them), and in-place ops, shared subexpressions and folded constants only allocate less, so
the replay bounds the arrays a run allocates (tests/test_memory_bounds.py measures it; the
interpreter's own objects, a few KiB, are left out). Linear in the schedule; kept in a
bounded cache beside the schedule. The partitioned executors run the same nodes in the same
tasks' order on workers, and the caller of a Ray run holds no more than the exports it
gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.driver import Schedule
from graphgrad.engine.executor import LocalExecutor, request_key
from graphgrad.engine.ir import Graph
from graphgrad.engine.kernel_bytes import step_extra
from graphgrad.engine.ops import CONSTANT
from graphgrad.engine.plan_cache import DerivedCache, RequestKey


@dataclass(frozen=True, slots=True)
class RequestMemory:
    peak: int  # the most bytes held at once, response included
    kept: int  # the most bytes held while the tasks run (feeds, values, their temporaries)
    grads: int  # the wrt gradients returned, zero ones included
    response: int  # values and gradients in the response message and its serialized form

    def __str__(self) -> str:
        return (
            f"about {self.peak} bytes at its peak ({self.kept} in values held while running, "
            f"{self.grads} in gradients, {self.response} in the response)"
        )


# Kept in the plan cache's budget, beside the schedules they replay.
_ESTIMATES: DerivedCache[RequestKey, RequestMemory] = DerivedCache("request memory")
_PLANNER = LocalExecutor()
_ANY = np.empty(0)  # planning reads only which outputs are seeded, not the seeds


def request_memory(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str] = ()
) -> RequestMemory:
    """The estimate for `run(outputs, wrt, grad_outputs with keys `seeded`)`; no feeds needed."""
    request = RunRequest(
        tuple(outputs), {}, tuple(wrt), {s: _ANY for s in seeded} if seeded else None
    )
    return _ESTIMATES.get_or_make(
        request_key(graph, request), lambda: replay(_PLANNER.plan(graph, request)[1])
    )


def replay(sched: Schedule) -> RequestMemory:
    """The bytes a run of `sched` holds at its worst point: its tasks one after another (a
    partitioned run, and the driver's caller on Ray), or every node of them as one program
    (the local executor's inline run), whichever holds more."""
    graph = sched.graph
    size = [t.nbytes for t in graph.types]
    fed = sum(size[i] for i in {*sched.feed_pos.values(), *sched.seeds.values()})
    held = kept = fed  # feeds, then also the exports of the tasks run so far
    for task in sched.tasks:
        peak, exported = _program_peak(graph, size, task.nodes, task.exports)
        kept = max(kept, held + peak)
        held += exported
    wanted = (*sched.outputs, *sched.grads)
    every = sorted({i for t in sched.tasks for i in t.nodes})  # positions: topological
    peak, exported = _program_peak(graph, size, every, wanted)
    kept = max(kept, fed + peak)
    held = max(held, fed + exported)
    values = sum(size[i] for i in set(sched.outputs))
    grads = sum(size[g] for g in sched.grads)  # each copied out (they may be views)
    response = 2 * (values + grads)
    return RequestMemory(max(kept, held + grads + response), kept, grads, response)


def _program_peak(
    graph: Graph, size: list[int], nodes: Sequence[int], exports: Sequence[int]
) -> tuple[int, int]:
    """The most bytes a program of `nodes` holds at once beyond what it reads, and the bytes
    of the values it makes and exports (held after it)."""
    input_pos, ops = graph.input_pos, graph.ops
    mine = [i for i in nodes if ops[i] is not CONSTANT]
    made = set(mine)
    keep = set(exports)
    last: dict[int, int] = {}  # the last read of each value made here
    for k, i in enumerate(mine):
        for j in input_pos[i]:
            if j in made:
                last[j] = k
    live = peak = 0
    for k, i in enumerate(mine):
        ins = input_pos[i]
        live += size[i]
        peak = max(peak, live + step_extra(ops[i].name, size[i], [size[j] for j in ins]))
        for j in ins:
            if last.get(j) == k and j in made and j not in keep:
                live -= size[j]
                made.discard(j)  # freed once (an op may read it twice)
        if i not in last and i not in keep:
            live -= size[i]  # read by no later node here: dropped at once
    return peak, sum(size[i] for i in keep & set(mine))
