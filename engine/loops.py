"""How many inner loops numpy runs for one node: what its cost beyond elements and bytes is.

numpy evaluates an op as an outer iteration over inner loops along contiguous runs. A node of
same-shaped arrays is one loop; a broadcast ([n, 64, 16] + [n, 1, 16]) or a reduction over a
middle axis runs one short loop per run of the innermost dimensions, and each costs more than
the few elements it handles; a stacked matmul calls its kernel once per matrix. The
calibration (engine/calibration.py) measures a loop's cost per family; the planner's cost
model multiplies it by these counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from graphgrad.engine.ops import Op
from graphgrad.engine.ops._registry import Attrs, TensorType

LOOPED = ("elementwise", "compare", "select", "reduce", "linalg")
# Ops whose kernel returns a view of its input: no element is read or written.
VIEWS = frozenset({"reshape", "transpose", "broadcast_to", "slice"})


def family(op: Op) -> str:
    """An op's family: the module of engine/ops/ that defines it (elementwise, linalg, ...)."""
    return op.forward.__module__.rsplit(".", 1)[-1]


def inner_loops(op: Op, ins: Sequence[TensorType], out: TensorType, attrs: Attrs) -> int:
    """Inner loops beyond the first (0 for a node of one contiguous loop)."""
    kind = family(op)
    if kind == "linalg":
        return _matrices(out) - 1
    if kind == "reduce":
        return _reduction_loops(ins[0].shape, attrs.get("axis")) - 1 if ins else 0
    if kind in LOOPED:
        return _broadcast_loops(ins, out) - 1
    return 0


def _matrices(out: TensorType) -> int:
    return math.prod(out.shape[:-2]) if len(out.shape) > 2 else 1


def _broadcast_loops(ins: Sequence[TensorType], out: TensorType) -> int:
    """Runs of the innermost dimensions over which every input keeps one stride pattern
    (matching the output, or broadcast along it): numpy coalesces those into one loop."""
    shape = out.shape
    inputs = [t.shape for t in ins if t.size > 1 and t.shape != shape]
    if not inputs or not shape:
        return 1
    run, rank = 1, len(shape)

    def broadcast(s: tuple[int, ...], d: int) -> bool:  # d counts from the end
        k = len(s) - rank + d
        return k < 0 or s[k] != shape[d]

    first = [broadcast(s, rank - 1) for s in inputs]
    for d in range(rank - 1, -1, -1):
        if [broadcast(s, d) for s in inputs] != first:
            break
        run *= shape[d]
    return max(1, math.prod(shape) // max(run, 1))


def _reduction_loops(shape: tuple[int, ...], axis: object) -> int:
    """A reduction over the last axis runs one loop per output element; over a middle axis,
    one per run of the dimensions after the last reduced one."""
    rank = len(shape)
    if axis is None or rank == 0:
        return 1
    axes = {a % rank for a in (axis if isinstance(axis, tuple | list) else (axis,))}
    if axes == set(range(rank)):
        return 1
    last = max(axes)
    size = math.prod(shape)
    if last == rank - 1:  # one loop per output element
        return max(1, math.prod(shape[d] for d in range(rank) if d not in axes))
    return max(1, size // max(math.prod(shape[last + 1 :]), 1))
