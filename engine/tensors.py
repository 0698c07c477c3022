"""Tensors as bytes: little-endian, row-major, no padding (the wire format, without protobuf).

Decoding is zero-copy (`np.frombuffer`); encoding copies once into `bytes`, which is what
protobuf stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graphgrad.engine.ops import DTYPE_NAMES, DTYPES, shape_problem

_WIRE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}


class TensorFormatError(ValueError):
    """The bytes do not describe a tensor of the stated shape and dtype; `part` names the
    part at fault ("dtype", "shape" or "data")."""

    def __init__(self, message: str, part: str = "data"):
        self.part = part
        super().__init__(message)


def decode(
    dtype: str,
    shape: Sequence[int],
    data: bytes,
    *,
    max_bytes: int | None = None,
    what: str = "tensor",
) -> np.ndarray:
    if dtype not in _WIRE:
        raise TensorFormatError(f"{what}: dtype must be one of {DTYPES}, got {dtype!r}", "dtype")
    problem = shape_problem(shape)
    if problem is not None:
        raise TensorFormatError(f"{what}.shape: {problem}", "shape")
    wire = _WIRE[dtype]
    expected = math.prod(shape) * wire.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise TensorFormatError(
            f"{what}: shape {tuple(shape)} needs {expected} bytes, over the limit of {max_bytes}"
        )
    if len(data) != expected:
        raise TensorFormatError(
            f"{what}: shape {tuple(shape)} {dtype} needs {expected} bytes of data, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=wire).reshape(tuple(shape))
    return arr if wire.isnative else arr.astype(wire.newbyteorder("="))


def encode(arr: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, data) of an array of a supported dtype."""
    name = DTYPE_NAMES.get(arr.dtype)
    if name is None:
        raise TensorFormatError(f"dtype must be one of {DTYPES}, got {arr.dtype}")
    if not arr.flags.c_contiguous or not arr.dtype.isnative or not _WIRE[name].isnative:
        arr = np.ascontiguousarray(arr, dtype=_WIRE[name])
    return name, arr.shape, arr.tobytes()
