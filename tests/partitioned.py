"""Run a partitioned plan by hand, task by task in topological order, without Ray: the same
task bodies the Ray executor ships, so the algorithm can be tested on hundreds of graphs."""

from __future__ import annotations

from graphgrad.engine import Graph, RunRequest
from graphgrad.engine.autodiff import check_feeds, plan_pass, seed_cotangents
from graphgrad.engine.planner import partition
from graphgrad.engine.tasks import (
    gradient_totals,
    run_backward,
    run_forward,
    task_specs,
    unowned_value,
)


def run_partitioned(graph: Graph, request: RunRequest, min_seconds: float = 0.0):
    seeded = tuple(request.grad_outputs or ())
    plan = plan_pass(graph, request.outputs, request.wrt, seeded)
    feeds = check_feeds(graph, plan, request.feeds)
    seeds = seed_cotangents(graph, plan, request.grad_outputs)
    parts = partition(graph, plan, min_seconds=min_seconds)
    seeded_pos = tuple(seeds)
    specs = task_specs(graph, plan, parts, seeded_pos, "test")
    exports, saved = {}, {}
    for s in specs:
        exports[s.index], saved[s.index], _ = run_forward(
            graph, s, feeds, [exports[q] for q in s.upstream], "here"
        )
    to_parts, to_caller, owned_totals = {}, [], {}
    for s in reversed(specs):
        if plan.wrt and s.has_backward:
            values = {**saved[s.index], **{j: feeds[j] for j in s.saved_feeds}}
            tp, tc, g, _ = run_backward(
                graph,
                s,
                values,
                {o: seeds[o] for o in s.seeds},
                [to_parts[q] for q in s.downstream if q in to_parts],
                "here",
            )
            to_parts[s.index] = tp
            to_caller.append(tc)
            owned_totals.update(g)
    values = {
        graph.nodes[o].name: exports[parts.owner[o]][o]
        if o in parts.owner
        else unowned_value(graph, o, feeds)
        for o in plan.outputs
    }
    caller_seeds = {o: v for o, v in seeds.items() if o not in parts.owner}
    grads = gradient_totals(graph, plan.wrt, caller_seeds, to_caller, owned_totals)
    return values, grads, parts
