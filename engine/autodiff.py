"""Forward and backward passes over a validated graph.

The backward pass walks reverse topological order over the nodes between the requested
inputs and the outputs. A node's gradient is the sum of its consumers' contributions, added
in one fixed order (by consumer name, then input slot; an output's seed first). Names are
unique and independent of any schedule, so gradients are bit-identical whichever valid
topological order is used and whichever executor (local or partitioned) runs the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ExecutionError, FeedError, RequestError, name_list
from .ir import Graph
from .ops import INPUT, Op, TensorType


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
    relevant: frozenset[int]  # nodes on a path from some wrt node to some output
    needed_inputs: tuple[int, ...]  # graph inputs that must be fed
    uses: dict[int, int]  # how many times each value is read (forward and VJPs), to free it


def plan_pass(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str] = ()
) -> PassPlan:
    """`seeded`: the outputs differentiated (the keys of grad_outputs; by default the first).

    Plans are memoised on the graph, so repeated runs of a registered graph skip this work.
    """
    key = ("pass", tuple(outputs), tuple(wrt), tuple(seeded))
    return graph.memo(key, lambda: _plan_pass(graph, outputs, wrt, seeded))


def _plan_pass(
    graph: Graph, outputs: Sequence[str], wrt: Sequence[str], seeded: Sequence[str]
) -> PassPlan:
    if not outputs:
        raise RequestError("no outputs requested", field="outputs")
    outs = tuple(graph.position(n, field="outputs") for n in outputs)
    wrts = tuple(graph.position(n, field="wrt") for n in wrt)
    # Seeds are checked here, where every path (executors, memory estimate) plans a request.
    for name in seeded:
        if graph.index.get(name) not in outs:
            field = f"grad_outputs[{name_list([name])}]"
            raise RequestError(f"{field} names no requested output", field=field)
    needed = graph.ancestors(outs)
    relevant: set[int] = set()
    if wrts:
        diff = [graph.index[n] for n in seeded] or [outs[0]]
        # Descendants of wrt nodes, restricted to what the differentiated outputs depend on.
        reach = set(wrts)
        for i in needed:
            if i in reach or any(j in reach for j in graph.input_pos[i]):
                reach.add(i)
        relevant = reach & set(graph.ancestors([o for o in diff if o in reach]))
    backward = tuple(
        i
        for i in reversed(needed)
        if i in relevant and any(j in relevant for j in graph.input_pos[i])
    )
    forward = tuple(i for i in needed if graph.ops[i] is not INPUT)
    uses: Counter[int] = Counter()
    for i in forward:
        uses.update(graph.input_pos[i])
    for i in backward:
        uses[i] += 1
        uses.update(graph.input_pos[i])
    return PassPlan(
        outputs=outs,
        wrt=wrts,
        forward=forward,
        backward=backward,
        relevant=frozenset(relevant),
        needed_inputs=tuple(i for i in needed if graph.ops[i] is INPUT),
        uses=dict(uses),
    )


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
                f"got {value.shape} {value.dtype.name}",
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


@dataclass(frozen=True, slots=True)
class Step:
    """One node with everything a pass needs looked up once (passes run it many times)."""

    node: int
    name: str
    op: Op
    attrs: Mapping[str, Any]
    inputs: tuple[int, ...]
    type: TensorType
    input_types: tuple[TensorType, ...]
    wants: tuple[bool, ...]  # which inputs need a gradient


def steps(graph: Graph, nodes: Sequence[int], relevant: frozenset[int] = frozenset()) -> list[Step]:
    def make(i: int) -> Step:
        ins = graph.input_pos[i]
        return Step(
            i,
            graph.nodes[i].name,
            graph.ops[i],
            graph.nodes[i].attrs,
            ins,
            graph.types[i],
            tuple(graph.types[j] for j in ins),
            tuple(j in relevant for j in ins),
        )

    return [make(i) for i in nodes]


def compiled(graph: Graph, plan: PassPlan) -> tuple[list[Step], list[Step]]:
    """The forward and backward steps of a plan, memoised on the graph."""
    key = ("steps", plan.outputs, plan.wrt, plan.relevant)
    return graph.memo(
        key, lambda: (steps(graph, plan.forward), steps(graph, plan.backward, plan.relevant))
    )


def evaluate(step: Step, values: Mapping[int, np.ndarray]) -> np.ndarray:
    """The value of the step's node, its inputs being in `values`."""
    try:
        out = np.asarray(step.op.forward([values[j] for j in step.inputs], step.attrs))
    except (ValueError, ArithmeticError) as e:
        raise ExecutionError(f"op '{step.op.name}' failed: {e}", node=step.name) from e
    if not step.type.matches(out):
        raise AssertionError(
            f"op '{step.op.name}' computed {out.shape} {out.dtype} for node "
            f"'{step.name}', its type is {step.type.shape} {step.type.dtype}"
        )
    return out


Contribution = tuple[int, str, int, np.ndarray]  # (node, consumer name, input slot, value)


class Cotangents:
    """Gradient contributions per node, summed in the fixed order of the module docstring."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: dict[int, list[tuple[tuple[str, int], np.ndarray]]] = {}

    def add(self, node: int, consumer: str, slot: int, value: np.ndarray) -> None:
        self._parts.setdefault(node, []).append(((consumer, slot), value))

    def seed(self, node: int, value: np.ndarray) -> None:
        self.add(node, "", 0, value)  # node names are never empty: the seed sorts first

    def extend(self, contributions: Iterable[Contribution]) -> None:
        for node, consumer, slot, value in contributions:
            self.add(node, consumer, slot, value)

    def pop(self, nodes: Iterable[int]) -> list[Contribution]:
        """Remove and return the contributions to `nodes`, to ship them to another task."""
        return [(n, k[0], k[1], v) for n in nodes for k, v in self._parts.pop(n, ())]

    def drain(self) -> list[Contribution]:
        """Remove and return every contribution still held."""
        return self.pop(list(self._parts))

    def total(self, node: int) -> np.ndarray | None:
        """Remove the node's contributions and return their sum (None when there are none)."""
        parts = self._parts.pop(node, None)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0][1]
        parts.sort(key=lambda kv: kv[0])
        acc = parts[0][1]
        for _, v in parts[1:]:
            acc = acc + v
        return acc


def backward_step(
    step: Step, g: np.ndarray, values: Mapping[int, np.ndarray], cot: Cotangents
) -> None:
    """Run the node's VJP with cotangent g and hand each relevant input its contribution."""
    op = step.op
    assert op.vjp is not None, f"op '{op.name}' has no VJP"
    try:
        grads = op.vjp(
            g, [values[j] for j in step.inputs], values[step.node], step.attrs, step.wants
        )
    except (ValueError, ArithmeticError) as e:
        raise ExecutionError(f"gradient of op '{op.name}' failed: {e}", node=step.name) from e
    if len(grads) != len(step.inputs):
        raise AssertionError(
            f"VJP of op '{op.name}' returned {len(grads)} gradients for {len(step.inputs)} inputs"
        )
    for slot, (j, dj, want, t) in enumerate(
        zip(step.inputs, grads, step.wants, step.input_types, strict=True)
    ):
        if want and dj is not None:
            if not t.matches(dj):
                raise AssertionError(
                    f"VJP of op '{op.name}' gave {dj.shape} {dj.dtype} for "
                    f"input {slot}, expected {t.shape} {t.dtype}"
                )
            cot.add(j, step.name, slot, dj)


def owned(a: np.ndarray) -> np.ndarray:
    """A writeable ndarray that owns its memory (VJPs may return broadcast views or scalars)."""
    a = np.asarray(a)
    return a if a.flags.writeable and a.flags.owndata else a.copy()
