"""Argument names and docs for registry entries written without them.

The registry is the one source of op documentation: `Op.doc` and `Op.inputs` feed
`Op.signature()`, the ListOps RPC, `client.list_ops()`, the SDK op functions' docstrings and
docs/ops.md. Entries that carry their own doc keep it; this table fills in the rest (ops
defined before docs were part of an entry), applied once when the registry is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from graphgrad.engine.ops._registry import REGISTRY

_BROADCAST = "a and b broadcast as in numpy and share one float dtype."
_REDUCE = (
    "over `axis` (absent: every axis; an int or a tuple of ints); `keepdims` keeps the "
    "reduced axes with size 1."
)

# op -> (argument names, doc); a doc of None keeps the entry's own.
TABLE: dict[str, tuple[tuple[str, ...], str | None]] = {
    "add": (("a", "b"), f"a + b, elementwise. {_BROADCAST}"),
    "sub": (("a", "b"), f"a - b, elementwise. {_BROADCAST}"),
    "mul": (("a", "b"), f"a * b, elementwise. {_BROADCAST}"),
    "div": (("a", "b"), f"a / b, elementwise. {_BROADCAST}"),
    "pow": (
        ("a", "b"),
        f"a ** b, elementwise. {_BROADCAST} The gradient in b at a == 0 is taken as 0.",
    ),
    "maximum": (
        ("a", "b"),
        f"the larger of a and b, elementwise. {_BROADCAST} Where they tie, the gradient is "
        "split evenly between them (as in JAX).",
    ),
    "minimum": (
        ("a", "b"),
        f"the smaller of a and b, elementwise. {_BROADCAST} Where they tie, the gradient is "
        "split evenly between them (as in JAX).",
    ),
    "select_share": (("a", "b"), None),
    "matmul": (
        ("a", "b"),
        "numpy.matmul: the matrix product a @ b. 1-d operands are a row (a) or a column (b) "
        "vector; leading (batch) axes broadcast.",
    ),
    "sum": (("x",), f"the sum of x's elements {_REDUCE}"),
    "mean": (("x",), f"the mean of x's elements {_REDUCE}"),
    "max": (
        ("x",),
        f"the largest of x's elements {_REDUCE} Elements tied for the max share the gradient.",
    ),
    "max_share": (("x",), None),
    "reshape": (
        ("x",),
        "x with a new shape of the same number of elements, in row-major order; one entry of "
        "`shape` may be -1 (inferred).",
    ),
    "transpose": (
        ("x",),
        "numpy.transpose: x's axes permuted by `axes` (absent: reversed).",
    ),
    "broadcast_to": (
        ("x",),
        "numpy.broadcast_to: x repeated along new leading axes and along its size-1 axes to "
        "`shape`. Its gradient sums over the repeats.",
    ),
    "concat": (
        ("xs",),
        "numpy.concatenate: the inputs joined along `axis`; they agree on every other axis "
        "and share one dtype.",
    ),
}

# Ops whose VJP rule gives no gradient at all: piecewise constant or integer outputs
# (tests/test_op_docs.py checks this against each rule).
NO_GRADIENT = frozenset(
    {
        "less",
        "less_equal",
        "greater",
        "greater_equal",
        "equal",
        "not_equal",
        "argmax",
        "argmin",
        "step",
        "sign",
        "select_share",
        "max_share",
    }
)

_AT = {  # where the derivative is taken by convention
    "relu": "; the gradient at 0 is 0",
    "abs": "; the gradient at 0 is 0 (sign(0))",
    "sqrt": "; the gradient at 0 is inf",
    "log": "; log(0) is -inf",
}
UNARY = ("neg", "exp", "log", "tanh", "sigmoid", "relu", "sin", "cos", "sqrt", "abs")
HELPERS = ("step", "sign", "safe_log")


def apply() -> None:
    """Fill in the registry entries' missing argument names and docs."""
    for name in (*UNARY, *HELPERS):
        TABLE.setdefault(name, (("x",), None))
    for name in UNARY:  # their entries say what; say how it applies
        op = REGISTRY.get(name)
        if op is not None and op.doc and "elementwise" not in op.doc:
            REGISTRY[name] = replace(
                op, doc=f"{op.doc}, elementwise, of a float tensor{_AT.get(name, '')}"
            )
    for name, (inputs, doc) in TABLE.items():
        op = REGISTRY.get(name)
        if op is None:
            continue
        REGISTRY[name] = replace(
            op,
            inputs=op.inputs or inputs,
            doc=op.doc or doc or "",
        )


@dataclass(frozen=True, slots=True)
class AttrInfo:
    """One attribute of an op: its name, kind (an AttrKind value) and whether it is required."""

    name: str
    kind: str
    required: bool


@dataclass(frozen=True, slots=True)
class OpInfo:
    """What `client.list_ops()` gives for one op, locally or from a server's ListOps."""

    name: str
    signature: str  # with named arguments: "take(x, indices, axis: int=0)"
    doc: str
    inputs: tuple[str, ...]
    attrs: tuple[AttrInfo, ...]
    arity: int | None  # None: variadic
    differentiable: bool

    def __str__(self) -> str:
        return f"{self.signature}: {self.doc}" if self.doc else self.signature


def op_infos() -> list[OpInfo]:
    """Every registered op, by name."""
    out = []
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        out.append(
            OpInfo(
                name,
                op.signature(),
                op.doc,
                op.inputs,
                tuple(AttrInfo(k, s.kind.value, s.required) for k, s in op.attrs.items()),
                op.arity,
                op.vjp is not None and name not in NO_GRADIENT,
            )
        )
    return out
