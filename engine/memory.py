"""A request's peak memory, from declared shapes and the schedule the local executor runs.

The estimate replays the executor's bookkeeping without computing anything: values appear
when their node runs and are freed after their last read (forward or VJP; outputs are kept),
gradient contributions are held until their node's VJP sums them, wrt gradients (zero ones
included) are kept to the end, and the response holds a copy of every value and gradient
plus its serialized form. Linear in the graph; cached with the plan. Every executor is
admitted by this one schedule: the partitioned one frees no later and holds no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .autodiff import PassPlan, plan_pass
from .ir import Graph


@dataclass(frozen=True, slots=True)
class RequestMemory:
    peak: int  # the most bytes held at once, response included
    kept: int  # values alive at the worst point of the passes (kept for the backward, feeds)
    grads: int  # the wrt gradients returned, zero ones included
    response: int  # values and gradients in the response message and its serialized form

    def __str__(self) -> str:
        return (
            f"about {self.peak} bytes at its peak ({self.kept} in values held while running, "
            f"{self.grads} in gradients, {self.response} in the response)"
        )


def request_memory(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str] = ()
) -> RequestMemory:
    """The estimate for `run(outputs, wrt, grad_outputs with keys `seeded`)`; no feeds needed."""
    plan = plan_pass(graph, outputs, wrt, seeded)
    key = ("request-memory", tuple(outputs), tuple(wrt), tuple(seeded))
    diff = [graph.index[n] for n in seeded] or list(plan.outputs[:1])
    mem: RequestMemory = graph.memo(key, lambda: _replay(graph, plan, diff))
    return mem


def _replay(graph: Graph, plan: PassPlan, seeded: list[int]) -> RequestMemory:
    size = [t.nbytes for t in graph.types]
    uses = dict(plan.uses)
    pinned = set(plan.outputs)
    live = sum(size[i] for i in plan.needed_inputs)
    peak = live

    def release(nodes: Sequence[int]) -> int:
        freed = 0
        for j in nodes:
            uses[j] = uses.get(j, 0) - 1
            if uses[j] == 0 and j not in pinned:
                freed += size[j]
        return freed

    for i in plan.forward:
        live += size[i]
        peak = max(peak, live)
        live -= release(graph.input_pos[i])

    wanted = set(plan.wrt)
    # Contributions waiting per node; seeds are the first ones (of the outputs differentiated).
    pending: dict[int, int] = {}
    if plan.wrt:
        for o in seeded:
            pending[o] = size[o]
    held = sum(pending.values())  # contributions not yet summed
    grads = 0
    for i in plan.backward:
        parts = pending.pop(i, 0)
        g = size[i] if parts else 0
        peak = max(peak, live + held + g + grads)  # the parts and their sum, at once
        held -= parts
        if g:
            for j in graph.input_pos[i]:
                if j in plan.relevant:
                    pending[j] = pending.get(j, 0) + size[j]
                    held += size[j]
            peak = max(peak, live + held + g + grads)
            if i in wanted:
                grads += g
        live -= release((i, *graph.input_pos[i]))
    kept = peak
    # Every wrt node gets a gradient of its own size: summed at the end, or zeros.
    grads = sum(size[w] for w in wanted)
    values = sum(size[o] for o in pinned)
    response = 2 * (values + grads)
    peak = max(peak, live + held + grads + response)
    return RequestMemory(peak, kept, grads, response)
