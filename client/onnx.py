"""ONNX models <-> engine graphs: `from_onnx` imports a model's forward pass, `to_onnx` exports one.

Part of the wire layer (like `graphgrad.wire`): it converts protobuf messages (an ONNX
`ModelProto` is one) to engine graphs and back, for the SDK and the server alike. It imports
only the engine's public surface, numpy and the `onnx` package (lazily: the extra
`graphgrad[onnx]`); no gRPC, no SDK module.

Import rules:
- ops of the default domain, opsets 13 and later; each ONNX op type is one entry of `_IMPORTERS`;
- float initializers become input nodes under their own names and are returned as `params`
  (so gradients with respect to weights come back by name); integer initializers and
  Constant outputs are constants, folded where an op needs a static operand (a shape, axes);
- graph inputs keep their names; a dynamic dimension is bound by `shapes` (input name ->
  shape, e.g. from the first feeds) or by `dims` (dimension parameter -> size);
- anything else (an op, an attribute, a dtype, external data) is an error naming the node,
  the op type and the opset. Nothing in a model is executed or unpickled.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graphgrad.engine import REGISTRY, Graph, LimitError, Node, TensorType, ValidationError
from graphgrad.engine.ops import ShapeError, check_attr

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 13
MAX_OPSET = 23  # the newest default-domain opset whose import rules were checked
EXPORT_OPSET = 17  # ReduceMean and ReduceMax still take axes as an attribute
DOMAINS = ("", "ai.onnx")


class OnnxUnavailableError(ImportError):
    """The `onnx` package is not installed (the extra `graphgrad[onnx]`)."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise OnnxUnavailableError(
            "ONNX models need the 'onnx' package: pip install 'graphgrad[onnx]'"
        ) from e
    return onnx


@dataclass(frozen=True)
class Imported:
    """An imported model: its engine graph, the float initializers' values by name (`params`),
    the names of the graph inputs fed at run time and of the model's outputs, and its opset."""

    graph: Graph
    params: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    opset: int
    dims: dict[str, int] = field(default_factory=dict)


# ONNX TensorProto data types graphgrad holds (FLOAT, INT32, INT64, DOUBLE).
_DTYPES = {1: "float32", 6: "int32", 7: "int64", 11: "float64"}
_ELEM = {v: k for k, v in _DTYPES.items()}


def parse_model(data: bytes) -> onnx.ModelProto:
    """A ModelProto from its serialized bytes (protobuf parsing only: nothing is loaded from
    disk, nothing executed)."""
    onnx = _onnx()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf DecodeError and its kin
        raise ValidationError(f"not an ONNX ModelProto ({e})", field="onnx_model") from e
    return model


def check_model_size(
    model: onnx.ModelProto, max_nodes: int | None, max_tensor_bytes: int | None
) -> None:
    """The model's node count and every stored tensor's declared size, against the limits,
    before any tensor is converted (LimitError naming the limit)."""
    g = model.graph
    if max_nodes is not None and len(g.node) > max_nodes:
        raise LimitError(
            f"the ONNX model has {len(g.node)} nodes, over the limit max_nodes={max_nodes}",
            limit="max_nodes",
        )
    if max_tensor_bytes is None:
        return
    tensors = [(t.name, t) for t in g.initializer]
    tensors += [(n.output[0] if n.output else n.name, a.t) for n in g.node for a in n.attribute]
    for name, t in tensors:
        dtype = _DTYPES.get(t.data_type)
        itemsize = np.dtype(dtype).itemsize if dtype else 8
        need = max(math.prod(t.dims), 1) * itemsize
        stored = len(t.raw_data) + 8 * (len(t.double_data) + len(t.int64_data))
        stored += 4 * (len(t.float_data) + len(t.int32_data))
        if max(need, stored) > max_tensor_bytes:
            raise LimitError(
                f"ONNX tensor '{name}' of shape {tuple(t.dims)} needs {max(need, stored)} "
                f"bytes, over the limit max_tensor_bytes={max_tensor_bytes}",
                limit="max_tensor_bytes",
            )


def load_model(model: Any) -> onnx.ModelProto:
    """A ModelProto from a ModelProto, serialized bytes, or a path (read with `onnx.load`,
    external data files beside it included)."""
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes | bytearray | memoryview):
        return parse_model(bytes(model))
    if isinstance(model, str | os.PathLike):
        from google.protobuf.message import DecodeError

        try:
            return onnx.load(os.fspath(model))
        except DecodeError as e:
            raise ValidationError(
                f"{os.fspath(model)}: not an ONNX ModelProto ({e})", field="onnx_model"
            ) from e
    raise TypeError(f"an ONNX model must be a ModelProto, bytes or a path, got {type(model)}")


def from_onnx(
    model: Any,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    max_nodes: int | None = None,
    max_tensor_bytes: int | None = None,
) -> Imported:
    """The engine graph of an ONNX model's forward pass (see the module's rules)."""
    proto = load_model(model)
    check_model_size(proto, max_nodes, max_tensor_bytes)
    return _Importer(proto, dict(dims or {}), dict(shapes or {})).run()


# -- import ---------------------------------------------------------------------------------


def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DOMAINS]
    if not versions:
        raise ValidationError("the model imports no default-domain opset", field="opset_import")
    v = max(versions)
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise ValidationError(
            f"opset {v} is not supported (graphgrad imports opsets {MIN_OPSET} to {MAX_OPSET})",
            field="opset_import",
        )
    return v


class _Importer:
    def __init__(self, model: onnx.ModelProto, dims: dict[str, int], shapes: dict[str, Any]):
        self.onnx = _onnx()
        self.model = model
        self.opset = _opset(model)
        self.dims = dims
        self.shapes = shapes
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self.params: dict[str, np.ndarray] = {}
        self.stored: dict[str, Any] = {}  # initializers and Constant outputs not yet nodes
        self.consts: dict[str, np.ndarray] = {}  # constants that became nodes
        self.constant_outputs: set[str] = set()  # outputs of Constant nodes
        self.initializers = {t.name for t in model.graph.initializer}  # values never reassigned
        self.node: Any = None  # the ONNX node being imported, for errors

    # errors
    def error(self, message: str, field: str = "op") -> ValidationError:
        n = self.node
        if n is None:
            return ValidationError(message, field=field)
        name = n.name or (n.output[0] if n.output else "?")
        return ValidationError(
            f"{n.op_type} (opset {self.opset}): {message}", node=name, field=field
        )

    def array(self, t: Any, what: str) -> np.ndarray:
        if t.data_location == self.onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise self.error(f"{what} is stored in an external file, which is not read", "data")
        if t.data_type not in _DTYPES:
            raise self.error(
                f"{what} has ONNX data type {t.data_type}, not one of float, double, int32, int64",
                "dtype",
            )
        if any(d < 0 for d in t.dims):
            raise self.error(
                f"{what} cannot be read: negative dimension in {tuple(t.dims)}", "data"
            )
        try:
            arr = self.onnx.numpy_helper.to_array(t)
        except ValueError as e:  # bytes that do not fill the shape, and their kin
            raise self.error(f"{what} cannot be read: {e}", "data") from e
        return np.ascontiguousarray(arr, dtype=_DTYPES[t.data_type])

    # emitting engine nodes
    def emit(self, name: str, op: str, inputs: Sequence[str], attrs: Mapping[str, Any]) -> str:
        spec = REGISTRY[op]
        checked = {k: check_attr(spec, k, v, node=name) for k, v in attrs.items()}
        try:
            t = spec.infer([self.types[i] for i in inputs], checked)
        except ShapeError as e:
            raise self.error(f"{op}: {e}", e.field or "inputs") from e
        if name in self.types:
            raise self.error(f"a second value named '{name}'", "output")
        self.nodes.append(Node(name, op, tuple(inputs), checked))
        self.types[name] = t
        return name

    def add_input(self, name: str, shape: Sequence[int], dtype: str) -> None:
        self.nodes.append(Node(name, "input", (), {}, shape=tuple(shape), dtype=dtype))
        self.types[name] = TensorType(tuple(int(d) for d in shape), dtype)

    def data(self, name: str) -> str:
        """The engine node holding ONNX value `name` (an initializer or constant becomes one)."""
        if name in self.types:
            return name
        if name in self.stored:
            arr = self.stored.pop(name)
            if arr.dtype.kind == "f" and name not in self.constant_outputs:
                self.params[name] = arr
                self.add_input(name, arr.shape, arr.dtype.name)
            else:  # integer initializers and Constant outputs
                self.nodes.append(Node(name, "constant", (), {"value": arr}))
                self.types[name] = TensorType(arr.shape, arr.dtype.name)
                self.consts[name] = arr
            return name
        raise self.error(f"input '{name}' is not a graph input, initializer or node output")

    def static(self, name: str, what: str) -> np.ndarray:
        """A value the op needs at import time (a shape, axes): an int64 initializer or
        constant (ONNX's type for both; a float would be truncated)."""
        if name in self.stored:
            value = np.asarray(self.stored[name])
        elif name in self.consts:
            value = self.consts[name]
        else:
            raise self.error(
                f"{what} '{name}' must be an initializer or a Constant (graphgrad shapes are "
                "static)",
                "inputs",
            )
        if value.dtype.kind not in "iu":
            raise self.error(f"{what} '{name}' must be int64, got {value.dtype}", "inputs")
        return value

    def const(self, name: str, value: float, like: str) -> str:
        arr = np.array(value, dtype=self.types[like].dtype)
        self.nodes.append(Node(name, "constant", (), {"value": arr}))
        self.types[name] = TensorType((), arr.dtype.name)
        return name

    # the model
    def run(self) -> Imported:
        g = self.model.graph
        for t in g.initializer:
            if t.name in self.stored:
                raise ValidationError(
                    f"initializer '{t.name}' is named twice", node=t.name, field="initializer"
                )
            self.stored[t.name] = self.array(t, f"initializer '{t.name}'")
        inputs = []
        for vi in g.input:
            if vi.name in self.stored:
                continue  # an initializer listed as an input too (older exporters)
            self.add_input(vi.name, *self.input_type(vi))
            inputs.append(vi.name)
        for node in g.node:
            self.node = node
            self.import_node(node)
        self.node = None
        outputs = [self.data(o.name) for o in g.output]
        graph = Graph(self.nodes)
        return Imported(graph, self.params, inputs, outputs, self.opset, dict(self.dims))

    def input_type(self, vi: Any) -> tuple[tuple[int, ...], str]:
        tt = vi.type.tensor_type
        dtype = _DTYPES.get(tt.elem_type)
        if not vi.type.HasField("tensor_type") or dtype is None:
            raise ValidationError(
                f"graph input '{vi.name}' must be a float, double, int32 or int64 tensor",
                node=vi.name,
                field="dtype",
            )
        given = self.shapes.get(vi.name)
        declared = list(tt.shape.dim)
        if given is not None:
            try:
                given = tuple(operator.index(d) for d in given)
            except TypeError:
                raise ValidationError(
                    f"graph input '{vi.name}': shape {given!r} is not a sequence of ints",
                    node=vi.name,
                    field="shape",
                ) from None
            fixed = [d.dim_value if d.HasField("dim_value") else None for d in declared]
            if len(given) != len(declared) or any(
                f is not None and f != s for f, s in zip(fixed, given, strict=False)
            ):
                raise ValidationError(
                    f"graph input '{vi.name}' is declared {_shape_text(declared)}, "
                    f"given shape {given}",
                    node=vi.name,
                    field="shape",
                )
            for d, s in zip(declared, given, strict=True):
                if d.HasField("dim_param"):
                    self.dims.setdefault(d.dim_param, s)
            return given, dtype
        shape = []
        for k, d in enumerate(declared):
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in self.dims:
                shape.append(int(self.dims[d.dim_param]))
            else:
                what = f"'{d.dim_param}'" if d.HasField("dim_param") else "(unnamed)"
                raise ValidationError(
                    f"graph input '{vi.name}' has a dynamic dimension {k} {what}: give its size "
                    "in dims={name: size} or the input's shape (from the feeds)",
                    node=vi.name,
                    field="shape",
                )
        return tuple(shape), dtype

    def import_node(self, node: Any) -> None:
        if node.domain not in DOMAINS:
            raise self.error(f"op domain '{node.domain}' is not supported")
        rule = _IMPORTERS.get(node.op_type)
        if rule is None:
            raise self.error(f"op type '{node.op_type}' is not supported")
        allowed = rule.attrs | ({"axes"} if rule.axes_attr_until > self.opset else set())
        for a in node.attribute:
            if a.name not in allowed:
                raise self.error(f"attribute '{a.name}' is not supported", f"attrs.{a.name}")
            kind = _ATTR_TYPES[a.name]
            if a.type != kind:
                raise self.error(
                    f"attribute '{a.name}' must be {_ATTR_KIND_TEXT[kind]}, got "
                    f"{self.onnx.AttributeProto.AttributeType.Name(a.type)}",
                    f"attrs.{a.name}",
                )
        if len(node.output) != 1:
            raise self.error(f"{len(node.output)} outputs (graphgrad imports one)", "output")
        out = node.output[0]
        if out in self.initializers or out in self.stored or out in self.types:
            raise self.error(f"a second value named '{out}'", "output")
        rule.fn(
            self, node, {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
        )


# The AttributeProto type of every attribute an import rule reads (1 FLOAT, 2 INT, 4 TENSOR,
# 6 FLOATS, 7 INTS).
_ATTR_TYPES = {
    "alpha": 1, "beta": 1, "value_float": 1, "transA": 2, "transB": 2, "axis": 2,
    "keepdims": 2, "noop_with_empty_axes": 2, "allowzero": 2, "to": 2, "saturate": 2,
    "value_int": 2, "value": 4, "value_floats": 6, "perm": 7, "axes": 7, "value_ints": 7,
}  # fmt: skip
_ATTR_KIND_TEXT = {1: "a float", 2: "an int", 4: "a tensor", 6: "floats", 7: "ints"}


def _shape_text(dims: Iterable[Any]) -> str:
    return (
        "("
        + ", ".join(
            str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims
        )
        + ")"
    )


@dataclass(frozen=True)
class _Rule:
    fn: Callable[[_Importer, Any, dict[str, Any]], None]
    attrs: frozenset[str] = frozenset()
    axes_attr_until: int = 0  # opsets below this take `axes` as an attribute


_IMPORTERS: dict[str, _Rule] = {}


def _rule(*names: str, attrs: Iterable[str] = (), axes_attr_until: int = 0) -> Callable[..., Any]:
    def put(fn: Callable[[_Importer, Any, dict[str, Any]], None]) -> Any:
        for n in names:
            _IMPORTERS[n] = _Rule(fn, frozenset(attrs), axes_attr_until)
        return fn

    return put


_UNARY = {
    "Neg": "neg", "Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Exp": "exp",
    "Log": "log", "Sqrt": "sqrt", "Abs": "abs", "Sin": "sin", "Cos": "cos",
}  # fmt: skip
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "MatMul": "matmul",
}  # fmt: skip
_VARIADIC = {"Max": "maximum", "Min": "minimum"}  # 1 to N inputs, broadcast together


def _arity(imp: _Importer, node: Any, lo: int, hi: int | None = None) -> list[str]:
    ins = list(node.input)
    while ins and not ins[-1]:
        ins.pop()  # trailing optional inputs left out
    if not lo <= len(ins) <= (lo if hi is None else hi):
        want = str(lo) if hi is None else f"{lo} to {hi}"
        raise imp.error(f"takes {want} inputs, got {len(ins)}", "inputs")
    return ins


@_rule(*_UNARY)
def _unary(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (x,) = _arity(imp, node, 1)
    imp.emit(node.output[0], _UNARY[node.op_type], [imp.data(x)], {})


@_rule(*_BINARY)
def _binary(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    a, b = _arity(imp, node, 2)
    imp.emit(node.output[0], _BINARY[node.op_type], [imp.data(a), imp.data(b)], {})


@_rule(*_VARIADIC)
def _variadic(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    ins = [imp.data(i) for i in _arity(imp, node, 1, len(node.input) or 1)]
    out, op = node.output[0], _VARIADIC[node.op_type]
    if len(ins) == 1:
        _reshape_to(imp, node, ins[0], imp.types[ins[0]].shape)
        return
    y = ins[0]
    for k, x in enumerate(ins[1:], 1):
        y = imp.emit(out if k == len(ins) - 1 else f"{out}/{op}{k}", op, [y, x], {})


@_rule("Pow")
def _pow(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    a, b = _arity(imp, node, 2)
    x, y, out = imp.data(a), imp.data(b), node.output[0]
    dtype = imp.types[x].dtype
    if imp.types[y].dtype != dtype:  # ONNX lets the exponent's type differ
        y = imp.emit(f"{out}/exponent", "astype", [y], {"dtype": dtype})
    imp.emit(out, "pow", [x, y], {})


@_rule("Gemm", attrs=("alpha", "beta", "transA", "transB"))
def _gemm(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    ins = _arity(imp, node, 2, 3)
    out = node.output[0]
    a, b = imp.data(ins[0]), imp.data(ins[1])
    if at.get("transA", 0):
        a = imp.emit(f"{out}/A_T", "transpose", [a], {"axes": (1, 0)})
    if at.get("transB", 0):
        b = imp.emit(f"{out}/B_T", "transpose", [b], {"axes": (1, 0)})
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    rest = alpha != 1.0 or len(ins) == 3
    y = imp.emit(f"{out}/matmul" if rest else out, "matmul", [a, b], {})
    if alpha != 1.0:
        k = imp.const(f"{out}/alpha", alpha, y)
        y = imp.emit(out if len(ins) == 2 else f"{out}/scaled", "mul", [y, k], {})
    if len(ins) == 3:
        c = imp.data(ins[2])
        if beta != 1.0:
            c = imp.emit(f"{out}/beta_C", "mul", [c, imp.const(f"{out}/beta", beta, c)], {})
        imp.emit(out, "add", [y, c], {})


@_rule("Softmax", "LogSoftmax", attrs=("axis",))
def _softmax(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (x,) = _arity(imp, node, 1)
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    imp.emit(node.output[0], op, [imp.data(x)], {"axis": int(at.get("axis", -1))})


def _reshape_to(imp: _Importer, node: Any, x: str, shape: Sequence[int]) -> None:
    imp.emit(node.output[0], "reshape", [x], {"shape": tuple(int(d) for d in shape)})


def _axis(imp: _Importer, axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise imp.error(f"{what} {axis} is out of range for rank {rank}", f"attrs.{what}")
    return axis % rank


@_rule("Reshape", attrs=("allowzero",))
def _reshape(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    a, s = _arity(imp, node, 2)
    x = imp.data(a)
    src = imp.types[x].shape
    want = [int(d) for d in imp.static(s, "shape").reshape(-1)]
    if not at.get("allowzero", 0):
        want = [src[i] if d == 0 and i < len(src) else d for i, d in enumerate(want)]
    if want.count(-1) > 1:
        raise imp.error(f"shape {tuple(want)} has more than one -1", "inputs")
    if -1 in want:
        known = math.prod(d for d in want if d != -1)
        if known == 0 or math.prod(src) % known:
            raise imp.error(f"cannot reshape {src} to {tuple(want)}", "inputs")
        want[want.index(-1)] = math.prod(src) // known
    _reshape_to(imp, node, x, want)


@_rule("Identity")
def _identity(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (a,) = _arity(imp, node, 1)
    x = imp.data(a)  # a reshape to its own shape: the output keeps its ONNX name
    _reshape_to(imp, node, x, imp.types[x].shape)


@_rule("Flatten", attrs=("axis",))
def _flatten(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (a,) = _arity(imp, node, 1)
    x = imp.data(a)
    src = imp.types[x].shape
    axis = int(at.get("axis", 1))
    if not -len(src) <= axis <= len(src):
        raise imp.error(f"axis {axis} is out of range for rank {len(src)}", "attrs.axis")
    if axis < 0:
        axis += len(src)
    _reshape_to(imp, node, x, (math.prod(src[:axis]), math.prod(src[axis:])))


def _axes_operand(imp: _Importer, node: Any, ins: list[str], at: dict[str, Any]) -> list[int]:
    if len(ins) > 1:
        return [int(v) for v in imp.static(ins[1], "axes").reshape(-1)]
    return [int(v) for v in at.get("axes", [])]


@_rule("Squeeze")
def _squeeze(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    ins = _arity(imp, node, 1, 2)
    x = imp.data(ins[0])
    src = imp.types[x].shape
    axes = {_axis(imp, a, len(src), "axes") for a in _axes_operand(imp, node, ins, at)}
    if not axes:
        axes = {i for i, d in enumerate(src) if d == 1}
    if any(src[a] != 1 for a in axes):
        raise imp.error(f"cannot squeeze axes {sorted(axes)} of shape {src}", "inputs")
    _reshape_to(imp, node, x, [d for i, d in enumerate(src) if i not in axes])


@_rule("Unsqueeze")
def _unsqueeze(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    ins = _arity(imp, node, 2)
    x = imp.data(ins[0])
    src = imp.types[x].shape
    raw = _axes_operand(imp, node, ins, at)
    rank = len(src) + len(raw)
    axes = {_axis(imp, a, rank, "axes") for a in raw}
    if len(axes) != len(raw):
        raise imp.error(f"axes {raw} repeat an axis", "inputs")
    rest = iter(src)
    _reshape_to(imp, node, x, [1 if i in axes else next(rest) for i in range(rank)])


@_rule("Transpose", attrs=("perm",))
def _transpose(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (a,) = _arity(imp, node, 1)
    x = imp.data(a)
    rank = len(imp.types[x].shape)
    perm = tuple(int(p) for p in at.get("perm", range(rank - 1, -1, -1)))
    imp.emit(node.output[0], "transpose", [x], {"axes": perm})


@_rule("Concat", attrs=("axis",))
def _concat(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    if "axis" not in at:
        raise imp.error("needs attribute 'axis'", "attrs.axis")
    xs = [imp.data(i) for i in node.input]
    rank = len(imp.types[xs[0]].shape) if xs else 0
    imp.emit(node.output[0], "concat", xs, {"axis": _axis(imp, int(at["axis"]), rank)})


@_rule("Gather", attrs=("axis",))
def _gather(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    a, i = _arity(imp, node, 2)
    x = imp.data(a)
    axis = _axis(imp, int(at.get("axis", 0)), len(imp.types[x].shape))
    imp.emit(node.output[0], "take", [x, imp.data(i)], {"axis": axis})


_REDUCE = {"ReduceSum": ("sum", 0), "ReduceMean": ("mean", 18), "ReduceMax": ("max", 18)}


def _reduce(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    op, _ = _REDUCE[node.op_type]
    ins = _arity(imp, node, 1, 2)
    x = imp.data(ins[0])
    rank = len(imp.types[x].shape)
    raw = _axes_operand(imp, node, ins, at)
    if not raw and at.get("noop_with_empty_axes", 0):
        _reshape_to(imp, node, x, imp.types[x].shape)
        return
    axes = None if not raw else tuple(sorted({_axis(imp, a, rank, "axes") for a in raw}))
    keep = bool(at.get("keepdims", 1))
    imp.emit(node.output[0], op, [x], {"axis": axes, "keepdims": keep})


for _name, (_, _until) in _REDUCE.items():
    _rule(_name, attrs=("keepdims", "noop_with_empty_axes"), axes_attr_until=_until)(_reduce)


@_rule("Constant", attrs=("value", "value_float", "value_floats", "value_int", "value_ints"))
def _constant(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    _arity(imp, node, 0)
    if len(at) != 1:
        raise imp.error("needs exactly one value attribute", "attrs")
    ((key, v),) = at.items()
    if key == "value":
        arr = imp.array(v, "attribute 'value'")
    elif key.startswith("value_float"):
        arr = np.array(v, dtype=np.float32)
    else:
        arr = np.array(v, dtype=np.int64)
    imp.stored[node.output[0]] = arr  # a node once used as data (see `data`)
    imp.constant_outputs.add(node.output[0])


@_rule("Cast", attrs=("to", "saturate"))
def _cast(imp: _Importer, node: Any, at: dict[str, Any]) -> None:
    (a,) = _arity(imp, node, 1)
    dtype = _DTYPES.get(int(at.get("to", 0)))
    if dtype is None:
        raise imp.error(f"cast to ONNX data type {at.get('to')} is not supported", "attrs.to")
    imp.emit(node.output[0], "astype", [imp.data(a)], {"dtype": dtype})


# -- export ---------------------------------------------------------------------------------

_EXPORT_SAME = {v: k for k, v in {**_UNARY, **_BINARY, **_VARIADIC}.items()}
_EXPORT_SAME.update({"pow": "Pow", "softmax": "Softmax", "log_softmax": "LogSoftmax"})


def to_onnx(
    graph: Graph,
    outputs: Sequence[str],
    params: Mapping[str, np.ndarray] | None = None,
    name: str = "graphgrad",
) -> onnx.ModelProto:
    """The forward pass of `graph` as an ONNX model (opset EXPORT_OPSET): every node, one ONNX
    node each, under its own name; inputs named in `params` become initializers holding those
    values, the other inputs graph inputs; `outputs` are the model's outputs. An op with no
    ONNX form is an error naming the node."""
    onnx = _onnx()
    h = onnx.helper
    params = dict(params or {})
    nodes, inits, ins = [], [], []
    for node, t in zip(graph.nodes, graph.types, strict=True):
        n, op, at = node.name, node.op, node.attrs
        if op == "input":
            if n in params:
                arr = np.ascontiguousarray(params.pop(n))
                if not t.matches(arr):
                    raise ValueError(
                        f"to_onnx: param '{n}' is {arr.shape} {arr.dtype}, the input is "
                        f"{t.shape} {t.dtype}"
                    )
                inits.append(onnx.numpy_helper.from_array(arr, n))
            else:
                ins.append(h.make_tensor_value_info(n, _ELEM[t.dtype], t.shape))
        elif op == "constant":
            value = onnx.numpy_helper.from_array(np.ascontiguousarray(at["value"]), n)
            nodes.append(h.make_node("Constant", [], [n], name=n, value=value))
        elif op in _EXPORT_SAME:
            nodes.append(h.make_node(_EXPORT_SAME[op], list(node.inputs), [n], name=n, **at))
        elif op == "reshape":
            shape = onnx.numpy_helper.from_array(np.array(at["shape"], np.int64), f"{n}/shape")
            inits.append(shape)
            nodes.append(h.make_node("Reshape", [node.inputs[0], shape.name], [n], name=n))
        elif op == "transpose":
            rank = len(t.shape)
            perm = at.get("axes") or tuple(range(rank - 1, -1, -1))
            nodes.append(h.make_node("Transpose", list(node.inputs), [n], name=n, perm=perm))
        elif op == "concat":
            nodes.append(h.make_node("Concat", list(node.inputs), [n], name=n, axis=at["axis"]))
        elif op == "take":
            nodes.append(h.make_node("Gather", list(node.inputs), [n], name=n, axis=at["axis"]))
        elif op == "astype":
            to = _ELEM[at["dtype"]]
            nodes.append(h.make_node("Cast", list(node.inputs), [n], name=n, to=to))
        elif op in ("sum", "mean", "max") and at.get("axis") == ():
            # Over no axes (numpy: the input itself); ONNX's empty axes mean every axis.
            nodes.append(h.make_node("Identity", list(node.inputs), [n], name=n))
        elif op in ("sum", "mean", "max"):
            nodes += _export_reduce(onnx, node)
            if op == "sum" and at.get("axis") is not None:
                inits.append(_axes_tensor(onnx, node))
        else:
            raise ValidationError(f"op '{op}' has no ONNX export", node=n, field="op")
    if params:
        raise ValueError(f"to_onnx: params {sorted(params)} are not inputs of the graph")
    missing = [o for o in outputs if o not in graph.index]
    if missing:
        raise ValueError(f"to_onnx: outputs {missing} are not nodes of the graph")
    outs = [
        h.make_tensor_value_info(o, _ELEM[graph.types[graph.index[o]].dtype],
                                 graph.types[graph.index[o]].shape)
        for o in outputs
    ]  # fmt: skip
    body = h.make_graph(nodes, name, ins, outs, initializer=inits)
    model = h.make_model(body, opset_imports=[h.make_opsetid("", EXPORT_OPSET)])
    model.producer_name = "graphgrad"
    onnx.checker.check_model(model)
    return model


def _axes_tensor(onnx: Any, node: Node) -> Any:
    axes = np.array(node.attrs["axis"], np.int64).reshape(-1)
    return onnx.numpy_helper.from_array(axes, f"{node.name}/axes")


def _export_reduce(onnx: Any, node: Node) -> list[Any]:
    op = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax"}[node.op]
    axes = node.attrs.get("axis")
    keep = int(bool(node.attrs.get("keepdims", False)))
    ins = [node.inputs[0]]
    extra: dict[str, Any] = {}
    if axes is not None:
        axes = [axes] if isinstance(axes, int) else list(axes)
        if op == "ReduceSum":
            ins.append(f"{node.name}/axes")
        else:
            extra["axes"] = axes
    return [onnx.helper.make_node(op, ins, [node.name], name=node.name, keepdims=keep, **extra)]
