"""The closed op registry. Importing this package registers every op."""

from collections.abc import Iterable

from graphgrad.engine.ops import (  # noqa: F401  (they register)
    compare,
    docs,
    elementwise,
    indexing,
    linalg,
    loss,
    reduce,
    select,
    shape,
    source,
)
from graphgrad.engine.ops._registry import (
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    NP_DTYPES,
    REGISTRY,
    AttrKind,
    Attrs,
    AttrSpec,
    Op,
    ShapeError,
    TensorType,
    check_attr,
    check_shape,
    lookup,
    normalize_axes,
    register,
    shape_problem,
)
from graphgrad.engine.ops.source import CONSTANT, INPUT

docs.apply()

# The version of the op set: a graph names the opset it was written against, and a server
# refuses a newer one. 2: integer dtypes, indexing, comparisons, where, astype, logsumexp,
# argmax/argmin and integer labels for softmax_cross_entropy.
OPSET_VERSION = 2
# The ops each opset added after the first. A client writes the lowest opset that holds a
# graph, so a server of an older opset still runs every graph it can.
ADDED_IN: dict[int, frozenset[str]] = {
    2: frozenset(
        {"strided_slice", "pad_slice", "take", "scatter_add", "take_along_axis"}
        | {"put_along_axis_add", "less", "less_equal", "greater", "greater_equal", "equal"}
        | {"not_equal", "argmax", "argmin", "where", "astype", "logsumexp"}
    ),
}


def opset_of(ops: Iterable[str], dtypes: Iterable[str]) -> int:
    """The lowest opset with these ops and dtypes (integer tensors came with opset 2)."""
    used = set(ops)
    need = max((v for v, added in ADDED_IN.items() if used & added), default=1)
    return max(need, 2) if any(d in INT_DTYPES for d in dtypes) else need


__all__ = [
    "CONSTANT",
    "DTYPES",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "ADDED_IN",
    "OPSET_VERSION",
    "NP_DTYPES",
    "INPUT",
    "REGISTRY",
    "AttrKind",
    "AttrSpec",
    "Attrs",
    "Op",
    "ShapeError",
    "TensorType",
    "check_attr",
    "check_shape",
    "lookup",
    "normalize_axes",
    "opset_of",
    "register",
    "shape_problem",
]
