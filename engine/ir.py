"""Graph IR: immutable nodes and a validated graph held in topological order.

Every traversal here is iterative, so a chain a million nodes deep is fine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from graphgrad.engine.errors import SHOWN_NAMES, RequestError, ValidationError, name_list
from graphgrad.engine.ops import (
    DTYPES,
    INPUT,
    Op,
    ShapeError,
    TensorType,
    check_attr,
    lookup,
    shape_problem,
)
from graphgrad.engine.plan_cache import DerivedCache

MAX_NAME_LENGTH = 256
NODE_BYTES = 600  # a node, its type, index entry and positions (tests/test_caches.py checks)
_SERIALS = itertools.count()  # never reused, unlike id(): plan cache keys name instances
_MEMO: DerivedCache[tuple[int, Hashable], Any] = DerivedCache("memo")
_NO_ATTRS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One node: an op applied to named inputs. `shape`/`dtype` are declared for inputs."""

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.inputs.__class__ is not tuple:
            object.__setattr__(self, "inputs", tuple(self.inputs))
        # most nodes have no attributes: they share one empty, read-only mapping
        attrs = MappingProxyType(dict(self.attrs)) if self.attrs else _NO_ATTRS
        object.__setattr__(self, "attrs", attrs)
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    def replace(self, **changes: Any) -> Node:
        return dataclasses.replace(self, **changes)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Node, (self.name, self.op, self.inputs, dict(self.attrs), self.shape, self.dtype))


class Graph:
    """A validated, immutable graph. Nodes are stored in a topological order.

    Positions (ints) index `nodes`, `ops`, `types` and `input_pos`; `index` maps names to them.
    """

    __slots__ = (
        "_bytes",
        "_fingerprint",
        "_serial",
        "index",
        "input_pos",
        "nodes",
        "ops",
        "types",
    )

    def __init__(self, nodes: Iterable[Node]):
        checked = [_check_node(n) for n in nodes]
        given = [n for n, _ in checked]
        ops = [op for _, op in checked]
        order = _topological_order(given)
        self.nodes: tuple[Node, ...] = tuple(given[i] for i in order)
        self.ops: tuple[Op, ...] = tuple(ops[i] for i in order)
        self.index: dict[str, int] = {n.name: i for i, n in enumerate(self.nodes)}
        self.input_pos: tuple[tuple[int, ...], ...] = tuple(
            tuple(self.index[s] for s in n.inputs) for n in self.nodes
        )
        self.types: tuple[TensorType, ...] = _infer_types(self)
        self._fingerprint: str | None = None
        self._bytes: int | None = None
        self._serial = next(_SERIALS)

    @classmethod
    def extended(
        cls, base: Graph, nodes: Sequence[Node], ops: Sequence[Op], types: Sequence[TensorType]
    ) -> Graph:
        """`base` with `nodes` appended, typed and checked by the rules that made them (engine/
        grad.py's emitter: fresh names, inputs made earlier, types from the ops' shape rules):
        only their attributes are put in canonical form; `base`'s nodes, their order and types
        are shared, and nothing is sorted, inferred or hashed again (the fingerprint is lazy)."""
        g = object.__new__(cls)
        added = [
            n.replace(attrs={k: check_attr(op, k, v, node=n.name) for k, v in n.attrs.items()})
            if n.attrs
            else n
            for n, op in zip(nodes, ops, strict=True)
        ]
        g.nodes = base.nodes + tuple(added)
        g.ops = base.ops + tuple(ops)
        index = g.index = dict(base.index)
        start = len(base.nodes)
        for k, n in enumerate(added, start):
            if index.setdefault(n.name, k) != k:
                raise AssertionError(f"node '{n.name}' added twice")
        at = index.__getitem__
        g.input_pos = base.input_pos + tuple([tuple(map(at, n.inputs)) for n in added])
        g.types = base.types + tuple(types)
        g._fingerprint = None
        g._bytes = None
        g._serial = next(_SERIALS)
        return g

    @property
    def serial(self) -> int:
        """This instance's number, never reused: what derived-value caches key on."""
        return self._serial

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """Deprecated: a value derived from this graph under an untyped key. Layers own typed
        caches (engine/plan_cache.py `DerivedCache`); this stays for code not yet moved."""
        return _MEMO.get_or_make((self._serial, key), make)

    def approx_bytes(self) -> int:
        """Estimated memory the graph holds (what the graph cache counts)."""
        if self._bytes is None:
            names = sum(len(n.name) for n in self.nodes)
            arrays = sum(
                v.nbytes for n in self.nodes for v in n.attrs.values() if isinstance(v, np.ndarray)
            )
            self._bytes = NODE_BYTES * len(self.nodes) + 2 * names + arrays
        return self._bytes

    def __len__(self) -> int:
        return len(self.nodes)

    def __reduce__(self) -> tuple[Any, ...]:
        # Ops hold functions: a graph travels as its nodes and is validated again on arrival.
        return (Graph, (list(self.nodes),))

    def __repr__(self) -> str:
        return f"<graphgrad.engine.Graph {len(self)} nodes {self.fingerprint[:12]}>"

    def position(self, name: str, *, field: str) -> int:
        """The position of a node a request names in `field` (outputs, wrt, grad_outputs)."""
        try:
            return self.index[name]
        except KeyError:
            raise RequestError(
                f"{field} names {name_list([name])}, which is not a node of the graph",
                field=field,
            ) from None

    @property
    def inputs(self) -> list[Node]:
        """The graph's inputs (nodes fed at run time), in topological order."""
        return [n for n, op in zip(self.nodes, self.ops, strict=True) if op is INPUT]

    @property
    def fingerprint(self) -> str:
        """Content hash (sha256 hex): independent of node order, changes with any content."""
        if self._fingerprint is None:
            digests = sorted(_node_digest(n) for n in self.nodes)
            h = hashlib.sha256(b"graphgrad.graph.v1")
            for d in digests:
                h.update(d)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def ancestors(self, roots: Iterable[int]) -> list[int]:
        """Positions of `roots` and everything they depend on, in topological order."""
        seen = set(roots)
        stack = list(seen)
        while stack:
            for j in self.input_pos[stack.pop()]:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return sorted(seen)


def _check_node(node: Node) -> tuple[Node, Op]:
    """Checks of one node on its own: name, op, arity, attributes, declared type.

    Returns the node with its attributes in canonical form (so fingerprints agree) and its op.
    """
    if not isinstance(node.name, str) or not node.name or len(node.name) > MAX_NAME_LENGTH:
        raise ValidationError(
            f"a node name must be 1 to {MAX_NAME_LENGTH} characters, got {node.name!r:.80}",
            node=str(node.name)[:80],
            field="name",
        )
    op = lookup(node.op, node=node.name)
    if op.arity is not None and len(node.inputs) != op.arity:
        raise ValidationError(
            f"op '{op.name}' takes {op.arity} input(s), got {len(node.inputs)}",
            node=node.name,
            field="inputs",
        )
    if op.arity is None and not node.inputs:
        raise ValidationError(
            f"op '{op.name}' takes at least one input, got none", node=node.name, field="inputs"
        )
    attrs = {key: check_attr(op, key, value, node=node.name) for key, value in node.attrs.items()}
    for key, spec in op.attrs.items():
        if spec.required and key not in node.attrs:
            raise ValidationError(
                f"op '{op.name}' needs attribute '{key}'", node=node.name, field=f"attrs.{key}"
            )
    if node.dtype is not None and node.dtype not in DTYPES:
        raise ValidationError(
            f"dtype must be one of {DTYPES}, got {node.dtype!r}", node=node.name, field="dtype"
        )
    problem = None if node.shape is None else shape_problem(node.shape)
    if problem is not None:
        raise ValidationError(f"declared shape: {problem}", node=node.name, field="shape")
    if op is INPUT and (node.shape is None or node.dtype is None):
        raise ValidationError(
            "an input must declare its shape and dtype",
            node=node.name,
            field="shape" if node.shape is None else "dtype",
        )
    if node.shape is not None:
        node = node.replace(shape=tuple(int(d) for d in node.shape))
    if any(type(attrs[k]) is not type(v) or attrs[k] is not v for k, v in node.attrs.items()):
        node = node.replace(attrs=attrs)
    return node, op


def _topological_order(nodes: Sequence[Node]) -> list[int]:
    """Kahn's algorithm, stable: among ready nodes the earliest given goes first."""
    where: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if where.setdefault(n.name, i) != i:
            raise ValidationError(f"duplicate node name '{n.name}'", node=n.name, field="name")
    deps: list[list[int]] = []
    for n in nodes:
        ins = []
        for s in n.inputs:
            j = where.get(s)
            if j is None:
                raise ValidationError(
                    f"input '{s}' is not a node of the graph (dangling input)",
                    node=n.name,
                    field="inputs",
                )
            ins.append(j)
        deps.append(ins)
    if all(j < i for i, ins in enumerate(deps) for j in ins):
        return list(range(len(nodes)))  # already in order: the common case, O(n)
    users: list[list[int]] = [[] for _ in nodes]
    missing = [len(set(ins)) for ins in deps]
    for i, ins in enumerate(deps):
        for j in set(ins):
            users[j].append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        raise _cycle_error(nodes, deps, missing)
    return order


def _cycle_error(
    nodes: Sequence[Node], deps: list[list[int]], missing: list[int]
) -> ValidationError:
    # Every unsorted node has an unsorted input, so walking inputs must come back to a node.
    i = next(k for k, m in enumerate(missing) if m > 0)
    path: dict[int, int] = {}
    while i not in path:
        path[i] = len(path)
        i = next(j for j in deps[i] if missing[j] > 0)
    cycle = [k for k, _ in sorted(path.items(), key=lambda kv: kv[1]) if path[k] >= path[i]]
    names = [nodes[k].name for k in cycle]
    if len(names) <= SHOWN_NAMES:
        where = " -> ".join([*names, names[0]])
    else:
        where = f"{len(names):,} nodes, each an input of the next: {name_list(names)}"
    return ValidationError(f"the graph has a cycle: {where}", node=nodes[i].name, field="inputs")


def _infer_types(graph: Graph) -> tuple[TensorType, ...]:
    types: list[TensorType] = []
    for node, op, ins in zip(graph.nodes, graph.ops, graph.input_pos, strict=True):
        if op is INPUT:
            assert node.shape is not None and node.dtype is not None
            t = TensorType(node.shape, node.dtype)
        else:
            try:
                t = op.infer([types[j] for j in ins], node.attrs)
                problem = shape_problem(t.shape)  # e.g. a matmul of empty inputs
                if problem is not None:
                    raise ShapeError(f"its shape {t.shape}: {problem}", field="shape")
            except ShapeError as e:
                raise ValidationError(f"op '{op.name}': {e}", node=node.name, field=e.field) from e
            if node.shape is not None and node.shape != t.shape:
                raise ValidationError(
                    f"declared shape {node.shape} differs from inferred {t.shape}",
                    node=node.name,
                    field="shape",
                )
            if node.dtype is not None and node.dtype != t.dtype:
                raise ValidationError(
                    f"declared dtype {node.dtype} differs from inferred {t.dtype}",
                    node=node.name,
                    field="dtype",
                )
        types.append(t)
    return tuple(types)


def _node_digest(node: Node) -> bytes:
    # repr of a tuple of str/int/float/bool/None is unambiguous (strings are quoted).
    plain = sorted((k, v) for k, v in node.attrs.items() if not isinstance(v, np.ndarray))
    h = hashlib.blake2b(
        repr((node.name, node.op, node.inputs, plain, node.shape, node.dtype)).encode(),
        digest_size=32,
    )
    for key in sorted(k for k, v in node.attrs.items() if isinstance(v, np.ndarray)):
        arr = np.ascontiguousarray(node.attrs[key], dtype=node.attrs[key].dtype.newbyteorder("<"))
        h.update(repr((key, arr.dtype.name, arr.shape)).encode())
        h.update(arr.tobytes())
    return h.digest()
