"""numpy's inner loops per node (engine/loops.py): what the cost model charges beyond
elements and bytes, counted by hand for the layouts stacked training produces."""

from __future__ import annotations

import pytest

from graphgrad.engine.loops import inner_loops
from graphgrad.engine.ops import TensorType, lookup


def t(*shape: int) -> TensorType:
    return TensorType(shape, "float32")


@pytest.mark.parametrize(
    ("a", "b", "extra"),
    [
        (t(250, 64, 16), t(250, 64, 16), 0),  # same shapes: one loop
        (t(250, 64, 16), t(), 0),  # a scalar rides along
        (t(250, 64, 16), t(250, 1, 16), 250 * 64 - 1),  # one loop per run of 16
        (t(64, 16), t(16), 64 - 1),  # broadcast over the outer axis: one loop per row
        (t(2048, 16), t(2048, 1), 2048 - 1),  # broadcast along the inner axis
    ],
)
def test_broadcast_loops(a: TensorType, b: TensorType, extra: int) -> None:
    out = t(*a.shape)
    assert inner_loops(lookup("add"), [a, b], out, {}) == extra


@pytest.mark.parametrize(
    ("axis", "extra"),
    [(None, 0), ((0, 1, 2), 0), (1, 250 * 64 - 1), (2, 250 * 64 - 1), (0, 250 - 1)],
)
def test_reduction_loops(axis: object, extra: int) -> None:
    x = t(250, 64, 16)
    assert inner_loops(lookup("sum"), [x], t(1), {"axis": axis}) == extra


def test_a_stacked_matmul_runs_once_per_matrix() -> None:
    mm = lookup("matmul")
    assert inner_loops(mm, [t(250, 64, 4), t(250, 4, 16)], t(250, 64, 16), {}) == 249
    assert inner_loops(mm, [t(64, 4), t(4, 16)], t(64, 16), {}) == 0


def test_views_and_other_ops_have_none() -> None:
    assert inner_loops(lookup("transpose"), [t(250, 64, 16)], t(250, 16, 64), {}) == 0
