"""Graph IR: validation errors name the node and the problem; traversals are iterative."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphgrad.engine import (
    Graph,
    LocalExecutor,
    Node,
    RunRequest,
    UnknownOpError,
    ValidationError,
    tensors,
)
from graphgrad.engine.errors import name_list
from graphgrad.engine.ops import AttrKind, AttrSpec, Op, check_attr

from .strategies import random_graphs

_FLOAT = {"f": AttrSpec(AttrKind.FLOAT)}


def inp(name, shape=(3,), dtype="float64"):
    return Node(name, "input", shape=shape, dtype=dtype)


@pytest.mark.parametrize(
    ("nodes", "node", "field", "message"),
    [
        ([inp("x"), Node("y", "frobnicate", ("x",))], "y", "op", "unknown op 'frobnicate'"),
        ([inp("x"), Node("y", "tanh", ("x", "x"))], "y", "inputs", "takes 1 input(s), got 2"),
        ([inp("x"), Node("y", "concat", ())], "y", "inputs", "at least one input"),
        ([inp("x"), Node("y", "sum", ("x",), {"axis": "0"})], "y", "attrs.axis", "must be an int"),
        ([inp("x"), Node("y", "sum", ("x",), {"axes": 0})], "y", "attrs.axes", "has no attribute"),
        ([inp("x"), Node("y", "reshape", ("x",))], "y", "attrs.shape", "needs attribute 'shape'"),
        ([inp("x"), Node("y", "sum", ("x",), {"axis": 3})], "y", "attrs.axis", "out of range"),
        ([inp("x", ()), Node("y", "sum", ("x",), {"axis": 0})], "y", "attrs.axis", "rank 0"),
        ([inp("x", ()), Node("y", "max", ("x",), {"axis": (-1,)})], "y", "attrs.axis", "rank 0"),
        (
            [inp("x", (0,)), Node("y", "reshape", ("x",), {"shape": (0, 2**63 - 1)})],
            "y",
            "attrs.shape",
            "dimension 1 is 9223372036854775807",
        ),
        (
            [inp("x", (0,)), Node("y", "reshape", ("x",), {"shape": (2**32, 2**32, 0)})],
            "y",
            "attrs.shape",
            "multiply to more than",
        ),
        (
            [inp("x"), Node("y", "broadcast_to", ("x",), {"shape": (0, 2**62, 3)})],
            "y",
            "attrs.shape",
            "multiply to more than",
        ),
        (
            [inp("a", (2**40, 0)), inp("b", (0, 2**40)), Node("y", "matmul", ("a", "b"))],
            "y",
            "shape",
            "multiply to more than",
        ),
        (
            [inp("x"), Node("y", "reshape", ("x",), {"shape": (4,)})],
            "y",
            "inputs",
            "cannot reshape",
        ),
        (
            [inp("x"), inp("z", (4,)), Node("y", "add", ("x", "z"))],
            "y",
            "inputs",
            "do not broadcast",
        ),
        (
            [inp("x"), inp("z", (3,), "float32"), Node("y", "mul", ("x", "z"))],
            "y",
            "inputs",
            "dtype mismatch",
        ),
        (
            [inp("x", (2, 3)), inp("w", (4, 5)), Node("y", "matmul", ("x", "w"))],
            "y",
            "inputs",
            "inner dimensions differ",
        ),
        ([inp("x"), Node("y", "tanh", ("nope",))], "y", "inputs", "'nope' is not a node"),
        ([inp("x"), Node("x", "tanh", ("x",))], "x", "name", "duplicate node name 'x'"),
        (
            [inp("x"), Node("a", "add", ("x", "b")), Node("b", "tanh", ("a",))],
            None,
            "inputs",
            "cycle",
        ),
        ([Node("x", "input", shape=(3,))], "x", "dtype", "must declare its shape and dtype"),
        ([Node("x", "input", shape=(3,), dtype="int8")], "x", "dtype", "dtype must be one of"),
        ([Node("x", "input", shape=(-1,), dtype="float64")], "x", "shape", "negative size"),
        ([Node("x", "input", shape=(0, 2**63 - 1), dtype="float64")], "x", "shape", "dimension 1"),
        ([Node("x", "input", shape=(2**32, 2**32, 0), dtype="float64")], "x", "shape", "multiply"),
        ([Node("x", "input", shape=(1,) * 33, dtype="float64")], "x", "shape", "rank 33"),
        ([Node("", "input", shape=(3,), dtype="float64")], "", "name", "node name must be"),
        ([inp("x"), Node("y", "tanh", ("x",), shape=(4,))], "y", "shape", "differs from inferred"),
    ],
)
def test_validation_errors_name_the_node_and_the_problem(nodes, node, field, message):
    with pytest.raises(ValidationError, match=re.escape(message)) as e:
        Graph(nodes)
    if node is not None:
        assert e.value.node == node
    assert e.value.field == field


def test_unknown_op_is_its_own_error_and_lists_known_ops():
    with pytest.raises(UnknownOpError, match="known ops: .*matmul"):
        Graph([inp("x"), Node("y", "conv9d", ("x",))])


def test_cycle_error_names_the_cycle():
    with pytest.raises(ValidationError, match="a -> b -> a|b -> a -> b"):
        Graph([inp("x"), Node("a", "add", ("x", "b")), Node("b", "tanh", ("a",))])


def test_a_long_cycle_names_the_first_few_nodes_and_the_count():
    names = [f"n{i}" for i in range(5000)]
    nodes = [Node(a, "neg", (b,)) for a, b in zip(names, [*names[1:], names[0]], strict=True)]
    with pytest.raises(ValidationError, match="5,000 nodes.*'n0', 'n1', 'n2' and 4,997 more$"):
        Graph(nodes)


def test_name_list_shows_the_first_few_names_and_counts_the_rest():
    assert name_list([]) == ""
    assert name_list(["a"]) == "'a'"
    assert name_list("abcde") == "'a', 'b', 'c' and 2 more"
    assert name_list([f"i{k}" for k in range(3000)]) == "'i0', 'i1', 'i2' and 2,997 more"
    assert len(name_list(["x" * 100_000] * 3)) < 300


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((0, 2**63 - 1), "dimension 1 is 9223372036854775807"),
        ((-1,), "dimension 0 is -1, a negative size"),
        ((2**32, 2**32, 0), "multiply to more than"),
        ((1,) * 33, "rank 33"),
    ],
)
def test_decoding_a_shape_numpy_cannot_hold_names_the_shape(shape, words):
    with pytest.raises(tensors.TensorFormatError, match=re.escape(words)) as e:
        tensors.decode("float64", shape, b"", what="feeds['x']")
    assert e.value.part == "shape"


def test_every_shape_that_passes_fits_numpy_at_the_widest_dtype():
    """The element bound times 8 bytes stays within int64: numpy can hold what passes."""
    from graphgrad.engine.ops._registry import MAX_ELEMENTS, shape_problem

    assert shape_problem((MAX_ELEMENTS,)) is None
    assert shape_problem((MAX_ELEMENTS + 1,)) is not None
    view = np.broadcast_to(np.zeros((), np.float64), (MAX_ELEMENTS,))  # no memory taken
    assert view.nbytes == MAX_ELEMENTS * 8


def test_float_attributes_must_be_finite():
    op = Op("scale", 1, lambda ins, at: ins[0], lambda xs, at: xs[0], None, attrs=_FLOAT)
    assert check_attr(op, "f", 2, node="y") == 2.0
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValidationError, match="must be a finite float") as e:
            check_attr(op, "f", bad, node="y")
        assert e.value.field == "attrs.f"


def test_nodes_are_immutable():
    n = Node("y", "tanh", ("x",))
    with pytest.raises(AttributeError):
        n.name = "z"  # type: ignore[misc]
    with pytest.raises(TypeError):
        n.attrs["axis"] = 1  # type: ignore[index]
    assert n.replace(name="z").name == "z" and n.name == "y"


def test_a_chain_a_million_deep_runs_forward_and_backward():
    depth = 1_000_000
    nodes = [inp("x", ())]
    nodes += [Node(f"n{i}", "neg", ("x" if i == 0 else f"n{i - 1}",)) for i in range(depth)]
    nodes.reverse()  # out of order on purpose: the sort must handle it without recursion
    graph = Graph(nodes)
    assert graph.nodes[0].name == "x" and graph.nodes[-1].name == f"n{depth - 1}"
    res = LocalExecutor().run(graph, RunRequest((f"n{depth - 1}",), {"x": np.array(2.0)}, ("x",)))
    assert res.values[f"n{depth - 1}"] == 2.0  # an even number of negations
    assert res.grads["x"] == 1.0
    assert len(graph.fingerprint) == 64


@given(random_graphs())
def test_topological_order_respects_every_edge(case):
    nodes, _, _, _ = case
    graph = Graph(reversed(nodes))
    for i, ins in enumerate(graph.input_pos):
        assert all(j < i for j in ins)


@given(random_graphs(), st.randoms(use_true_random=False))
def test_fingerprint_is_stable_and_ignores_node_order(case, rnd):
    nodes, _, _, _ = case
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert Graph(nodes).fingerprint == Graph(shuffled).fingerprint == Graph(list(nodes)).fingerprint


@given(random_graphs(), st.integers(0, 10**6))
def test_fingerprint_changes_with_any_content(case, k):
    nodes, _, _, _ = case
    base = Graph(nodes).fingerprint
    i = len(nodes) - 3 - k % (len(nodes) - 3)  # some non-loss node
    n = nodes[i]
    changed = (
        n.replace(shape=(4,))
        if n.op == "input"
        else n.replace(op="tanh" if n.op != "tanh" else "sin", inputs=n.inputs[:1])
    )
    other = [changed if m is n else m for m in nodes]
    try:
        changed_fp = Graph(other).fingerprint
    except ValidationError:
        assert n.op == "input"  # a new input shape may no longer fit its consumers
    else:
        assert changed_fp != base
    renamed = Graph([*nodes[:-1], nodes[-1].replace(name="loss2")])
    assert renamed.fingerprint != base
    const = [inp("x"), Node("c", "constant", {}, {"value": np.ones(3)})]
    const2 = [inp("x"), Node("c", "constant", {}, {"value": np.full(3, 1.0 + 2**-40)})]
    assert Graph(const).fingerprint != Graph(const2).fingerprint


@given(random_graphs(), st.randoms(use_true_random=False))
def test_gradients_are_bit_identical_whichever_topological_order(case, rnd):
    nodes, feeds, out, wrt = case
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    a, b = Graph(nodes), Graph(shuffled)
    ra = LocalExecutor().run(a, RunRequest((out,), feeds, tuple(wrt)))
    rb = LocalExecutor().run(b, RunRequest((out,), feeds, tuple(wrt)))
    assert ra.values[out].tobytes() == rb.values[out].tobytes()
    for w in wrt:
        assert ra.grads[w].tobytes() == rb.grads[w].tobytes(), w


@given(random_graphs(max_nodes=12))
def test_random_graph_gradients_match_finite_differences(case):
    nodes, feeds, out, wrt = case
    graph = Graph(nodes)
    inputs = [w for w in wrt if w.startswith("in")]
    res = LocalExecutor().run(graph, RunRequest((out,), feeds, tuple(inputs)))

    def f(name, x):
        return LocalExecutor().run(graph, RunRequest((out,), {**feeds, name: x})).values[out]

    # A central difference also carries the rounding of f itself, about eps * |f| / h: with a
    # loss of 1e8 that alone is 1e-2 (hypothesis found such a graph), so it is allowed for.
    h = 1e-6
    rounding = 8 * np.finfo(np.float64).eps * float(np.max(np.abs(res.values[out]))) / h
    for name in inputs:
        x = feeds[name]
        num = np.zeros_like(x)
        for i in range(x.size):
            e = np.zeros_like(x)
            e.flat[i] = h
            num.flat[i] = (f(name, x + e) - f(name, x - e)) / (2 * h)
        np.testing.assert_allclose(res.grads[name], num, rtol=1e-5, atol=1e-6 + rounding)
