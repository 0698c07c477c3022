"""What one kernel call allocates while it runs, from declared sizes: its output, numpy's
iteration buffers, and the temporaries of a kernel that is more than one numpy call. Both
memory estimates count steps with it: the compiled programs' (engine/memory.py) and the eager
tier's (engine/tape_memory.py)."""

from __future__ import annotations

from collections.abc import Iterable

# Ops whose kernel is one numpy call allocating at most its output: the ufuncs of
# engine/ops/elementwise.py's `_unary`/`_binary`, reductions, reshape (a copy is its output),
# broadcast_to (a view). Every other op (softmax, losses, matmul, ops added later) is counted
# with two temporaries the size of its largest operand (a log-softmax holds x - max(x) and
# its exponential at once).
NO_TEMPORARY = frozenset(
    {"neg", "exp", "log", "tanh", "sin", "cos", "sqrt", "abs", "sign"}
    | {"add", "sub", "mul", "div", "pow", "maximum", "minimum"}
    | {"sum", "mean", "max", "reshape", "broadcast_to"}
)
# numpy's iteration buffer per operand of a buffered op (a reduction over a strided axis, a
# cast): 8192 elements of up to 8 bytes, or the operand if it is smaller.
BUFFER_BYTES = 8192 * 8


def step_extra(op: str, out: int, ins: Iterable[int]) -> int:
    """The bytes a call of `op`'s kernel holds beyond its operands and its output of `out`
    bytes, while it runs, its operands being of `ins` bytes."""
    largest, buffers = out, min(out, BUFFER_BYTES)
    for size in ins:
        largest = max(largest, size)
        buffers += min(size, BUFFER_BYTES)
    return buffers + (0 if op in NO_TEMPORARY else 2 * largest)
