"""The op registry: one `Op` per op, holding its shape rule, forward, VJP and cost side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

import numpy as np

from graphgrad.engine.errors import UnknownOpError, ValidationError

FLOAT_DTYPES: tuple[str, ...] = ("float32", "float64")
# Integer tensors hold what is not differentiated: labels, indices, counts.
INT_DTYPES: tuple[str, ...] = ("int32", "int64")
DTYPES: tuple[str, ...] = FLOAT_DTYPES + INT_DTYPES
NP_DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPES}
# dtype -> name by dict lookup: `ndarray.dtype.name` is a slow Python property on hot paths.
DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in NP_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorType:
    """Static type of a node's value: shape and dtype (a name from DTYPES)."""

    shape: tuple[int, ...]
    dtype: str

    def matches(self, a: np.ndarray) -> bool:
        """Whether an array has exactly this shape and dtype (cheap: on every node's hot path)."""
        return a.shape == self.shape and a.dtype == NP_DTYPES[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: a huge declared shape cannot overflow

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class AttrKind(Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    INTS = "ints"  # tuple of ints (a shape, a permutation)
    AXES = "axes"  # None (all axes), an int or a tuple of ints
    TENSOR = "tensor"  # an np.ndarray (constants)
    DTYPE = "dtype"  # a dtype name from DTYPES (astype)


@dataclass(frozen=True, slots=True)
class AttrSpec:
    kind: AttrKind
    required: bool = False
    default: Any = None


Attrs = Mapping[str, Any]
InferFn = Callable[[Sequence[TensorType], Attrs], TensorType]
ForwardFn = Callable[[Sequence[np.ndarray], Attrs], np.ndarray]
# vjp(g, inputs, output, attrs, wants) -> one gradient per input, in input order; None where
# the input has none or `wants[i]` is False. The numeric form of `grad` (below): execution
# runs `grad`'s nodes; tests/test_ops.py checks that both give the same bits.
VjpFn = Callable[
    [np.ndarray, Sequence[np.ndarray], np.ndarray, Attrs, Sequence[bool]],
    Sequence[np.ndarray | None],
]
FlopsFn = Callable[[Sequence[TensorType], TensorType, Attrs], float]
# kernel(attrs, input types) -> a function of the input arrays alone, what compiled programs
# call (engine/codegen.py); by default a wrapper of `forward`.
KernelFn = Callable[[Attrs, Sequence[TensorType]], Callable[..., Any]]


class Emitter(Protocol):
    """What a gradient rule builds with (engine/grad.py): nodes of registered ops, by name."""

    def emit(self, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None) -> str:
        """A new node applying `op` to the named nodes; returns its name."""
        ...

    def const(self, value: float, like: str) -> str:
        """A 0-d constant of the dtype of node `like`."""
        ...

    def type(self, name: str) -> TensorType: ...


# grad(emitter, g, input names, output name, attrs, wants) -> one gradient node per input, in
# input order; None where the input has none or `wants[i]` is False. The graph form of `vjp`:
# it emits the same numpy operations in the same order, so both give identical bits.
GradFn = Callable[[Emitter, str, Sequence[str], str, Attrs, Sequence[bool]], Sequence[str | None]]
# batch(emitter, input refs, template input types, template output type, attrs) -> the name of
# the node holding all networks' values, network axis first (see engine/batching.py).
BatchFn = Callable[[Any, Sequence[Any], Sequence[TensorType], TensorType, dict[str, Any]], str]


def elementwise_flops(ins: Sequence[TensorType], out: TensorType, attrs: Attrs) -> float:
    return float(out.size)


@dataclass(frozen=True, slots=True)
class Op:
    """Everything the engine knows about one op."""

    name: str
    arity: int | None  # None: variadic (at least one input)
    infer: InferFn
    forward: ForwardFn
    vjp: VjpFn | None
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    flops: FlopsFn = elementwise_flops
    doc: str = ""
    batch: BatchFn | None = None  # None: the op cannot be batched (inputs, constants)
    # Most ulps a result moves when the op runs stacked rather than alone (dynamic batching
    # of requests; measured per op by tests/test_dynamic_batching.py, in docs/batching.md).
    batch_ulps: int = 0
    grad: GradFn | None = None  # None: no gradient flows through (inputs, constants)
    kernel: KernelFn | None = None
    # Argument names, in input order (for a variadic op, one name for them all): what
    # signature(), ListOps and docs/ops.md show. Empty: x0, x1, ...
    inputs: tuple[str, ...] = ()
    # False: every input must be a float, checked before `infer` by `register`. True: `infer`
    # checks dtypes itself (ops that take indices or labels, or move values of any dtype).
    any_dtype: bool = False
    # The kernel is a numpy ufunc that may write its result into the buffer of a dead input
    # of the output's type (`out=`) with the same bits: exact IEEE arithmetic only (add, sub,
    # mul, div, neg), whose result never depends on the loop numpy picks; compiled programs
    # (engine/codegen.py) decide which buffers are dead.
    inplace: bool = False

    def lower(self, attrs: Attrs, types: Sequence[TensorType]) -> Callable[..., Any]:
        """The function of the input arrays a compiled program calls for this op."""
        if self.kernel is not None:
            return self.kernel(attrs, types)
        forward = self.forward

        def call(*xs: np.ndarray) -> np.ndarray:
            return np.asarray(forward(xs, attrs))

        return call

    def signature(self) -> str:
        if self.arity is None:
            ins = f"*{self.inputs[0] if self.inputs else 'xs'}"
        else:
            ins = ", ".join(self.inputs or [f"x{i}" for i in range(self.arity)])
        attrs = ", ".join(
            f"{n}: {s.kind.value}{'' if s.required else '=' + repr(s.default)}"
            for n, s in self.attrs.items()
        )
        return f"{self.name}({ins}{', ' if ins and attrs else ''}{attrs})"


class ShapeError(Exception):
    """Raised by shape rules; validation turns it into a ValidationError naming the node and
    `field` (the node's inputs unless an attribute is to blame)."""

    def __init__(self, message: str, *, field: str = "inputs"):
        self.field = field
        super().__init__(message)


MAX_RANK = 32
# Elements counted with zero dimensions skipped (numpy's own rule): times the widest dtype's
# 8 bytes this is 2**63 - 8, within int64, so numpy can hold any shape that passes.
MAX_ELEMENTS = 2**60 - 1


def shape_problem(shape: Sequence[Any]) -> str | None:
    """Why `shape` cannot be a tensor's shape (None if it can), in exact Python ints.

    The one check every shape from outside goes through: declared, fed, attributes, inferred.
    """
    if len(shape) > MAX_RANK:
        return f"rank {len(shape)} is over the largest allowed ({MAX_RANK})"
    count = 1
    for i, d in enumerate(shape):
        if type(d) is not int:  # the common case first: this runs for every node
            if not isinstance(d, int | np.integer) or isinstance(d, bool | np.bool_):
                return f"dimension {i} is {d!r:.40}, not an int"
            d = int(d)
        if d < 0:
            return f"dimension {i} is {d}, a negative size"
        if d > 1:
            count *= d
        if count > MAX_ELEMENTS:
            return (
                f"dimension {i} is {d}: the dimensions (zeros skipped) multiply to more than "
                f"{MAX_ELEMENTS:,} elements, the most a tensor may have"
            )
    return None


def check_shape(shape: Sequence[Any], what: str, field: str = "inputs") -> tuple[int, ...]:
    """`shape` as a tuple of ints, or a ShapeError saying why it is no tensor's shape."""
    problem = shape_problem(shape)
    if problem is not None:
        raise ShapeError(f"{what} {_short(shape)}: {problem}", field=field)
    return tuple(map(int, shape))


def _short(shape: Sequence[Any]) -> str:
    return str(tuple(shape)) if len(shape) <= 8 else f"({', '.join(map(str, shape[:8]))}, ...)"


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add `op` to the registry; returns the registered entry (its `infer` checks that inputs
    are floats unless the op says `any_dtype`)."""
    if op.name in REGISTRY:
        raise ValueError(f"op '{op.name}' is registered twice")
    if not op.any_dtype and op.arity != 0:
        op = replace(op, infer=_floats_only(op))
    REGISTRY[op.name] = op
    return op


def _floats_only(op: Op) -> InferFn:
    infer = op.infer

    def checked(ins: Sequence[TensorType], attrs: Attrs) -> TensorType:
        for k, t in enumerate(ins):
            if t.dtype not in FLOAT_DTYPES:
                names = REGISTRY.get(op.name, op).inputs  # as documented, maybe later
                arg = names[min(k, len(names) - 1)] if names else f"x{k}"
                raise ShapeError(
                    f"input {k} ({arg}) is {t.dtype}, but this op takes "
                    f"{' or '.join(FLOAT_DTYPES)} (convert with astype)"
                )
        return infer(ins, attrs)

    return checked


def lookup(name: str, *, node: str | None = None) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownOpError(
            f"unknown op '{name}' (known ops: {', '.join(sorted(REGISTRY))})",
            node=node,
            field="op",
        ) from None


def _check_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:  # a scalar has no axis at all
        raise ShapeError(f"{what} {axis} is out of range for rank {ndim}", field="attrs.axis")
    return axis % ndim


def normalize_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    """None: all axes; an int or tuple: sorted, non-negative, checked for range and repeats."""
    if axes is None:
        return tuple(range(ndim))
    raw = (axes,) if isinstance(axes, int) else tuple(axes)
    norm = tuple(_check_axis(a, ndim, "axis") for a in raw)
    if len(set(norm)) != len(norm):
        raise ShapeError(f"axis {raw} repeats an axis", field="attrs.axis")
    return tuple(sorted(norm))


def check_attr(op: Op, name: str, value: Any, *, node: str | None) -> Any:
    """Validate one attribute against the op's spec; returns it in canonical form."""
    spec = op.attrs.get(name)
    if spec is None:
        raise ValidationError(
            f"op '{op.name}' has no attribute '{name}' (expected one of {sorted(op.attrs)})",
            node=node,
            field=f"attrs.{name}",
        )

    def bad(expected: str) -> ValidationError:
        return ValidationError(
            f"attribute '{name}' of op '{op.name}' must be {expected}, got {value!r:.80}",
            node=node,
            field=f"attrs.{name}",
        )

    def is_int(v: Any) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    kind = spec.kind
    if kind is AttrKind.INT:
        if not is_int(value):
            raise bad("an int")
        return int(value)
    if kind is AttrKind.FLOAT:
        if (
            not isinstance(value, float | int)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise bad("a finite float")
        return float(value)
    if kind is AttrKind.BOOL:
        if not isinstance(value, bool | np.bool_):
            raise bad("a bool")
        return bool(value)
    if kind is AttrKind.INTS:
        if not isinstance(value, tuple | list) or not all(is_int(v) for v in value):
            raise bad("a list of ints")
        return tuple(int(v) for v in value)
    if kind is AttrKind.AXES:
        if value is None:
            return None
        if is_int(value):
            return int(value)
        if isinstance(value, tuple | list) and all(is_int(v) for v in value):
            return tuple(int(v) for v in value)
        raise bad("an int, a list of ints or absent")
    if kind is AttrKind.DTYPE:
        try:
            dtype = None if value is None else np.dtype(value).name  # np.dtype(None) is f8
        except (TypeError, ValueError):
            dtype = None
        if dtype not in DTYPES:
            raise bad(f"a dtype, one of {DTYPES}")
        return dtype
    if kind is AttrKind.TENSOR:
        if not isinstance(value, np.ndarray) or value.dtype.name not in DTYPES:
            raise bad(f"an array of dtype {' or '.join(DTYPES)}")
        return value
    raise AssertionError(kind)
