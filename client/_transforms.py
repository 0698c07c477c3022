"""Function transforms over Python functions: `gg.grad`, `gg.value_and_grad`, `gg.vmap`.

A transformed function is traced into a graph the first time it sees an argument signature
(the tree structure of its arguments and each leaf's shape and dtype), and the graph is kept
in a bounded cache keyed by that signature; later calls with the same signature only run it,
on the client given (in process by default; a remote client sends the graph once and then
names it by its fingerprint). Called with graph nodes as arguments (inside another
transform, or inside `with gg.Graph():`) a transform builds its nodes into their graph
instead of running, so transforms nest: `gg.grad(gg.grad(f))` is the second derivative.

Arguments are numpy arrays, Python numbers or dicts (sorted by key), lists and tuples of them
(pytrees), as in JAX; results come back in the structure of the arguments.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphgrad import _builder, engine
from graphgrad._builder import Graph, Tensor
from graphgrad.engine import DTYPE_NAMES, DTYPES, INPUT, LRU, TensorType, batch_graph

# Traced graphs kept per transformed function (least recently used dropped beyond either).
CACHE_ENTRIES = 64
CACHE_BYTES = 256 << 20

# -- pytrees -------------------------------------------------------------------------------

TreeDef = Hashable  # ("*",) a leaf; ("tuple"|"list", children); ("dict", keys, children)
LEAF: TreeDef = ("*",)


def flatten(tree: Any, path: str = "") -> tuple[list[tuple[str, Any]], TreeDef]:
    """The leaves of `tree` (with a name saying where each sits) and its structure."""
    if isinstance(tree, tuple | list):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        leaves: list[tuple[str, Any]] = []
        defs = []
        for i, child in enumerate(tree):
            sub, d = flatten(child, f"{path}[{i}]")
            leaves += sub
            defs.append(d)
        return leaves, (kind, tuple(defs))
    if isinstance(tree, dict):
        keys = sorted(tree)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"argument {path or '?'}: dict keys must be strings, got {keys!r}")
        leaves, defs = [], []
        for k in keys:
            sub, d = flatten(tree[k], f"{path}.{k}" if path else k)
            leaves += sub
            defs.append(d)
        return leaves, ("dict", tuple(keys), tuple(defs))
    return [(path, tree)], LEAF


def unflatten(treedef: TreeDef, leaves: Sequence[Any]) -> Any:
    it = iter(leaves)

    def build(d: Any) -> Any:
        if d == LEAF:
            return next(it)
        if d[0] == "dict":
            return {k: build(c) for k, c in zip(d[1], d[2], strict=True)}
        children = [build(c) for c in d[1]]
        return tuple(children) if d[0] == "tuple" else children

    return build(treedef)


def _as_array(path: str, leaf: Any, what: str) -> np.ndarray:
    """A leaf as an array of a graph dtype: Python numbers are float64 (weakly typed, as in
    JAX); numpy arrays keep their dtype, which must be one the engine has."""
    if isinstance(leaf, bool | int | float):
        return np.asarray(leaf, dtype="float64")
    if not isinstance(leaf, np.ndarray | np.generic):
        raise TypeError(
            f"{what}: argument {path} is a {type(leaf).__name__}; expected a numpy array, "
            "a Python number, or a dict, list or tuple of them"
        )
    arr = np.asarray(leaf)
    if arr.dtype in DTYPE_NAMES:  # a dict lookup: dtype.name is slow on this hot path
        return arr
    if arr.dtype.name in DTYPES:  # the other byte order
        return arr.astype(arr.dtype.newbyteorder("="))
    raise TypeError(f"{what}: argument {path} has dtype {arr.dtype}; expected one of {DTYPES}")


def _graph_of(leaves: Sequence[tuple[str, Any]]) -> Graph | None:
    """The graph of the Tensor leaves, if any: then the transform builds into it."""
    graphs = {id(v.graph): v.graph for _, v in leaves if isinstance(v, Tensor)}
    if len(graphs) > 1:
        raise ValueError("the arguments' graph nodes belong to different graphs")
    return next(iter(graphs.values()), None)


def _lift(graph: Graph, leaves: Sequence[tuple[str, Any]], what: str) -> list[Tensor]:
    """Tensor leaves as they are, the others as constants of `graph`."""
    with graph:
        return [
            v if isinstance(v, Tensor) else _builder.constant(_as_array(p, v, what))
            for p, v in leaves
        ]


def _check_outputs(out: Any, what: str) -> tuple[list[Tensor], TreeDef]:
    leaves, treedef = flatten(out)
    for path, v in leaves:
        if not isinstance(v, Tensor):
            where = f" at {path}" if path else ""
            raise TypeError(
                f"{what}: the function returned a {type(v).__name__}{where}; "
                "it must return graph nodes (built with gg ops from its arguments)"
            )
    return [v for _, v in leaves], treedef


# -- the traced graph and how it runs ------------------------------------------------------


@dataclass(frozen=True)
class Traced:
    """One signature's graph: the input fed with each argument leaf, the node holding each
    result leaf, and the results' structure."""

    graph: Graph
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    treedef: TreeDef
    post: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None

    @property
    def fingerprint(self) -> str:
        return self.graph.freeze().fingerprint

    def run(self, client: Any, arrays: Sequence[np.ndarray]) -> Any:
        names = list(dict.fromkeys(self.outputs))  # a node returned twice is run once
        if not names:  # e.g. the gradient for an empty dict: its structure, nothing to run
            return unflatten(self.treedef, [])
        feeds = dict(zip(self.inputs, arrays, strict=True))
        res = client.run([self.graph[n] for n in names], feeds)
        values = [res.values[n] for n in self.outputs]
        if self.post is not None:
            values = self.post(values)
        return unflatten(self.treedef, values)


_default_client: Any = None
_default_lock = threading.Lock()


def _client(client: Any) -> Any:
    """The client a transform runs on: the one given, else one shared in-process client."""
    global _default_client
    if client is not None:
        return client
    with _default_lock:
        if _default_client is None:
            from graphgrad._local import LocalClient

            _default_client = LocalClient()
        return _default_client


def _graph_bytes(t: Traced) -> int:
    return t.graph.freeze().approx_bytes()


class Transformed:
    """A transformed function: call it like the original. `traces` counts the graphs traced,
    `cache_size()` those held, `fingerprint(*args)` names the graph for these arguments."""

    def __init__(
        self,
        fun: Callable[..., Any],
        what: str,
        make: Callable[[list[tuple[str, Any]], list[np.ndarray], TreeDef], Traced],
        symbolic: Callable[[Graph, list[Tensor], TreeDef], Any],
        client: Any,
    ) -> None:
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._params = _param_names(fun)
        self._what = what
        self._make = make
        self._symbolic = symbolic
        self._client = client
        self._cache: LRU[Hashable, Traced] = LRU(CACHE_ENTRIES, CACHE_BYTES, _graph_bytes)
        self.traces = 0

    def __repr__(self) -> str:
        return f"<graphgrad {self._what} of {getattr(self._fun, '__qualname__', self._fun)!r}>"

    def cache_size(self) -> int:
        return len(self._cache)

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = flatten(tuple(args))
        graph = _graph_of(leaves)
        if graph is not None:  # inside another transform or a graph: build, do not run
            return self._symbolic(graph, _lift(graph, leaves, self._what), treedef)
        arrays = self._arrays(leaves)
        traced = self._traced(leaves, arrays, treedef)
        return traced.run(_client(self._client), arrays)

    def fingerprint(self, *args: Any) -> str:
        """The fingerprint of the graph these arguments run (tracing it if need be)."""
        leaves, treedef = flatten(tuple(args))
        return self._traced(leaves, self._arrays(leaves), treedef).fingerprint

    def _arrays(self, leaves: list[tuple[str, Any]]) -> list[np.ndarray]:
        names = _input_names(self._params, [p for p, _ in leaves])
        return [_as_array(n, v, self._what) for n, (_, v) in zip(names, leaves, strict=True)]

    def _traced(
        self, leaves: list[tuple[str, Any]], arrays: list[np.ndarray], treedef: TreeDef
    ) -> Traced:
        key = (treedef, tuple((a.shape, a.dtype) for a in arrays))
        traced = self._cache.get(key)
        if traced is None:
            traced = self._make(leaves, arrays, treedef)
            self.traces += 1
            self._cache.put(key, traced)
        return traced


def _tracer(
    fun: Callable[..., Any], what: str, nodes: Callable[[Graph, list[Tensor], TreeDef], Any]
) -> Callable[[list[tuple[str, Any]], list[np.ndarray], TreeDef], Traced]:
    """Trace by building `nodes` on fresh inputs, one per argument leaf."""

    def make(leaves: list[tuple[str, Any]], arrays: list[np.ndarray], treedef: TreeDef) -> Traced:
        names = _input_names(_param_names(fun), [p for p, _ in leaves])
        graph = Graph(f"{what}({getattr(fun, '__name__', 'f')})")
        with graph:
            xs = [
                _builder.input(n, shape=a.shape, dtype=a.dtype.name)
                for n, a in zip(names, arrays, strict=True)
            ]
            outs, out_def = _check_outputs(nodes(graph, xs, treedef), what)
        return Traced(graph, tuple(names), tuple(o.name for o in outs), out_def)

    return make


def _param_names(fun: Callable[..., Any]) -> list[str]:
    """The names of f's positional parameters (none where Python cannot tell)."""
    try:
        params = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _input_names(params: list[str], paths: list[str]) -> list[str]:
    """Readable input names: `[0].W` becomes `params.W` when the first parameter is `params`."""
    out: list[str] = []
    taken: set[str] = set()  # a set: a call with thousands of leaves checks each name
    for path in paths:
        head, _, rest = path[1:].partition("]")
        i = int(head)
        base = params[i] if i < len(params) else f"arg{i}"
        name = base + rest  # rest: the path within the argument, ".W[1]"
        k = len(out)
        while name in taken:
            name, k = f"{base + rest}#{k}", k + 1
        taken.add(name)
        out.append(name)
    return out


# -- grad and value_and_grad ---------------------------------------------------------------


def _is_int(v: Any) -> bool:
    """An int that is not a bool (True is an int to Python, but never meant as axis 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _argnums(argnums: int | Sequence[int], nargs: int, what: str) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not _is_int(i) or not -nargs <= i < nargs:
            raise ValueError(f"{what}: argnums {argnums!r} out of range for {nargs} argument(s)")
    return tuple(i % nargs for i in nums)


def _leaf_spans(treedef: TreeDef) -> list[tuple[int, int]]:
    """For each top-level argument, the range of its leaves among all leaves."""
    spans, start = [], 0
    for child in treedef[1]:  # type: ignore[index]
        n = _count_leaves(child)
        spans.append((start, start + n))
        start += n
    return spans


def _count_leaves(d: Any) -> int:
    if d == LEAF:
        return 1
    return sum(_count_leaves(c) for c in (d[2] if d[0] == "dict" else d[1]))


def _value_and_grad_nodes(
    fun: Callable[..., Any],
    argnums: int | Sequence[int],
    has_aux: bool,
    what: str,
    xs: list[Tensor],
    treedef: TreeDef,
) -> tuple[Tensor, Any, Any]:
    """Build f and its gradient nodes: (value node, aux tree of nodes, gradient tree)."""
    args = unflatten(treedef, xs)
    nums = _argnums(argnums, len(args), what)
    out = fun(*args)
    aux = None
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{what} with has_aux=True: the function must return (value, aux)")
        out, aux = out
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{what}: the function must return a graph node, got {type(out).__name__}"
            + (" (use has_aux=True to return (value, aux))" if isinstance(out, tuple) else "")
        )
    if out.shape != ():
        raise TypeError(f"{what}: the function must return a scalar, got shape {out.shape}")
    spans = _leaf_spans(treedef)
    wrt = [xs[k] for i in nums for k in range(*spans[i])]
    grads = _builder.grad(out, wrt) if wrt else []
    trees, at = [], 0
    for i in nums:
        n = spans[i][1] - spans[i][0]
        trees.append(unflatten(treedef[1][i], grads[at : at + n]))  # type: ignore[index]
        at += n
    g = trees[0] if isinstance(argnums, int) else tuple(trees)
    return out, aux, g


def value_and_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    client: Any = None,
) -> Transformed:
    """A function returning `(f(*args), gradient of f w.r.t. args[argnums])` (JAX's
    `value_and_grad`); with `has_aux=True`, f returns `(value, aux)` and the result is
    `((value, aux), gradient)`. The gradient has the structure of `args[argnums]` (a tuple
    of them when argnums is a tuple). f must return a scalar node.

    Traced once per argument shape/dtype signature; runs on `client` (default in process).
    """
    what = "gg.value_and_grad"

    def nodes(graph: Graph, xs: list[Tensor], treedef: TreeDef) -> Any:
        out, aux, g = _value_and_grad_nodes(fun, argnums, has_aux, what, xs, treedef)
        return ((out, aux), g) if has_aux else (out, g)

    return Transformed(fun, what, _tracer(fun, what, nodes), nodes, client)


def grad_fn(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    client: Any = None,
) -> Transformed:
    """`gg.grad(f)`: the function form (see `grad`)."""
    what = "gg.grad"

    def nodes(graph: Graph, xs: list[Tensor], treedef: TreeDef) -> Any:
        _, aux, g = _value_and_grad_nodes(fun, argnums, has_aux, what, xs, treedef)
        return (g, aux) if has_aux else g

    return Transformed(fun, what, _tracer(fun, what, nodes), nodes, client)


def grad(fun_or_outputs: Any, *args: Any, **kwargs: Any) -> Any:
    """Gradients, in two forms.

    `gg.grad(f, argnums=0, has_aux=False, client=None)`, with f a Python function: returns a
    function computing the gradient of f (a scalar) with respect to `args[argnums]`, in
    their structure (JAX's `grad`); `has_aux=True` returns `(gradient, aux)`. It is traced
    once per argument shape/dtype signature and runs on `client` (default in process); on
    graph nodes it builds the gradient nodes instead, so `gg.grad(gg.grad(f))` is f''.

        dfdx = gg.grad(lambda x: 1 / x**2)
        dfdx(np.array(2.0))  # -2/x^3 = -0.25

    `gg.grad(outputs, wrt, grad_outputs=None)`, with graph nodes: the gradient nodes, built
    into the outputs' graph (see `graphgrad._builder.grad`).
    """
    if isinstance(fun_or_outputs, Tensor) or (
        isinstance(fun_or_outputs, list | tuple)
        and all(isinstance(o, Tensor) for o in fun_or_outputs)
    ):
        return _builder.grad(fun_or_outputs, *args, **kwargs)
    if callable(fun_or_outputs):
        return grad_fn(fun_or_outputs, *args, **kwargs)
    raise TypeError(
        "gg.grad takes a Python function (gg.grad(f, argnums=0)) or graph nodes "
        f"(gg.grad(outputs, wrt)), got {type(fun_or_outputs).__name__}"
    )


# -- vmap ----------------------------------------------------------------------------------


def _axes_per_leaf(in_axes: Any, treedef: TreeDef, nargs: int) -> list[int | None]:
    """in_axes (an int or None for every argument, or a tuple/list with one per argument)
    as one axis per leaf."""
    if in_axes is None or _is_int(in_axes):
        per_arg = [in_axes] * nargs
    elif isinstance(in_axes, tuple | list) and len(in_axes) == nargs:
        per_arg = list(in_axes)
    else:
        raise ValueError(
            f"gg.vmap: in_axes must be an int, None, or one int/None per argument "
            f"({nargs}), got {in_axes!r}"
        )
    out: list[int | None] = []
    for child, ax in zip(treedef[1], per_arg, strict=True):  # type: ignore[index]
        if ax is not None and not _is_int(ax):
            raise ValueError(f"gg.vmap: each in_axes entry must be an int or None, got {ax!r}")
        out += [ax] * _count_leaves(child)
    return out


def _mapped(
    leaves: list[tuple[str, Any]], shapes: list[tuple[int, ...]], axes: list[int | None]
) -> tuple[int, list[int | None]]:
    """The mapped size and each leaf's axis made non-negative; a clear error on mismatch."""
    sizes: dict[str, int] = {}
    norm: list[int | None] = []
    for (path, _), shape, ax in zip(leaves, shapes, axes, strict=True):
        if ax is None:
            norm.append(None)
            continue
        if not -len(shape) <= ax < len(shape):
            raise ValueError(f"gg.vmap: in_axes {ax} is out of range for {path} of shape {shape}")
        ax %= len(shape)
        norm.append(ax)
        sizes[path] = shape[ax]
    if not sizes:
        raise ValueError("gg.vmap: no argument is mapped (every in_axes is None)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"gg.vmap: mapped axes have different sizes: {sizes}")
    return next(iter(sizes.values())), norm


def _without(shape: tuple[int, ...], ax: int | None) -> tuple[int, ...]:
    return shape if ax is None else shape[:ax] + shape[ax + 1 :]


def _template(
    fun: Callable[..., Any], treedef: TreeDef, types: list[TensorType], names: list[str]
) -> tuple[engine.Graph, list[str], TreeDef]:
    """f traced for one example: its graph, its result nodes and their structure."""
    g = Graph(f"vmap({getattr(fun, '__name__', 'f')})")
    with g:
        xs = [_builder.input(n, t.shape, t.dtype) for n, t in zip(names, types, strict=True)]
        outs, out_def = _check_outputs(fun(*unflatten(treedef, xs)), "gg.vmap")
    return g.freeze(), [o.name for o in outs], out_def


def _splice(
    target: Graph, source: engine.Graph, bind: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    """Build `source`'s nodes into `target`: its inputs become inputs of the same name
    (bind None) or the nodes `bind` gives; other nodes get fresh names when bound."""
    made: dict[str, Tensor] = {}
    for node, t in zip(source.nodes, source.types, strict=True):
        if node.op == INPUT.name and bind is not None:
            made[node.name] = bind[node.name]
            continue
        declared = t if node.op == INPUT.name else None
        # Graph._add is the builder's one way to add a typed node (ask: a public twin).
        made[node.name] = target._add(
            node.op,
            [made[i] for i in node.inputs],
            dict(node.attrs),
            node.name if bind is None else None,
            declared=declared,
        )
    return made


def builder_graph(source: engine.Graph, name: str = "graph") -> Graph:
    """A builder graph holding the nodes of an engine graph, under the same names (so the
    same fingerprint): what a graph made by a transform or read from a file runs as."""
    graph = Graph(name)
    _splice(graph, source, None)
    return graph


def vmap(
    fun: Callable[..., Any], in_axes: Any = 0, out_axes: int | None = 0, *, client: Any = None
) -> Transformed:
    """A function mapping f over an axis of its arguments (JAX's `vmap`): `in_axes` is an int
    or None for all arguments, or a tuple with one per argument (None: not mapped, every
    example sees the whole argument); every result gets the mapped axis at `out_axes`.

    f is traced once for one example and stacked by the engine's batching transform (each
    op's batching rule), so the mapped computation is one graph, not a loop.
    """
    what = "gg.vmap"
    if out_axes is not None and not _is_int(out_axes):
        raise ValueError(f"gg.vmap: out_axes must be an int or None, got {out_axes!r}")

    def stacked(
        leaves: list[tuple[str, Any]], shapes: list[tuple[int, ...]], dtypes: list[str], td: Any
    ) -> tuple[engine.Graph, list[str], list[int | None], dict[str, Any], list[str], TreeDef, int]:
        axes = _axes_per_leaf(in_axes, td, len(td[1]))
        n, axes = _mapped(leaves, shapes, axes)
        names = _input_names(_param_names(fun), [p for p, _ in leaves])
        types = [
            TensorType(_without(s, a), d) for s, a, d in zip(shapes, axes, dtypes, strict=True)
        ]
        template, outs, out_def = _template(fun, td, types, names)
        batched = {nm for nm, a in zip(names, axes, strict=True) if a is not None}
        graph, refs = batch_graph(template, batched, n)
        return graph, names, axes, refs, outs, out_def, n

    def out_axis(ndim: int) -> int:
        if out_axes is None:
            return 0
        if not -ndim <= out_axes < ndim:
            raise ValueError(f"gg.vmap: out_axes {out_axes} is out of range for rank {ndim}")
        return out_axes % ndim

    def symbolic(graph: Graph, xs: list[Tensor], td: TreeDef) -> Any:
        leaves = [(f"[{i}]", x) for i, x in enumerate(xs)]
        src, names, axes, refs, outs, out_def, n = stacked(
            leaves, [x.shape for x in xs], [x.dtype for x in xs], td
        )
        with graph:
            bind = {
                nm: x if not a else _builder.transpose(x, _front(x.ndim, a))
                for nm, x, a in zip(names, xs, axes, strict=True)
            }
        made = _splice(graph, src, bind)
        results = []
        with graph:
            for o in outs:
                r = made[refs[o].name]
                if not refs[o].batched:
                    r = _builder.broadcast_to(r, (n, *r.shape))
                if out_axes is None:
                    raise ValueError("gg.vmap: out_axes=None needs outputs that are not mapped")
                ax = out_axis(r.ndim)
                results.append(r if ax == 0 else _builder.transpose(r, _back(r.ndim, ax)))
        return unflatten(out_def, results)

    def make(leaves: list[tuple[str, Any]], arrays: list[np.ndarray], td: TreeDef) -> Traced:
        src, names, axes, refs, outs, out_def, n = stacked(
            leaves, [a.shape for a in arrays], [a.dtype.name for a in arrays], td
        )
        graph = builder_graph(src, f"vmap({getattr(fun, '__name__', 'f')})")
        batched = [refs[o].batched for o in outs]
        if out_axes is None and any(batched):
            raise ValueError("gg.vmap: out_axes=None needs outputs that are not mapped")

        def post(values: list[np.ndarray]) -> list[np.ndarray]:
            out = []
            for v, b in zip(values, batched, strict=True):
                if out_axes is None:
                    out.append(v)
                    continue
                if not b:
                    v = np.broadcast_to(v, (n, *v.shape))
                out.append(np.moveaxis(v, 0, out_axis(v.ndim)))
            return out

        return _VmapTraced(
            graph, tuple(names), tuple(refs[o].name for o in outs), out_def, post, tuple(axes)
        )

    return Transformed(fun, what, make, symbolic, client)


def _front(ndim: int, ax: int) -> tuple[int, ...]:
    """The permutation moving axis `ax` to the front."""
    return (ax, *(i for i in range(ndim) if i != ax))


def _back(ndim: int, ax: int) -> tuple[int, ...]:
    """The permutation moving the front axis to `ax`."""
    rest = list(range(1, ndim))
    return (*rest[:ax], 0, *rest[ax:])


@dataclass(frozen=True)
class _VmapTraced(Traced):
    axes: tuple[int | None, ...] = ()

    def run(self, client: Any, arrays: Sequence[np.ndarray]) -> Any:
        moved = [
            a if ax is None else np.moveaxis(a, ax, 0)
            for a, ax in zip(arrays, self.axes, strict=True)
        ]
        return super().run(client, moved)
