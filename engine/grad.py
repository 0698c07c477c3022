"""Reverse-mode differentiation as a graph transform.

`grad_graph` walks reverse topological order over the nodes between `wrt` and the
differentiated outputs (the region `plan_pass` computes) and, for each node, asks its op's
`grad` rule to emit the nodes of its VJP. Where a value feeds several consumers, its
cotangent is an explicit chain of `add` nodes over their contributions in the fixed order of
engine/autodiff.py (an output's seed first, then by consumer name, then input slot), so the
result is bit-identical to the interpreted backward pass whatever runs it. The result is an
ordinary graph: differentiating it again gives second derivatives, and the VJP of a
gradient is a Hessian-vector product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphgrad.engine.autodiff import plan_pass
from graphgrad.engine.errors import RequestError, name_list
from graphgrad.engine.ir import MAX_NAME_LENGTH, Graph, Node
from graphgrad.engine.ops import CONSTANT, INPUT, Op, TensorType, lookup

ADD = lookup("add")


@dataclass(frozen=True, slots=True)
class GradGraph:
    """A graph holding the primal nodes and the gradient nodes.

    `grads[k]` names the node holding the gradient with respect to `wrt[k]` (a repeated
    name gets the same node); `seeds` maps each seeded output to the input node that is fed
    its cotangent (absent for a scalar output seeded with 1 by default)."""

    graph: Graph
    grads: tuple[str, ...]
    seeds: Mapping[str, str]
    # gradient node -> the primal node it belongs to (whose VJP or cotangent sum it is): the
    # partitioned driver runs it in that node's partition's backward task
    owners: Mapping[str, str]


class _Emitter:
    """New nodes beside the existing ones, typed as they are made (the `Emitter` of
    engine/ops/_registry.py)."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph
        self.nodes: list[Node] = []
        self.ops: list[Op] = []
        self._types: dict[str, TensorType] = {}
        # op name and input types -> output type, for ops without attributes: most emitted
        # nodes repeat a few elementwise signatures, whose shape rule need not run again
        self._inferred: dict[tuple[Any, ...], TensorType] = {}
        self._count = 0
        self._consts: dict[tuple[float, str], str] = {}
        self.owner = ""  # the node whose VJP is being emitted: names and owns its nodes
        self.owners: dict[str, str] = {}

    def type(self, name: str) -> TensorType:
        i = self._graph.index.get(name)
        return self._graph.types[i] if i is not None else self._types[name]

    def types(self) -> list[TensorType]:
        return [self._types[n.name] for n in self.nodes]

    def fresh(self, base: str) -> str:
        """An unused name from `base` (deterministic: the same graph gives the same names)."""
        name = base
        while len(name) > MAX_NAME_LENGTH or name in self._graph.index or name in self._types:
            self._count += 1
            name = f"{base[: MAX_NAME_LENGTH - 24]}#{self._count}"
        return name

    def add(self, node: Node, t: TensorType, op: Op | None = None) -> str:
        op = op or lookup(node.op)
        if op is not CONSTANT and op is not INPUT:
            self.owners[node.name] = self.owner
        self.nodes.append(node)
        self.ops.append(op)
        self._types[node.name] = t
        return node.name

    def emit(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None) -> str:
        o = lookup(op)
        types = tuple([self.type(x) for x in inputs])
        if attrs:
            t = o.infer(list(types), dict(attrs))
        else:
            key = (op, *[(x.shape, x.dtype) for x in types])  # hashed in C
            t = self._inferred.get(key)  # type: ignore[assignment]
            if t is None:
                t = self._inferred[key] = o.infer(list(types), {})
        name = self.fresh(f"vjp({self.owner}).{len(self.nodes)}")
        return self.add(Node(name, op, tuple(inputs), attrs or {}), t, o)

    def const(self, value: float, like: str) -> str:
        dtype = self.type(like).dtype
        key = (value, dtype)
        if key not in self._consts:
            node = Node(
                self.fresh(f"const({value!r}:{dtype})"),
                CONSTANT.name,
                (),
                {"value": np.asarray(value, dtype=dtype)},
            )
            self._consts[key] = self.add(node, TensorType((), dtype))
        return self._consts[key]


def grad_graph(
    graph: Graph,
    outputs: Sequence[str],
    wrt: Sequence[str],
    seeded: Sequence[str] = (),
    seed_nodes: Mapping[str, str] | None = None,
) -> GradGraph:
    """The gradients of `outputs` with respect to `wrt`, as nodes added to `graph`.

    `seeded` names the differentiated outputs, each seeded with a cotangent fed to a new
    input node (or, given `seed_nodes`, held by an existing node); without `seeded` the first
    output is differentiated and must be a scalar (seeded with 1). A `wrt` node the outputs
    do not depend on gets zeros.
    """
    plan = plan_pass(graph, outputs, wrt, tuple(seeded))
    em = _Emitter(graph)
    parts: dict[int, list[tuple[tuple[str, int], str]]] = {}
    seeds: dict[str, str] = {}
    if plan.wrt:
        for o in [graph.position(n, field="grad_outputs") for n in seeded] or [plan.outputs[0]]:
            name, t = graph.nodes[o].name, graph.types[o]
            if seeded:
                seed = (seed_nodes or {}).get(name)
                if seed is None:
                    node = Node(em.fresh(f"seed({name})"), INPUT.name, (), {}, t.shape, t.dtype)
                    seed = em.add(node, t)
                    seeds[name] = seed
                elif em.type(seed) != t:
                    raise RequestError(
                        f"the seed of {name_list([name])} must be {t.shape} {t.dtype}, "
                        f"node '{seed}' is {em.type(seed).shape} {em.type(seed).dtype}",
                        field="grad_outputs",
                    )
            elif t.shape != ():
                raise RequestError(
                    f"output '{name}' has shape {t.shape}: gradients of a non-scalar output "
                    "need grad_outputs (a seed cotangent of the same shape)",
                    field="grad_outputs",
                )
            else:
                seed = em.const(1, name)
            parts.setdefault(o, []).append((("", 0), seed))  # names are never empty: first

    totals: dict[int, str | None] = {}

    def total(i: int) -> str | None:
        """The node's cotangent: its contributions added in the fixed order (memoised)."""
        if i not in totals:
            mine = sorted(parts.pop(i, ()), key=lambda kv: kv[0])
            acc = mine[0][1] if mine else None
            base = em.owner = graph.nodes[i].name
            for k, (_, v) in enumerate(mine[1:], 1):
                assert acc is not None
                name = em.fresh(f"grad({base})" if k == len(mine) - 1 else f"grad({base})+{k}")
                acc = em.add(Node(name, "add", (acc, v)), graph.types[i], ADD)
            totals[i] = acc
        return totals[i]

    for i in plan.backward:
        g = total(i)
        if g is None:
            continue
        node, op = graph.nodes[i], graph.ops[i]
        ins = graph.input_pos[i]
        wants = [bool(plan.relevant[j]) for j in ins]
        if op.grad is None:
            raise AssertionError(f"op '{op.name}' has no gradient rule")
        em.owner = node.name
        grads = op.grad(em, g, node.inputs, node.name, node.attrs, wants)
        if len(grads) != len(ins):
            raise AssertionError(
                f"gradient rule of op '{op.name}' gave {len(grads)} gradients for {len(ins)} inputs"
            )
        for slot, (j, dj, want) in enumerate(zip(ins, grads, wants, strict=True)):
            if want and dj is not None:
                got = em.type(dj)
                if got is not graph.types[j] and got != graph.types[j]:
                    raise AssertionError(
                        f"gradient rule of op '{op.name}' gave {em.type(dj)} for input {slot} "
                        f"of '{node.name}', expected {graph.types[j]}"
                    )
                parts.setdefault(j, []).append(((node.name, slot), dj))

    names: dict[int, str] = {}
    for w in dict.fromkeys(plan.wrt):
        g = total(w)
        if g is None:  # no path from w to a differentiated output: zeros of its type
            t = graph.types[w]
            em.owner = graph.nodes[w].name
            zero = em.const(0, graph.nodes[w].name)
            g = zero if t.shape == () else em.emit("broadcast_to", [zero], {"shape": t.shape})
        names[w] = g
    full = Graph.extended(graph, em.nodes, em.ops, em.types()) if em.nodes else graph
    return GradGraph(full, tuple(names[w] for w in plan.wrt), seeds, em.owners)
