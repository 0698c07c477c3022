"""The closed op registry. Importing this package registers every op."""

from . import elementwise, linalg, loss, reduce, shape, source  # noqa: F401  (they register)
from ._registry import (
    DTYPE_NAMES,
    DTYPES,
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

__all__ = [
    "CONSTANT",
    "DTYPES",
    "DTYPE_NAMES",
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
