"""Cost model and partitioner, and partitioned execution (without Ray) against local."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphgrad as gg
from graphgrad.engine import (
    Cancellation,
    CancelledError,
    Graph,
    LocalExecutor,
    Node,
    RunRequest,
)
from graphgrad.engine.autodiff import plan_pass
from graphgrad.engine.planner import may_prefer_ray, node_costs, partition, prefers_ray

from .strategies import random_graphs, random_requests


def run_partitioned(graph: Graph, request: RunRequest, min_seconds: float = 0.0):
    """The real driver with the inline runner, over the partitions Ray would get."""
    executor = LocalExecutor(min_partition_seconds=min_seconds)
    res = executor.run(graph, request)
    return res.values, res.grads, executor.plan(graph, request)[0]


def wide_graph(branches=8, layers=4, n=256, d=512):
    with gg.Graph() as g:
        total = None
        for b in range(branches):
            h = gg.input(f"x{b}", shape=(n, d), dtype="float32")
            for k in range(layers):
                h = gg.tanh(h @ gg.input(f"W{b}_{k}", shape=(d, d), dtype="float32"))
            term = gg.mean(h * h)
            total = term if total is None else total + term
    wrt = [f"W{b}_{k}" for b in range(branches) for k in range(layers)]
    return g.freeze(), total, wrt


def test_matmul_cost_is_two_m_n_k():
    graph, _, _ = wide_graph(branches=1, layers=1)
    costs = node_costs(graph)
    mm = next(i for i, n in enumerate(graph.nodes) if n.op == "matmul")
    assert costs[mm].flops == 2 * 256 * 512 * 512


def test_independent_branches_stay_apart_and_chains_are_fused():
    graph, out, wrt = wide_graph()
    plan = partition(graph, plan_pass(graph, [out.name], wrt))
    # One partition per branch, plus the small join (the sum of the branch losses): folded
    # into a branch, it would make that branch wait for all the others, forward and backward.
    assert len(plan.partitions) == 9
    *branches, join = plan.partitions
    for p in branches:
        inputs = {
            graph.nodes[j].name[1:].split("_")[0]
            for i in p.nodes
            for j in graph.input_pos[i]
            if graph.nodes[j].op == "input"
        }
        assert len(inputs) == 1  # a partition holds one branch
    assert {graph.nodes[i].op for i in join.nodes} == {"add"}
    cross = [c for c in plan.cuts if c.src >= 0]
    assert len(cross) == 8 and all(c.dst == join.index and c.bytes <= 8 for c in cross)
    assert plan.critical_seconds < 1.1 * branches[0].seconds + join.seconds  # branches overlap
    # 36 MB of fed inputs to stage into Ray's object store outweigh the parallel gain on 2
    # CPUs (bench/wide.py measures it); with 8 CPUs the branches pay for it.
    assert not prefers_ray(plan, cpus=2)
    assert prefers_ray(plan, cpus=8)


def test_small_graphs_are_one_partition_and_stay_inline():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        a, b = gg.sin(x), gg.cos(x)
        y = gg.sum(a * b)
    graph = g.freeze()
    plan = partition(graph, plan_pass(graph, [y.name], ["x"]))
    assert len(plan.partitions) == 1 and not prefers_ray(plan, cpus=8)


@given(random_graphs(max_nodes=40))
def test_partitions_cover_every_node_once_and_form_a_dag(case):
    nodes, _, out, wrt = case
    graph = Graph(nodes)
    pp = plan_pass(graph, [out], wrt)
    plan = partition(graph, pp, min_seconds=0.0)
    covered = [i for p in plan.partitions for i in p.nodes]
    assert sorted(covered) == sorted(pp.forward)
    for c in plan.cuts:
        assert c.src < c.dst  # partitions are in topological order


@settings(max_examples=300)
@given(random_graphs(max_nodes=40), st.sampled_from([0.0, 1e-5, 1e-4]))
def test_partitioned_execution_is_bit_identical_to_local(case, min_seconds):
    nodes, feeds, out, wrt = case
    graph = Graph(nodes)
    request = RunRequest((out, wrt[-1]), feeds, tuple(wrt))
    local = LocalExecutor().run(graph, request)
    values, grads, _ = run_partitioned(graph, request, min_seconds)
    for k, v in local.values.items():
        assert values[k].tobytes() == v.tobytes()
    for k, g in local.grads.items():
        assert grads[k].tobytes() == g.tobytes(), k


def test_many_partitions_and_a_value_feeding_several_partitions():
    # x -> z = x*x feeds two branches; y = f(z, x) in the lecture's multiple-paths shape.
    with gg.Graph() as g:
        x = gg.input("x", shape=(4,))
        z = gg.mul(x, x, name="z")
        branches = [gg.sin(z * float(k)) + x for k in range(1, 6)]
        gg.sum(gg.concat(branches) / gg.concat([z] * 5), name="y")
    graph = g.freeze()
    request = RunRequest(("y",), {"x": np.array([0.3, -0.7, 1.1, 2.0])}, ("x", "z"))
    _values, grads, parts = run_partitioned(graph, request)
    assert len(parts.partitions) >= 6
    assert sum(1 for c in parts.cuts if graph.nodes[c.node].name == "z") >= 5
    local = LocalExecutor().run(graph, request)
    assert grads["x"].tobytes() == local.grads["x"].tobytes()
    assert grads["z"].tobytes() == local.grads["z"].tobytes()


def wide_negations(n: int) -> Graph:
    """x -> n `neg` -> concat -> sum: one join of n branches (bench/planning.py times it)."""
    nodes = [Node("x", "input", shape=(4,), dtype="float64")]
    nodes += [Node(f"n{i}", "neg", ("x",)) for i in range(n)]
    nodes += [Node("c", "concat", tuple(f"n{i}" for i in range(n))), Node("L", "sum", ("c",))]
    return Graph(nodes)


def test_a_wide_graph_of_100k_nodes_is_planned_whole():
    """Every forward node of a 100k-way join lands in exactly one partition."""
    graph = wide_negations(100_000)
    pp = plan_pass(graph, ["L"], ["x"])
    plan = partition(graph, pp)
    assert sorted(i for p in plan.partitions for i in p.nodes) == sorted(pp.forward)


def test_an_expired_deadline_stops_planning():
    graph = wide_negations(20_000)
    pp = plan_pass(graph, ["L"], ["x"])
    with pytest.raises(CancelledError, match="deadline"):
        partition(graph, pp, cancel=Cancellation(deadline=time.monotonic() - 1.0))
    cancelled = Cancellation()
    cancelled.cancel()
    with pytest.raises(CancelledError, match="cancelled"):
        partition(graph, pp, cancel=cancelled)


def test_auto_rules_out_ray_before_partitioning_small_work():
    small = wide_negations(200)
    assert not may_prefer_ray(small, plan_pass(small, ["L"], ["x"]), cpus=8)
    graph, out, wrt = wide_graph()
    pp = plan_pass(graph, [out.name], wrt)
    assert not may_prefer_ray(graph, pp, cpus=1)
    assert may_prefer_ray(graph, pp, cpus=8)
    # The bound never rules out a plan the full cost model would choose.
    assert prefers_ray(partition(graph, pp), 8)


def test_an_output_named_twice_needs_each_input_once():
    # Found by review: each copy of a repeated output added its leaves again, so a prepared
    # run listed its feeds twice (and exact decoding never matched).
    graph = Graph(
        [
            Node("x", "input", shape=(3,), dtype="float64"),
            Node("y", "input", shape=(3,), dtype="float64"),
            Node("z", "mul", ("x", "y")),
        ]
    )
    for outputs in (["x", "x", "y"], ["z", "z"], ["z", "x", "z", "x"]):
        pp = plan_pass(graph, outputs, [])
        assert sorted(pp.needed_inputs) == sorted(set(pp.needed_inputs)), outputs
    assert plan_pass(graph, ["x", "x", "y"], []).needed_inputs == (0, 1)


def reference_plan(graph: Graph, outputs, wrt, seeded):
    """plan_pass's region by its definitions, with sets: the nodes the outputs need, the
    descendants of wrt nodes among them, the relevant ones (those the seeded outputs also
    depend on) and the nodes whose VJP runs (relevant, with an input descending from wrt)."""
    pos = graph.index

    def ancestors(names):
        seen, todo = set(), [pos[n] for n in names]
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo += graph.input_pos[i]
        return seen

    need = ancestors(outputs)
    reach = set()
    for i in sorted(need):
        if i in {pos[w] for w in wrt} or any(j in reach for j in graph.input_pos[i]):
            reach.add(i)
    relevant = reach & ancestors(seeded or outputs[:1]) if wrt else set()
    backward = [
        i for i in sorted(relevant, reverse=True) if any(j in reach for j in graph.input_pos[i])
    ]
    forward = [i for i in sorted(need) if graph.nodes[i].op != "input"]
    return forward, backward, relevant


@settings(max_examples=80)
@given(random_requests(), st.booleans())
def test_plan_pass_finds_the_region_its_definitions_give(case, every_leaf):
    """Over random requests, and with wrt naming every input and constant (where the plan
    takes every needed node as a descendant of one without a sweep)."""
    nodes, request = case
    graph = Graph(nodes)
    wrt = request.wrt
    if every_leaf:
        wrt = tuple(n.name for n in nodes if n.op in ("input", "constant"))
    seeded = tuple(request.grad_outputs or ())
    pp = plan_pass(graph, request.outputs, wrt, seeded)
    forward, backward, relevant = reference_plan(graph, request.outputs, wrt, seeded)
    assert list(pp.forward) == forward and list(pp.backward) == backward
    assert {i for i, flag in enumerate(pp.relevant) if flag} == relevant
