"""The closed op registry. Importing this package registers every op."""

from . import (  # noqa: F401  (they register)
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
from ._registry import (
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
from .source import CONSTANT, INPUT

docs.apply()

# The version of the op set: a graph names the opset it was written against, and a server
# refuses a newer one. 2: integer dtypes, indexing, comparisons, where, astype, logsumexp,
# argmax/argmin and integer labels for softmax_cross_entropy.
OPSET_VERSION = 2

__all__ = [
    "CONSTANT",
    "DTYPES",
    "DTYPE_NAMES",
    "FLOAT_DTYPES",
    "INT_DTYPES",
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
    "register",
    "shape_problem",
]
