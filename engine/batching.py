"""The batching transform: N structurally identical networks stacked along a new leading axis.

`batch_graph(template, batched, n)` rewrites a template graph (one network) into one graph
computing all n networks at once: inputs named in `batched` gain a leading axis of length n,
and every node that depends on them is rewritten by its op's batching rule (kept in the op's
registry entry, beside its shape rule and VJP). Nodes that depend only on shared inputs and
constants are copied unchanged. A scalar loss becomes a vector of n losses; since networks
are independent, the gradient of their sum gives each network its own gradients.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from graphgrad.engine.errors import ValidationError
from graphgrad.engine.ir import Graph, Node
from graphgrad.engine.ops import INPUT, TensorType, lookup


@dataclass(frozen=True, slots=True)
class Ref:
    """A node of the graph being built, and whether it carries the network axis."""

    name: str
    batched: bool


class Emitter:
    """Builds the stacked graph; rules call `emit`, which types each node as it is made."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    def reserve(self, names: Sequence[str]) -> None:
        self._names.update(names)

    def add(self, node: Node, t: TensorType) -> str:
        self.nodes.append(node)
        self.types[node.name] = t
        self._names.add(node.name)
        return node.name

    def emit(
        self, op: str, inputs: Sequence[str], attrs: dict | None = None, name: str | None = None
    ) -> str:
        attrs = {k: v for k, v in (attrs or {}).items() if v is not None}
        if name is None:
            name = f"_b{next(self._counter)}_{op}"
            while name in self._names:
                name = f"_b{next(self._counter)}_{op}"
        t = lookup(op).infer([self.types[i] for i in inputs], attrs)
        return self.add(Node(name, op, tuple(inputs), attrs), t)

    # Helpers shared by the rules.
    def lead(self, x: Ref, t: TensorType, rank: int) -> str:
        """x with the network axis first and `rank` template axes (size-1 axes inserted after
        the network axis); an unbatched x is first broadcast to all networks."""
        name = x.name
        if not x.batched:
            name = self.emit("broadcast_to", [name], {"shape": (self.n, *t.shape)})
        if len(t.shape) < rank:
            shape = (self.n, *(1,) * (rank - len(t.shape)), *t.shape)
            name = self.emit("reshape", [name], {"shape": shape})
        return name


def batch_graph(
    template: Graph, batched: set[str], n: int, keep_names: bool = True
) -> tuple[Graph, dict[str, Ref]]:
    """The stacked graph, and for each template node the node holding its stacked value."""
    unknown = batched - {node.name for node in template.inputs}
    if unknown:
        raise ValidationError(f"batched inputs {sorted(unknown)} are not graph inputs")
    em = Emitter(n)
    em.reserve([node.name for node in template.nodes])
    refs: dict[str, Ref] = {}
    for node, op, t, ins in zip(
        template.nodes, template.ops, template.types, template.input_pos, strict=True
    ):
        in_refs = [refs[template.nodes[j].name] for j in ins]
        if op is INPUT:
            is_b = node.name in batched
            shape = (n, *t.shape) if is_b else t.shape
            em.add(node.replace(shape=shape), TensorType(shape, t.dtype))
            refs[node.name] = Ref(node.name, is_b)
        elif not any(r.batched for r in in_refs):
            em.add(node.replace(inputs=tuple(r.name for r in in_refs)), t)
            refs[node.name] = Ref(node.name, False)
        else:
            if op.batch is None:
                raise ValidationError(f"op '{op.name}' has no batching rule", node=node.name)
            in_types = [template.types[j] for j in ins]
            out = op.batch(em, in_refs, in_types, t, dict(node.attrs))
            if keep_names:  # name the stacked value like the template node
                last = em.nodes[-1]
                if last.name == out and node.name not in em.types:
                    em.nodes[-1] = last.replace(name=node.name)
                    em.types[node.name] = em.types.pop(out)
                    out = node.name
            refs[node.name] = Ref(out, True)
    return Graph(em.nodes), refs
