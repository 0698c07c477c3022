"""The graph builder: `with gg.Graph():`, `gg.input`, operator overloading and op functions.

The builder only builds: every operation returns a new node, typed at once by the engine's
shape rules, so a mistake is reported on the line that makes it.
"""

from __future__ import annotations

import builtins
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from graphgrad import _display, engine
from graphgrad.engine import (
    CONSTANT,
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    REGISTRY,
    ShapeError,
    TensorType,
    ValidationError,
    check_attr,
    grad_graph,
    lookup,
    shape_problem,
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
        """The transpose: axes reversed."""
        return transpose(self)

    @property
    def size(self) -> int:
        """The number of elements."""
        return self.type.size

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """`gg.sum(x, axis, keepdims)`."""
        return sum(self, axis, keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """`gg.mean(x, axis, keepdims)`."""
        return mean(self, axis, keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """`gg.max(x, axis, keepdims)`."""
        return max(self, axis, keepdims)

    def min(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        """`gg.min(x, axis, keepdims)`."""
        return min(self, axis, keepdims)

    def argmax(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        """`gg.argmax(x, axis, keepdims)`."""
        return argmax(self, axis, keepdims)

    def argmin(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        """`gg.argmin(x, axis, keepdims)`."""
        return argmin(self, axis, keepdims)

    def reshape(self, *shape: int) -> Tensor:
        """`gg.reshape(x, shape)`; the shape may be given as separate ints."""
        flat = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return reshape(self, tuple(flat))

    def transpose(self, *axes: int) -> Tensor:
        """`gg.transpose(x, axes)`; the axes may be given as separate ints."""
        flat = axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes
        return transpose(self, tuple(flat) if flat else None)

    def flatten(self) -> Tensor:
        """x as a 1-d tensor."""
        return reshape(self, (-1,))

    def squeeze(self, axis: int | Sequence[int] | None = None) -> Tensor:
        """`gg.squeeze(x, axis)`."""
        return squeeze(self, axis)

    def astype(self, dtype: Any) -> Tensor:
        """`gg.astype(x, dtype)`."""
        return astype(self, dtype)

    def clip(self, a_min: Any = None, a_max: Any = None) -> Tensor:
        """`gg.clip(x, a_min, a_max)`."""
        return clip(self, a_min, a_max)

    def exp(self) -> Tensor:
        """`gg.exp(x)`."""
        return exp(self)

    def log(self) -> Tensor:
        """`gg.log(x)`."""
        return log(self)

    def tanh(self) -> Tensor:
        """`gg.tanh(x)`."""
        return tanh(self)

    def sigmoid(self) -> Tensor:
        """`gg.sigmoid(x)`."""
        return sigmoid(self)

    def relu(self) -> Tensor:
        """`gg.relu(x)`."""
        return relu(self)

    def sqrt(self) -> Tensor:
        """`gg.sqrt(x)`."""
        return sqrt(self)

    def sin(self) -> Tensor:
        """`gg.sin(x)`."""
        return sin(self)

    def cos(self) -> Tensor:
        """`gg.cos(x)`."""
        return cos(self)

    def __abs__(self) -> Tensor:
        return abs(self)

    def __lt__(self, o: Any) -> Tensor:
        return less(self, o)

    def __le__(self, o: Any) -> Tensor:
        return less_equal(self, o)

    def __gt__(self, o: Any) -> Tensor:
        return greater(self, o)

    def __ge__(self, o: Any) -> Tensor:
        return greater_equal(self, o)

    def __eq__(self, o: object) -> bool:
        raise TypeError(
            f"`==` on graph node '{self.name}' is ambiguous while the graph is built; use "
            "gg.equal(a, b) for the elementwise comparison (a node of 1s and 0s), or compare "
            "names (a.name == b.name) for the same node"
        )

    def __ne__(self, o: object) -> bool:
        raise TypeError(
            f"`!=` on graph node '{self.name}' is ambiguous while the graph is built; use "
            "gg.not_equal(a, b) for the elementwise comparison (a node of 1s and 0s)"
        )

    def __getitem__(self, key: Any) -> Tensor:
        """numpy indexing: ints (negative count from the end), slices with steps, None,
        `...`, and one integer tensor or array (a gather: `gg.take` along its axis)."""
        return _getitem(self, key)


def dtype_name(dtype: Any, what: str) -> str:
    """A dtype given as a name ("float32"), a numpy type (np.float32) or an np.dtype, as its
    name; a ValueError naming `what` when graphgrad has no such dtype."""
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise ValueError(f"{what}: dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def shape_tuple(shape: Any, what: str) -> tuple[int, ...]:
    """A shape given as an int (`3`: a vector) or a sequence of ints, as a tuple."""
    if isinstance(shape, int | np.integer):
        dims: tuple[Any, ...] = (shape,)
    elif isinstance(shape, Sequence | np.ndarray):
        dims = tuple(shape)
    else:
        dims = (shape,)  # reported below
    if not builtins.all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{what}: shape must be an int or a sequence of ints, got {shape!r}")
    out = tuple(int(d) for d in dims)
    if builtins.any(d < 0 for d in out):
        raise ValueError(f"{what}: shape {out} has a negative size")
    problem = shape_problem(out)  # too many elements or axes: said now, not at the first run
    if problem is not None:
        raise ValueError(f"{what}: shape {out!r:.80}: {problem}")
    return out


def input(name: str, shape: int | Sequence[int] = (), dtype: Any = "float64") -> Tensor:
    """A graph input named `name`, fed at run time (`feeds={name: array}`).

    `shape` is a sequence of ints, or an int for a vector (`shape=3` is `(3,)`); `dtype` is
    "float32", "float64", "int32" or "int64", as a name, a numpy type (`np.float32`) or an
    `np.dtype`. Integer inputs hold what is not differentiated: labels and indices.

    >>> with gg.Graph():
    ...     x = gg.input("x", shape=(2, 3), dtype=np.float32)
    ...     labels = gg.input("labels", shape=2, dtype="int64")
    """
    dims = shape_tuple(shape, f"input '{name}'")
    t = TensorType(dims, dtype_name(dtype, f"input '{name}'"))
    return current_graph()._add("input", (), {}, name, declared=t)


def constant(value: Any, dtype: Any = None, name: str | None = None) -> Tensor:
    """A value stored in the graph. Python numbers and lists default to float64; numpy
    arrays keep a dtype graphgrad has (float32, float64, int32, int64); `dtype` converts."""
    if dtype is not None:
        arr = np.array(value, dtype=dtype_name(dtype, "constant"))
    else:
        keep = isinstance(value, np.ndarray | np.generic) and value.dtype.name in DTYPES
        arr = np.array(value, dtype=None if keep else "float64")
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
        keep = isinstance(v, np.ndarray | np.floating) and np.asarray(v).dtype.name in FLOAT_DTYPES
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


_F = TypeVar("_F", bound=Callable[..., Any])
_NAME_DOC = "`name` names the node (default: the op's name and a number)."


def op_doc(op_name: str, example: str = "") -> Callable[[_F], _F]:
    """Give an op function the docstring of its registry entry, the one source of op docs
    (the server's ListOps and docs/ops.md read it too), plus the SDK's own notes."""

    def wrap(fn: _F) -> _F:
        op = REGISTRY[op_name]
        parts = [op.doc, f"Builds op `{op.signature()}`. {_NAME_DOC}"]
        if example:
            parts.append(example)
        fn.__doc__ = "\n\n".join(parts)
        return fn

    return wrap


def _op(op_name: str, *args: Any, name: str | None = None, **attrs: Any) -> Tensor:
    inputs = _lift(args)
    return inputs[0].graph._add(op_name, inputs, attrs, name)


@op_doc("add", "Also `a + b`; Python numbers take the other operand's dtype.")
def add(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("add", a, b, name=name)


@op_doc("sub", "Also `a - b`.")
def sub(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("sub", a, b, name=name)


@op_doc("mul", "Also `a * b`.")
def mul(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("mul", a, b, name=name)


@op_doc("div", "Also `a / b`.")
def div(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("div", a, b, name=name)


@op_doc("pow", "Also `a ** b`.")
def pow(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("pow", a, b, name=name)


@op_doc("maximum")
def maximum(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("maximum", a, b, name=name)


@op_doc("minimum")
def minimum(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("minimum", a, b, name=name)


@op_doc("matmul", "Also `a @ b`. E.g. a layer: `gg.tanh(x @ W + b)`.")
def matmul(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("matmul", a, b, name=name)


@op_doc("neg", "Also `-x`.")
def neg(x: Tensor, name: str | None = None) -> Tensor:
    return _op("neg", x, name=name)


@op_doc("exp", "Also `x.exp()`.")
def exp(x: Tensor, name: str | None = None) -> Tensor:
    return _op("exp", x, name=name)


@op_doc("log", "Also `x.log()`.")
def log(x: Tensor, name: str | None = None) -> Tensor:
    return _op("log", x, name=name)


@op_doc("tanh", "Also `x.tanh()`.")
def tanh(x: Tensor, name: str | None = None) -> Tensor:
    return _op("tanh", x, name=name)


@op_doc("sigmoid", "Also `x.sigmoid()`.")
def sigmoid(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sigmoid", x, name=name)


@op_doc("relu", "Also `x.relu()`.")
def relu(x: Tensor, name: str | None = None) -> Tensor:
    return _op("relu", x, name=name)


@op_doc("sin", "Also `x.sin()`.")
def sin(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sin", x, name=name)


@op_doc("cos", "Also `x.cos()`.")
def cos(x: Tensor, name: str | None = None) -> Tensor:
    return _op("cos", x, name=name)


@op_doc("sqrt", "Also `x.sqrt()`.")
def sqrt(x: Tensor, name: str | None = None) -> Tensor:
    return _op("sqrt", x, name=name)


@op_doc("abs", "Also `abs(x)`.")
def abs(x: Tensor, name: str | None = None) -> Tensor:
    return _op("abs", x, name=name)


@op_doc("sum", "Also `x.sum(axis)`. E.g. `gg.sum(x, axis=(0, 2), keepdims=True)`.")
def sum(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("sum", x, name=name, axis=axis, keepdims=keepdims)


@op_doc("mean", "Also `x.mean(axis)`.")
def mean(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("mean", x, name=name, axis=axis, keepdims=keepdims)


@op_doc("max", "Also `x.max(axis)`.")
def max(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("max", x, name=name, axis=axis, keepdims=keepdims)


def min(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    """The smallest of x's elements over `axis` (absent: every axis), as `-max(-x)`; ties
    share the gradient as in `max`. Also `x.min(axis)`. `keepdims` keeps the reduced axes."""
    return neg(max(neg(x), axis, keepdims), name=name)


@op_doc("logsumexp", "E.g. a log-likelihood: `gg.logsumexp(scores, axis=-1)`.")
def logsumexp(
    x: Tensor,
    axis: int | Sequence[int] | None = None,
    keepdims: bool = False,
    name: str | None = None,
) -> Tensor:
    return _op("logsumexp", x, name=name, axis=axis, keepdims=keepdims)


@op_doc("argmax", "Also `x.argmax(axis)`. E.g. predicted classes: `gg.argmax(logits, axis=-1)`.")
def argmax(
    x: Tensor, axis: int | None = None, keepdims: bool = False, name: str | None = None
) -> Tensor:
    return _op("argmax", x, name=name, axis=axis, keepdims=keepdims)


@op_doc("argmin", "Also `x.argmin(axis)`.")
def argmin(
    x: Tensor, axis: int | None = None, keepdims: bool = False, name: str | None = None
) -> Tensor:
    return _op("argmin", x, name=name, axis=axis, keepdims=keepdims)


@op_doc("reshape", "Also `x.reshape(2, -1)`.")
def reshape(x: Tensor, shape: int | Sequence[int], name: str | None = None) -> Tensor:
    dims = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    return _op("reshape", x, name=name, shape=dims)


@op_doc("transpose", "Also `x.T` (axes reversed) and `x.transpose(1, 0, 2)`.")
def transpose(x: Tensor, axes: Sequence[int] | None = None, name: str | None = None) -> Tensor:
    return _op("transpose", x, name=name, axes=None if axes is None else tuple(axes))


@op_doc("broadcast_to")
def broadcast_to(x: Tensor, shape: int | Sequence[int], name: str | None = None) -> Tensor:
    return _op("broadcast_to", x, name=name, shape=shape_tuple(shape, "broadcast_to"))


@op_doc("concat")
def concat(xs: Sequence[Tensor], axis: int = 0, name: str | None = None) -> Tensor:
    return _op("concat", *xs, name=name, axis=axis)


def stack(xs: Sequence[Tensor], axis: int = 0, name: str | None = None) -> Tensor:
    """numpy.stack: the inputs, all of one shape and dtype, joined along a new axis `axis`
    (a concat of each reshaped with a size-1 axis there). `gg.stack([a, b])` of two (3,)
    vectors is (2, 3)."""
    xs = _lift(list(xs))
    rank = len(xs[0].shape) + 1
    if not -rank <= axis < rank:
        raise ValueError(f"stack: axis {axis} is out of range for rank {rank}")
    return concat([expand_dims(x, axis) for x in xs], axis=axis % rank, name=name)


def split(x: Tensor, indices_or_sections: int | Sequence[int], axis: int = 0) -> list[Tensor]:
    """numpy.split: x cut along `axis` into a list of nodes: `indices_or_sections` is a count
    of equal parts (it must divide the axis) or the sorted indices to cut at.
    `gg.split(x, [2, 5])` gives x[:2], x[2:5] and x[5:] along axis 0."""
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"split: axis {axis} is out of range for rank {x.ndim}")
    axis %= x.ndim
    n = x.shape[axis]
    if isinstance(indices_or_sections, int | np.integer):
        k = int(indices_or_sections)
        if k <= 0 or n % k:
            raise ValueError(f"split: {k} equal parts do not divide axis {axis} of size {n}")
        cuts = [n // k * i for i in range(1, k)]
    else:
        cuts = [
            builtins.min(builtins.max(int(c) if c >= 0 else n + int(c), 0), n)
            for c in indices_or_sections
        ]
    bounds = [0, *cuts, n]
    return [
        _op("slice", x, axis=axis, start=lo, stop=builtins.max(lo, hi))
        for lo, hi in itertools.pairwise(bounds)
    ]


def expand_dims(x: Tensor, axis: int | Sequence[int], name: str | None = None) -> Tensor:
    """numpy.expand_dims: x with a new size-1 axis at `axis` (an int or several); a reshape."""
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    rank = x.ndim + len(axes)
    if not builtins.all(-rank <= a < rank for a in axes):
        raise ValueError(f"expand_dims: axis {axis} is out of range for rank {rank}")
    new = {int(a) % rank for a in axes}
    if len(new) != len(axes):
        raise ValueError(f"expand_dims: axis {axis} repeats an axis")
    dims = iter(x.shape)
    return reshape(x, tuple(1 if i in new else next(dims) for i in range(rank)), name=name)


def squeeze(x: Tensor, axis: int | Sequence[int] | None = None, name: str | None = None) -> Tensor:
    """numpy.squeeze: x without its size-1 axes (all of them, or those in `axis`, which must
    have size 1); a reshape. Also `x.squeeze()`."""
    if axis is None:
        drop = {i for i, n in enumerate(x.shape) if n == 1}
    else:
        axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
        if not builtins.all(-x.ndim <= a < x.ndim for a in axes):
            raise ValueError(f"squeeze: axis {axis} is out of range for rank {x.ndim}")
        drop = {int(a) % x.ndim for a in axes}
        wide = [a for a in sorted(drop) if x.shape[a] != 1]
        if wide:
            raise ValueError(f"squeeze: axis {wide[0]} of {x.shape} has size {x.shape[wide[0]]}")
    return reshape(x, tuple(n for i, n in enumerate(x.shape) if i not in drop), name=name)


@op_doc("softmax")
def softmax(x: Tensor, axis: int = -1, name: str | None = None) -> Tensor:
    return _op("softmax", x, name=name, axis=axis)


@op_doc("log_softmax")
def log_softmax(x: Tensor, axis: int = -1, name: str | None = None) -> Tensor:
    return _op("log_softmax", x, name=name, axis=axis)


@op_doc(
    "softmax_cross_entropy",
    "Integer labels may be an int tensor, or an integer array or list (class indices): "
    "`gg.softmax_cross_entropy(logits, labels).mean()` with logits (batch, classes) and "
    "labels (batch,) int64.",
)
def softmax_cross_entropy(
    logits: Tensor, labels: Any, axis: int = -1, name: str | None = None
) -> Tensor:
    if not isinstance(labels, Tensor) and isinstance(logits, Tensor):
        arr = np.asarray(labels)
        if arr.dtype.kind in "iu" and logits.ndim and arr.ndim == logits.ndim - 1:
            with logits.graph:
                labels = constant(arr.astype(np.int64))
    return _op("softmax_cross_entropy", logits, labels, name=name, axis=axis)


@op_doc("mse")
def mse(pred: Any, target: Any, name: str | None = None) -> Tensor:
    return _op("mse", pred, target, name=name)


@op_doc("less", "Also `a < b`; e.g. a mask: `x * (x < 1)`.")
def less(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("less", a, b, name=name)


@op_doc("less_equal", "Also `a <= b`.")
def less_equal(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("less_equal", a, b, name=name)


@op_doc("greater", "Also `a > b`.")
def greater(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("greater", a, b, name=name)


@op_doc("greater_equal", "Also `a >= b`.")
def greater_equal(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("greater_equal", a, b, name=name)


@op_doc("equal", "`a == b` is not this: `==` on a node raises, as `bool(node)` does.")
def equal(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("equal", a, b, name=name)


@op_doc("not_equal")
def not_equal(a: Any, b: Any, name: str | None = None) -> Tensor:
    return _op("not_equal", a, b, name=name)


@op_doc("where", "E.g. a leaky relu: `gg.where(x > 0, x, 0.01 * x)`.")
def where(cond: Any, x: Any, y: Any, name: str | None = None) -> Tensor:
    # x and y set the dtype of Python numbers; cond keeps its own
    values = _lift([x, y, *([cond] if isinstance(cond, Tensor) else [])])
    c = cond if isinstance(cond, Tensor) else _lift([values[0], cond])[1]
    return values[0].graph._add("where", [c, values[0], values[1]], {}, name)


def clip(x: Tensor, a_min: Any = None, a_max: Any = None, name: str | None = None) -> Tensor:
    """numpy.clip: x limited to [a_min, a_max] elementwise (either may be None: no bound;
    bounds broadcast), as `minimum(maximum(x, a_min), a_max)`, so at a bound the gradient
    is split as in maximum/minimum (as in JAX). Also `x.clip(0, 1)`."""
    if a_min is None and a_max is None:
        raise ValueError("clip: give a_min, a_max or both")
    out = x if a_min is None else maximum(x, a_min, name=None if a_max is not None else name)
    return out if a_max is None else minimum(out, a_max, name=name)


@op_doc("astype", "Also `x.astype(np.float32)`; dtype as a name, numpy type or np.dtype.")
def astype(x: Tensor, dtype: Any, name: str | None = None) -> Tensor:
    target = dtype_name(dtype, f"astype of '{x.name}'")
    return x if target == x.dtype and name is None else _op("astype", x, name=name, dtype=target)


def _index_tensor(x: Tensor, idx: Any) -> Tensor:
    """An index given as a Tensor, or as an integer array or list (an int64 constant)."""
    if isinstance(idx, Tensor):
        return idx
    arr = np.asarray(idx)
    if arr.size == 0 and not isinstance(idx, np.ndarray):
        arr = arr.astype(np.int64)  # `[]` is an empty gather, as in numpy, not floats
    if arr.dtype.kind not in "iu":
        raise IndexError(f"index {idx!r:.60} of node '{x.name}' is not integers")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise IndexError(f"index {arr.max()} of node '{x.name}' is out of range (int64)")
    with x.graph:
        return constant(arr.astype(np.int64))


@op_doc("take", "`x[idx]` and `x[:, idx]` build it too; `indices` may be an int array or list.")
def take(x: Tensor, indices: Any, axis: int = 0, name: str | None = None) -> Tensor:
    return _op("take", x, _index_tensor(x, indices), name=name, axis=axis)


@op_doc("take_along_axis")
def take_along_axis(x: Tensor, indices: Any, axis: int, name: str | None = None) -> Tensor:
    return _op("take_along_axis", x, _index_tensor(x, indices), name=name, axis=axis)


def _getitem(x: Tensor, key: Any) -> Tensor:
    key = key if isinstance(key, tuple) else (key,)
    for k in key:
        if isinstance(k, bool | np.bool_) or (
            isinstance(k, Tensor | np.ndarray)
            and k.dtype not in INT_DTYPES
            and np.dtype(k.dtype).kind not in "iu"
        ):
            raise IndexError(
                f"index {k!r:.60} of node '{x.name}': only integers, slices, None, ... and "
                "integer tensors or arrays can index"
            )
    gathers = [i for i, k in enumerate(key) if isinstance(k, Tensor | np.ndarray | list)]
    if gathers:
        (pos,) = gathers if len(gathers) == 1 else (None,)
        if pos is None or not builtins.all(k == slice(None) for i, k in enumerate(key) if i != pos):
            raise IndexError(
                f"indexing node '{x.name}': one integer tensor or array at a time, the other "
                "entries `:` (use gg.take or gg.take_along_axis for more)"
            )
        return take(x, key[pos], axis=pos)
    real = builtins.sum(k is not None and k is not Ellipsis for k in key)
    if real > x.ndim:
        raise IndexError(f"too many indices for node '{x.name}' of shape {x.shape}")
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = (*key[:at], *(slice(None),) * (x.ndim - real), *key[at + 1 :])
    else:
        key = (*key, *(slice(None),) * (x.ndim - real))
    begin, size, stride, shape = [], [], [], []
    d = 0
    for k in key:
        if k is None:
            shape.append(1)
            continue
        n = x.shape[d]
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            count = len(range(start, stop, step))
            begin.append(start if count else 0)
            size.append(count)
            stride.append(step if count > 1 else 1)  # unused then, and may not fit int64
            shape.append(count)
        elif isinstance(k, int | np.integer):
            if not -n <= k < n:
                raise IndexError(
                    f"index {k} is out of range for axis {d} of node '{x.name}' (size {n})"
                )
            begin.append(int(k) % n)
            size.append(1)
            stride.append(1)
        else:
            raise IndexError(f"index {k!r:.60} of node '{x.name}' is not an int, slice or None")
        d += 1
    out = x
    if (tuple(begin), tuple(size), tuple(stride)) != ((0,) * x.ndim, x.shape, (1,) * x.ndim):
        out = _op("strided_slice", x, begin=tuple(begin), size=tuple(size), stride=tuple(stride))
    return out if tuple(shape) == out.shape else reshape(out, tuple(shape))
