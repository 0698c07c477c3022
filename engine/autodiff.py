"""What a request touches, checked: the region between the requested inputs and the
outputs, feeds, seed cotangents, and evaluating one node.

The backward pass is a graph transform (engine/grad.py) over the region `plan_pass` finds:
a node's gradient is the sum of its consumers' contributions, added in one fixed order (by
consumer name, then input slot; an output's seed first). Names are unique and independent
of any schedule, so gradients are bit-identical whichever valid topological order is used
and whichever executor (local or partitioned) runs the graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine.errors import FeedError, RequestError, name_list
from graphgrad.engine.ir import Graph
from graphgrad.engine.ops import FLOAT_DTYPES, INPUT
from graphgrad.engine.plan_cache import DerivedCache, RequestKey


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What to compute: values of `outputs`, and gradients with respect to `wrt`."""

    outputs: tuple[str, ...]
    feeds: Mapping[str, np.ndarray]
    wrt: tuple[str, ...] = ()
    grad_outputs: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True, slots=True)
class PassPlan:
    """The positions a request touches, derived once from the graph and the request."""

    outputs: tuple[int, ...]
    wrt: tuple[int, ...]
    forward: tuple[int, ...]  # nodes to evaluate (excluding fed inputs), topological order
    backward: tuple[int, ...]  # nodes whose VJP runs, reverse topological order
    relevant: bytes  # 1 at each node on a path from some wrt node to some output, else 0
    needed_inputs: tuple[int, ...]  # graph inputs that must be fed


def plan_pass(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str] = ()
) -> PassPlan:
    """`seeded`: the outputs differentiated (the keys of grad_outputs; by default the first).

    Plans are cached per graph and request, so repeated runs of a registered graph skip this.
    """
    key = RequestKey(graph.serial, tuple(outputs), tuple(wrt), tuple(seeded))
    return _PASSES.get_or_make(key, lambda: _plan_pass(graph, outputs, wrt, seeded))


_PASSES: DerivedCache[RequestKey, PassPlan] = DerivedCache("pass plans")


def _plan_pass(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str]
) -> PassPlan:
    if not outputs:
        raise RequestError("no outputs requested", field="outputs")
    outs = tuple(graph.position(n, field="outputs") for n in outputs)
    wrts = tuple(graph.position(n, field="wrt") for n in wrt)
    for w in wrts:  # integer nodes hold labels and indices: nothing to differentiate
        if graph.types[w].dtype not in FLOAT_DTYPES:
            name = graph.nodes[w].name
            raise RequestError(
                f"wrt {name_list([name])} is {graph.types[w].dtype}: gradients are taken with "
                f"respect to {' or '.join(FLOAT_DTYPES)} nodes only",
                field="wrt",
            )
    # Seeds are checked here, where every path (executors, memory estimate) plans a request.
    for name in seeded:
        if graph.index.get(name) not in outs:
            field = f"grad_outputs[{name_list([name])}]"
            raise RequestError(f"{field} names no requested output", field=field)
    # Flags by position, and sweeps in topological order: linear, and cheap enough for the
    # first call of a request on a graph of 100,000 nodes (engine/eager.py).
    input_pos, n, ops = graph.input_pos, len(graph), graph.ops
    need = _ancestors(input_pos, n, outs)
    flags = np.frombuffer(need, dtype=np.uint8)
    needed: list[int] = np.flatnonzero(flags).tolist()
    leaves = [i for i in needed if not input_pos[i]]  # graph inputs and constants
    inputs = [i for i in leaves if ops[i] is INPUT]
    if inputs:
        flags = flags.copy()
        flags[inputs] = 0
    rel = bytes(n)
    backward: list[int] = []  # relevant nodes with a relevant input: their VJPs run
    if wrts:
        # Descendants of wrt nodes (`fed`: those with an input among them), among the needed.
        if set(leaves) <= set(wrts):  # every needed node descends from a wrt node
            reach = need
            fed = bytearray(need)
            for i in leaves:
                fed[i] = 0
        else:
            fed = bytearray(n)
            reach = bytearray(n)
            for w in wrts:
                reach[w] = 1
            for i in needed:
                for j in input_pos[i]:
                    if reach[j]:
                        fed[i] = reach[i] = 1
                        break
        # Relevant: descendants of wrt nodes that the differentiated outputs depend on (every
        # node between such a descendant and an output descends from it too).
        seeds = [graph.index[s] for s in seeded] or [outs[0]]
        upstream = need if set(seeds) == set(outs) else _ancestors(input_pos, n, seeds)
        relevant = np.frombuffer(upstream, dtype=np.uint8) & np.frombuffer(reach, dtype=np.uint8)
        rel = relevant.tobytes()
        backward = np.flatnonzero(relevant & np.frombuffer(fed, dtype=np.uint8))[::-1].tolist()
    return PassPlan(
        outputs=outs,
        wrt=wrts,
        forward=tuple(np.flatnonzero(flags).tolist()),
        backward=tuple(backward),
        relevant=rel,
        needed_inputs=tuple(inputs),
    )


def _ancestors(input_pos: Sequence[tuple[int, ...]], n: int, nodes: Sequence[int]) -> bytearray:
    """1 at `nodes` and every node they depend on: one sweep down the topological order,
    `rfind` (in C) skipping to the next node marked."""
    flags = bytearray(n)
    for o in nodes:
        flags[o] = 1
    i = max(nodes)
    find = flags.rfind
    while i >= 0:
        for j in input_pos[i]:
            flags[j] = 1
        i = find(1, 0, i)
    return flags


def check_feeds(
    graph: Graph, plan: PassPlan, feeds: Mapping[str, np.ndarray]
) -> dict[int, np.ndarray]:
    """Feeds by position, checked against declared shapes and dtypes."""
    values: dict[int, np.ndarray] = {}
    for name, value in feeds.items():
        i = graph.index.get(name)
        if i is None or graph.ops[i] is not INPUT:
            known = name_list(n.name for n in graph.inputs)
            raise FeedError(
                f"feed {name_list([name])} is not an input of the graph (inputs: {known})",
                input_name=name,
            )
        t = graph.types[i]
        if not isinstance(value, np.ndarray):
            raise FeedError(
                f"graph input '{name}' expects a numpy array, got {type(value).__name__}",
                input_name=name,
            )
        if not t.matches(value):
            raise FeedError(
                f"graph input '{name}' expects shape {t.shape} {t.dtype}, "
                f"got {value.shape} {_dtype_text(value.dtype)}",
                input_name=name,
            )
        values[i] = value
    missing = [graph.nodes[i].name for i in plan.needed_inputs if i not in values]
    if missing:
        raise FeedError(
            f"missing feed for graph input(s) {name_list(missing)}",
            input_name=missing[0],
        )
    return values


def seed_cotangents(
    graph: Graph, plan: PassPlan, grad_outputs: Mapping[str, np.ndarray] | None
) -> dict[int, np.ndarray]:
    """Seed cotangents: of the outputs named in `grad_outputs`, or else of the first output.

    Without `grad_outputs` the first output is the one differentiated (it must be a scalar,
    seeded with 1) and the other outputs are auxiliary values, as in JAX's value_and_grad.
    Given `grad_outputs` are checked even when nothing is differentiated (no `wrt`); `plan`
    must come from `plan_pass` with their names as `seeded`, which checked those names.
    """
    if not plan.wrt and not grad_outputs:
        return {}
    if not grad_outputs:
        first, t = plan.outputs[0], graph.types[plan.outputs[0]]
        if t.shape != ():
            raise RequestError(
                f"output '{graph.nodes[first].name}' has shape {t.shape}: gradients of a "
                "non-scalar output need grad_outputs (a seed cotangent of the same shape)",
                field="grad_outputs",
            )
        return {first: np.ones((), dtype=t.dtype)}
    seeds: dict[int, np.ndarray] = {}
    for name, seed in grad_outputs.items():
        o = graph.index[name]  # a requested output: plan_pass(..., seeded) checked it
        field = f"grad_outputs[{name_list([name])}]"
        t = graph.types[o]
        if not t.matches(seed):
            raise RequestError(
                f"{field} must have shape {t.shape} {t.dtype}, got {seed.shape} {seed.dtype.name}",
                field=field,
            )
        seeds[o] = seed
    return seeds if plan.wrt else {}


def owned(a: np.ndarray) -> np.ndarray:
    """A writeable ndarray that owns its memory (VJPs may return broadcast views or scalars)."""
    a = np.asarray(a)
    return a if a.flags.writeable and a.flags.owndata else a.copy()


def _dtype_text(dtype: np.dtype) -> str:
    """A feed's dtype as an error says it: by name, and by code where the byte order is not
    this machine's (a '>f8' array is float64 by name, yet no float64 input takes it)."""
    if dtype.isnative:
        return dtype.name
    order = "big-endian" if dtype.byteorder == ">" else "little-endian"
    return f"{dtype.str} ({order}: convert with .astype('{dtype.name}'))"
