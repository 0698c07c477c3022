"""The graph builder: `with gg.Graph():`, `gg.input`, operator overloading and op functions.

The builder only builds: every operation returns a new node, typed at once by the engine's
shape rules, so a mistake is reported on the line that makes it.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from graphgrad import _display, engine
from graphgrad.engine import (
    CONSTANT,
    DTYPES,
    ShapeError,
    TensorType,
    ValidationError,
    check_attr,
    grad_graph,
    lookup,
)

_current: contextvars.ContextVar[Graph | None] = contextvars.ContextVar(
    "graphgrad_graph", default=None
)


class Graph:
    """A graph under construction. Use it as a context manager; nodes join the active graph."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self._nodes: list[engine.Node] = []
        self._types: dict[str, TensorType] = {}
        self._op_of: dict[str, str] = {}
        self._counter = itertools.count()
        self._frozen: engine.Graph | None = None
        self._tokens: list[contextvars.Token[Graph | None]] = []

    def __enter__(self) -> Graph:
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._tokens.pop())

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"<graphgrad.Graph '{self.name}' {len(self)} nodes>"

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._types:
            raise KeyError(f"graph '{self.name}' has no node '{name}'")
        return Tensor(self, name)

    @property
    def nodes(self) -> list[engine.Node]:
        return list(self._nodes)

    # Notebook and terminal displays.
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return _display.mimebundle(self.freeze(), title=repr(self))

    def __str__(self) -> str:
        return _display.graph_text(self.freeze())

    def to_dot(self) -> str:
        return _display.to_dot(_display.graph_drawing(self.freeze()))

    def to_mermaid(self) -> str:
        return _display.to_mermaid(_display.graph_drawing(self.freeze()))

    def freeze(self) -> engine.Graph:
        """The engine's validated, immutable graph for the nodes built so far (cached)."""
        if self._frozen is None:
            self._frozen = engine.Graph(self._nodes)
        return self._frozen

    def _fresh_name(self, prefix: str) -> str:
        while True:
            name = f"{prefix}_{next(self._counter)}"
            if name not in self._types:
                return name

    def _add(
        self,
        op_name: str,
        inputs: Sequence[Tensor],
        attrs: dict[str, Any],
        name: str | None,
        declared: TensorType | None = None,
    ) -> Tensor:
        op = lookup(op_name)
        if name is None:
            name = self._fresh_name(op_name)
        elif not isinstance(name, str) or not name:
            raise ValueError(f"a node name must be a non-empty string, got {name!r}")
        elif name in self._types:
            raise ValueError(f"graph '{self.name}' already has a node named '{name}'")
        attrs = {k: check_attr(op, k, v, node=name) for k, v in attrs.items() if v is not None}
        if declared is not None:
            t = declared
        else:
            try:
                t = op.infer([self._types[x.name] for x in inputs], attrs)
            except ShapeError as e:
                shapes = ", ".join(f"{x.name}: {x.shape}" for x in inputs)
                raise ValidationError(
                    f"op '{op_name}' on ({shapes}): {e}", node=name, field="inputs"
                ) from e
        node = engine.Node(
            name,
            op_name,
            tuple(x.name for x in inputs),
            attrs,
            shape=t.shape if declared else None,
            dtype=t.dtype if declared else None,
        )
        self._nodes.append(node)
        self._types[name] = t
        self._op_of[name] = op_name
        self._frozen = None
        return Tensor(self, name)


def current_graph() -> Graph:
    g = _current.get()
    if g is None:
        raise RuntimeError("no active graph: build nodes inside `with gg.Graph():`")
    return g


class Tensor:
    """A handle on one node of a graph under construction."""

    __slots__ = ("graph", "name")
    __array_ufunc__ = None  # so `ndarray + Tensor` defers to Tensor.__radd__

    def __init__(self, graph: Graph, name: str) -> None:
        self.graph = graph
        self.name = name

    @property
    def type(self) -> TensorType:
        return self.graph._types[self.name]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def op(self) -> str:
        return self.graph._op_of[self.name]

    def __repr__(self) -> str:
        return f"<graphgrad.Tensor '{self.name}' shape={self.shape} dtype={self.dtype}>"

    def __bool__(self) -> bool:
        raise TypeError(
            f"the truth value of graph node '{self.name}' is unknown while the graph is built; "
            "use gg.maximum/gg.minimum or build the branch you mean with Python control flow"
        )

    def __hash__(self) -> int:
        return hash((id(self.graph), self.name))

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(f"graph node '{self.name}' is not iterable")

    def __add__(self, o: Any) -> Tensor:
        return add(self, o)

    def __radd__(self, o: Any) -> Tensor:
        return add(o, self)

    def __sub__(self, o: Any) -> Tensor:
        return sub(self, o)

    def __rsub__(self, o: Any) -> Tensor:
        return sub(o, self)

    def __mul__(self, o: Any) -> Tensor:
        return mul(self, o)

    def __rmul__(self, o: Any) -> Tensor:
        return mul(o, self)

    def __truediv__(self, o: Any) -> Tensor:
        return div(self, o)

    def __rtruediv__(self, o: Any) -> Tensor:
        return div(o, self)

    def __pow__(self, o: Any) -> Tensor:
        return pow(self, o)

    def __rpow__(self, o: Any) -> Tensor:
        return pow(o, self)

    def __matmul__(self, o: Any) -> Tensor:
        return matmul(self, o)

    def __rmatmul__(self, o: Any) -> Tensor:
        return matmul(o, self)

    def __neg__(self) -> Tensor:
        return neg(self)

    def _ancestors(self) -> set[str]:
        graph = self.graph.freeze()
        return {graph.nodes[i].name for i in graph.ancestors([graph.index[self.name]])}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """In a notebook a node shows the subgraph it depends on."""
        return _display.mimebundle(self.graph.freeze(), self._ancestors(), title=repr(self))

    def to_dot(self) -> str:
        return _display.to_dot(_display.graph_drawing(self.graph.freeze(), self._ancestors()))

    def to_mermaid(self) -> str:
        return _display.to_mermaid(_display.graph_drawing(self.graph.freeze(), self._ancestors()))

    @property
    def T(self) -> Tensor:
        return transpose(self)

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return sum(self, axis, keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return mean(self, axis, keepdims)

    def reshape(self, *shape: int) -> Tensor:
        flat = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return reshape(self, tuple(flat))


def input(name: str, shape: Sequence[int] = (), dtype: str = "float64") -> Tensor:
    """A graph input, fed at run time."""
    if dtype not in DTYPES:
        raise ValueError(f"input '{name}': dtype must be one of {DTYPES}, got {dtype!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"input '{name}': shape {dims} has a negative size")
    return current_graph()._add("input", (), {}, name, declared=TensorType(dims, dtype))


def constant(value: Any, dtype: str | None = None, name: str | None = None) -> Tensor:
    """A value stored in the graph. Python numbers default to float64."""
    arr = np.array(value, dtype=dtype or (value.dtype if isinstance(value, np.ndarray) else None))
    if arr.dtype.name not in DTYPES:
        arr = arr.astype(dtype or "float64")
    return current_graph()._add(CONSTANT.name, (), {"value": arr}, name)


def _lift(values: Sequence[Any]) -> list[Tensor]:
    """Make Tensors of every argument; Python scalars take the dtype of a Tensor among them."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        raise TypeError("at least one argument must be a graph node")
    graph = tensors[0].graph
    for t in tensors[1:]:
        if t.graph is not graph:
            raise ValueError(f"nodes '{tensors[0].name}' and '{t.name}' belong to different graphs")
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
            continue
        # numpy arrays keep a float dtype of their own (a mismatch is reported, never cast);
        # Python numbers and integer arrays are weakly typed, like JAX's weak types.
        keep = isinstance(v, np.ndarray | np.floating) and np.asarray(v).dtype.name in DTYPES
        arr = np.array(v, dtype=None if keep else tensors[0].dtype)
        with graph:
            out.append(constant(arr))
    return out


def grad(
    outputs: Tensor | Sequence[Tensor],
    wrt: Tensor | Sequence[Tensor],
    grad_outputs: Any = None,
) -> Any:
    """Gradient nodes: d outputs / d wrt, built into the outputs' graph (what
    `torch.autograd.grad(..., create_graph=True)` and `tf.gradients` give).

    Differentiates a scalar output (seeded with 1), or `outputs` seeded with `grad_outputs`
    (one node, array or number per output, each of its output's shape: a vector-Jacobian
    product). Returns one node per `wrt` entry (a list when `wrt` is a list). The nodes are
    ordinary nodes: run them, build on them, or differentiate them again (second
    derivatives; `gg.grad(gg.grad(L, W), W, v)` is a Hessian-vector product).
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    single = isinstance(wrt, Tensor)
    xs = [wrt] if isinstance(wrt, Tensor) else list(wrt)
    if not outs:
        raise ValueError("gg.grad needs at least one output")
    graph = outs[0].graph
    for n in [*outs, *xs]:
        if not isinstance(n, Tensor) or n.graph is not graph:
            raise ValueError(f"gg.grad: {n!r} is not a node of the outputs' graph")
    seeds: dict[str, str] = {}
    if grad_outputs is not None:
        given = [grad_outputs] if isinstance(outputs, Tensor) else list(grad_outputs)
        if len(given) != len(outs):
            raise ValueError(f"gg.grad: {len(outs)} output(s) but {len(given)} grad_outputs")
        for o, v in zip(outs, given, strict=True):
            seeds[o.name] = (v if isinstance(v, Tensor) else _lift([o, v])[1]).name
    frozen = graph.freeze()
    result = grad_graph(frozen, [o.name for o in outs], [x.name for x in xs], tuple(seeds), seeds)
    for node, t in zip(result.graph.nodes, result.graph.types, strict=True):
        if node.name not in graph._types:
            graph._nodes.append(node)
            graph._types[node.name] = t
            graph._op_of[node.name] = node.op
    graph._frozen = result.graph
    grads = [Tensor(graph, n) for n in result.grads]
    return grads[0] if single else grads


def _op(op_name: str, *args: Any, name: str | None = None, **attrs: Any) -> Tensor:
    inputs = _lift(args)
    return inputs[0].graph._add(op_name, inputs, attrs, name)


def add(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("add", a, b, name=name)


def sub(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("sub", a, b, name=name)


def mul(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("mul", a, b, name=name)


def div(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("div", a, b, name=name)


def pow(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("pow", a, b, name=name)


def maximum(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("maximum", a, b, name=name)


def minimum(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("minimum", a, b, name=name)


def matmul(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("matmul", a, b, name=name)


def neg(x: Tensor, name: str | None = None) -> Tensor:
    return _op("neg", x, name=name)


def exp(x: Tensor, name: str | None = None) -> Tensor:
    return _op("exp", x, name=name)


def log(x: Tensor, name: str | None = None) -> Tensor:
    return _op("log", x, name=name)


def tanh(x: Tensor, name: str | None = None) -> Tensor:
    return _op("tanh", x, name=name)


def sigmoid(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sigmoid", x, name=name)


def relu(x: Tensor, name: str | None = None) -> Tensor:
    return _op("relu", x, name=name)


def sin(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sin", x, name=name)


def cos(x: Tensor, name: str | None = None) -> Tensor:
    return _op("cos", x, name=name)


def sqrt(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sqrt", x, name=name)


def abs(x: Tensor, name: str | None = None) -> Tensor:
    return _op("abs", x, name=name)


def sum(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("sum", x, name=name, axis=axis, keepdims=keepdims)


def mean(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("mean", x, name=name, axis=axis, keepdims=keepdims)


def max(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("max", x, name=name, axis=axis, keepdims=keepdims)


def reshape(x: Tensor, shape: Sequence[int], name: str | None = None) -> Tensor:
    return _op("reshape", x, name=name, shape=tuple(shape))


def transpose(x: Tensor, axes: Sequence[int] | None = None, name: str | None = None) -> Tensor:
    return _op("transpose", x, name=name, axes=None if axes is None else tuple(axes))


def broadcast_to(x: Tensor, shape: Sequence[int], name: str | None = None) -> Tensor:
    return _op("broadcast_to", x, name=name, shape=tuple(shape))


def concat(xs: Sequence[Tensor], axis: int = 0, name: str | None = None) -> Tensor:
    return _op("concat", *xs, name=name, axis=axis)


def softmax(x: Tensor, axis: int = -1, name: str | None = None) -> Tensor:
    return _op("softmax", x, name=name, axis=axis)


def log_softmax(x: Tensor, axis: int = -1, name: str | None = None) -> Tensor:
    return _op("log_softmax", x, name=name, axis=axis)


def softmax_cross_entropy(
    logits: Tensor, labels: Any, axis: int = -1, name: str | None = None
) -> Tensor:
    return _op("softmax_cross_entropy", logits, labels, name=name, axis=axis)


def mse(pred: Any, target: Any, name: str | None = None) -> Tensor:
    return _op("mse", pred, target, name=name)
