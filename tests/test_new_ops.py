"""The opset-2 SDK against numpy: indexing and slicing, gathers, comparisons, where, clip,
stack/split/squeeze/expand_dims, min, logsumexp, argmax and the Tensor methods; values equal
numpy's and gradients equal hand-derived ones or central differences."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg

from .gradcheck import numerical_vjp

RNG = np.random.default_rng(5)
X = RNG.standard_normal((4, 5))
CLIENT = gg.LocalClient()


def run_with_grad(build, x=X):
    """The value of build(x) and the gradient of sum(u * build(x)) in x, with u fixed."""
    with gg.Graph():
        xn = gg.input("x", x.shape)
        out = build(xn)
        u = np.random.default_rng(1).standard_normal(out.shape)
        loss = gg.sum(out * u)
    res = CLIENT.run([loss, out], {"x": x}, wrt=["x"])
    return res.values[out.name], res.grads["x"], u


INDEXING = [
    ("int", lambda x: x[1], lambda x: x[1]),
    ("negative int", lambda x: x[-1, -2], lambda x: x[-1, -2]),
    ("slice", lambda x: x[:, 1:3], lambda x: x[:, 1:3]),
    ("step", lambda x: x[::2, 4:0:-2], lambda x: x[::2, 4:0:-2]),
    ("reversed", lambda x: x[::-1], lambda x: x[::-1]),
    ("newaxis", lambda x: x[None, :, 2], lambda x: x[None, :, 2]),
    ("ellipsis", lambda x: x[..., -1], lambda x: x[..., -1]),
    ("empty", lambda x: x[3:1], lambda x: x[3:1]),
    ("gather", lambda x: x[np.array([3, 0, 3, -1])], lambda x: x[np.array([3, 0, 3, -1])]),
    ("gather list", lambda x: x[:, [4, 0]], lambda x: x[:, [4, 0]]),
    ("gather 2-d", lambda x: x[np.array([[0, 1], [1, 1]])], lambda x: x[[[0, 1], [1, 1]]]),
]


@pytest.mark.parametrize(("build", "ref"), [c[1:] for c in INDEXING], ids=[c[0] for c in INDEXING])
def test_indexing_is_numpy_indexing_and_its_gradient_scatters_back(build, ref):
    value, grad, u = run_with_grad(build)
    np.testing.assert_array_equal(value, ref(X))
    # the transpose of numpy's indexing: each picked element gets its u (repeats add up)
    flat = np.zeros(X.size)
    np.add.at(flat, ref(np.arange(X.size).reshape(X.shape)).ravel(), u.ravel())
    np.testing.assert_array_equal(grad, flat.reshape(X.shape))


def test_gather_by_an_integer_input_and_take_along_axis():
    labels = np.array([3, 0, 2, -1])
    with gg.Graph():
        x = gg.input("x", (4, 5))
        idx = gg.input("idx", 4, np.int64)
        rows = x[idx]
        picked = gg.take_along_axis(x, gg.expand_dims(idx, 1), axis=1)
        cols = gg.take(x, idx, axis=1)
        loss = gg.sum(picked) + gg.sum(rows * rows)
    res = CLIENT.run([loss, rows, picked, cols], {"x": X, "idx": labels}, wrt=["x"])
    np.testing.assert_array_equal(res.values[rows.name], X[labels])
    np.testing.assert_array_equal(res.values[picked.name], X[np.arange(4), labels][:, None])
    np.testing.assert_array_equal(res.values[cols.name], X[:, labels])
    expected = np.zeros_like(X)
    np.add.at(expected, labels, 2 * X[labels])
    expected[np.arange(4), labels] += 1
    np.testing.assert_allclose(res.grads["x"], expected, rtol=1e-15)


def test_an_index_out_of_range_is_an_error_naming_the_node():
    with gg.Graph():
        x = gg.input("x", (4, 5))
        with pytest.raises(IndexError, match="index 4 is out of range for axis 0 of node 'x'"):
            x[4]
        with pytest.raises(IndexError, match="too many indices"):
            x[0, 0, 0]
        with pytest.raises(IndexError, match="only integers, slices"):
            x[np.array([0.5])]
        idx = gg.input("idx", 2, "int32")
        rows = gg.take(x, idx, name="rows")
    with pytest.raises(gg.GraphError) as e:
        CLIENT.run(rows, {"x": X, "idx": np.array([1, 7], np.int32)})
    assert e.value.node == "rows" and "index 7 is out of range for axis 0 of size 4" in str(e.value)


def test_comparisons_are_ops_and_equality_on_a_node_raises():
    with gg.Graph():
        x = gg.input("x", (4, 5))
        outs = [x < 0, x <= X[0], x > 0.5, x >= 0, gg.equal(x, 0), gg.not_equal(x, X)]
        with pytest.raises(TypeError, match=r"use gg.equal\(a, b\)"):
            x == x  # noqa: B015
        with pytest.raises(TypeError, match="gg.not_equal"):
            x != 0  # noqa: B015
        with pytest.raises(TypeError, match="truth value"):
            bool(x < 0)
    res = CLIENT.run(outs, {"x": X})
    expected = [X < 0, np.less_equal(X, X[0]), X > 0.5, X >= 0, X == 0, X != X]
    for o, e in zip(outs, expected, strict=True):
        assert res.values[o.name].dtype == np.float64
        np.testing.assert_array_equal(res.values[o.name], e.astype(np.float64))


def test_a_mask_passes_no_gradient_of_its_own():
    value, grad, u = run_with_grad(lambda x: x * (x > 0))
    np.testing.assert_array_equal(value, X * (X > 0))
    np.testing.assert_array_equal(grad, u * (X > 0))


def test_where_and_clip():
    value, grad, u = run_with_grad(lambda x: gg.where(x > 0, x, 0.1 * x))
    np.testing.assert_array_equal(value, np.where(X > 0, X, 0.1 * X))
    np.testing.assert_allclose(grad, np.where(X > 0, u, 0.1 * u), rtol=1e-15)
    value, grad, u = run_with_grad(lambda x: gg.clip(x, -0.5, 0.5))
    np.testing.assert_array_equal(value, np.clip(X, -0.5, 0.5))
    np.testing.assert_array_equal(grad, u * (np.abs(X) < 0.5))
    value, _, _ = run_with_grad(lambda x: x.clip(None, 0.0))
    np.testing.assert_array_equal(value, np.minimum(X, 0.0))


def test_stack_split_squeeze_expand_dims():
    with gg.Graph():
        x = gg.input("x", (4, 5))
        parts = gg.split(x, [1, 3], axis=1)
        halves = gg.split(x, 2)
        stacked = gg.stack([x, 2 * x], axis=1)
        squeezed = gg.squeeze(x[:, :1])
        expanded = gg.expand_dims(x, (0, -1))
        with pytest.raises(ValueError, match="3 equal parts do not divide axis 0 of size 4"):
            gg.split(x, 3)
        with pytest.raises(ValueError, match="axis 0 of"):
            gg.squeeze(x, 0)
    outs = [*parts, *halves, stacked, squeezed, expanded]
    res = CLIENT.run(outs, {"x": X})
    expected = [
        *np.split(X, [1, 3], axis=1),
        *np.split(X, 2),
        np.stack([X, 2 * X], axis=1),
        X[:, 0],
        np.expand_dims(X, (0, -1)),
    ]
    for o, e in zip(outs, expected, strict=True):
        np.testing.assert_array_equal(res.values[o.name], e)


def test_reductions_and_methods_match_numpy():
    cases = [
        (lambda x: x.max(1), lambda x: x.max(1)),
        (lambda x: x.min(0), lambda x: x.min(0)),
        (lambda x: gg.logsumexp(x, axis=1), lambda x: np.log(np.exp(x).sum(1))),
        (lambda x: gg.logsumexp(x), lambda x: np.log(np.exp(x).sum())),
        (lambda x: abs(x).exp(), lambda x: np.exp(np.abs(x))),
        (lambda x: (x * x).log(), lambda x: np.log(x * x)),
        (lambda x: x.tanh().sum(), lambda x: np.tanh(x).sum()),
        (lambda x: x.T.flatten(), lambda x: x.T.ravel()),
        (lambda x: x.transpose(1, 0), lambda x: x.transpose(1, 0)),
    ]
    for build, ref in cases:
        value, grad, u = run_with_grad(build)
        np.testing.assert_allclose(value, ref(X), rtol=1e-13)
        (numeric,) = numerical_vjp(lambda xs, ref=ref: ref(xs[0]), [X], u)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_logsumexp_does_not_overflow_and_its_gradient_is_softmax():
    big = np.array([[1000.0, 1000.0], [-np.inf, 0.0]])
    value, grad, u = run_with_grad(lambda x: gg.logsumexp(x, axis=1), big)
    np.testing.assert_allclose(value, [1000 + np.log(2), 0.0])
    np.testing.assert_allclose(grad, u[:, None] * [[0.5, 0.5], [0.0, 1.0]])


def test_argmax_argmin_give_int64_indices():
    with gg.Graph():
        x = gg.input("x", (4, 5))
        outs = [x.argmax(1), gg.argmin(x), gg.argmax(x, axis=0, keepdims=True)]
    res = CLIENT.run(outs, {"x": X})
    for o, e in zip(outs, [X.argmax(1), X.argmin(), X.argmax(0, keepdims=True)], strict=True):
        assert res.values[o.name].dtype == np.int64 and o.dtype == "int64"
        np.testing.assert_array_equal(res.values[o.name], e)


def test_softmax_cross_entropy_with_integer_labels_equals_one_hot_labels():
    labels = np.array([1, 4, 0, 4])
    with gg.Graph():
        logits = gg.input("logits", (4, 5))
        sparse = gg.softmax_cross_entropy(logits, labels).sum()
        dense = gg.softmax_cross_entropy(logits, np.eye(5)[labels]).sum()
    a = CLIENT.run(sparse, {"logits": X}, wrt=["logits"])
    b = CLIENT.run(dense, {"logits": X}, wrt=["logits"])
    np.testing.assert_allclose(a.values[sparse.name], b.values[dense.name], rtol=1e-14)
    p = np.exp(X) / np.exp(X).sum(1, keepdims=True)
    np.testing.assert_allclose(a.grads["logits"], p - np.eye(5)[labels], atol=1e-15)


def test_new_ops_give_the_same_bits_partitioned_as_in_one_program():
    """Branches of opset-2 ops cut into partitions (the tasks Ray would run, here inline)
    give the bits of the one-program run, values and gradients."""
    from graphgrad.engine import LocalExecutor, RunRequest

    with gg.Graph() as g:
        x = gg.input("x", (4, 5))
        idx = gg.input("idx", 3, np.int64)
        branches = [
            gg.sum(x[idx] * 2.0),
            gg.sum(x[::-1, 1:4] ** 2),
            gg.logsumexp(x, axis=1).sum(),
            gg.sum(gg.where(x > 0, x, 0.1 * x)),
            gg.softmax_cross_entropy(x[:3], idx).sum(),
            gg.sum(gg.take_along_axis(x[:3], gg.expand_dims(idx, 1), axis=1)),
            gg.sum(gg.clip(x, -0.5, 0.5) * gg.argmax(x, 1).astype("float64")[:, None]),
        ]
        total = branches[0]
        for b in branches[1:]:
            total = total + b
    graph = g.freeze()
    request = RunRequest((total.name,), {"x": X, "idx": np.array([2, 0, -1])}, ("x",))
    one = LocalExecutor().run(graph, request)
    split = LocalExecutor(min_partition_seconds=0.0)
    parts = split.run(graph, request)
    assert len(split.plan(graph, request)[0].partitions) > 1
    assert parts.values[total.name].tobytes() == one.values[total.name].tobytes()
    assert parts.grads["x"].tobytes() == one.grads["x"].tobytes()


def test_a_step_past_int64_takes_one_element_and_the_graph_still_encodes(tmp_path):
    """x[::2**70] is numpy's first row; the stride it records must fit the wire's int64."""
    with gg.Graph():
        x = gg.input("x", X.shape)
        first, last = x[:: 2**70], x[:: -(2**70)]
        loss = gg.sum(first) + 2.0 * gg.sum(last)
    path = gg.save(tmp_path / "steps.gg", [first, last, loss])
    saved = gg.load(path)
    res = CLIENT.run(saved.outputs[:2], {"x": X})
    np.testing.assert_array_equal(res.values[first.name], X[:: 2**70])
    np.testing.assert_array_equal(res.values[last.name], X[:: -(2**70)])
    res = CLIENT.run(saved.outputs[2], {"x": X}, wrt=["x"])
    want = np.zeros_like(X)
    want[0], want[-1] = 1.0, 2.0
    np.testing.assert_array_equal(res.grads["x"], want)


@pytest.mark.parametrize("labels", [np.zeros(2, np.int64), np.zeros((2, 0))], ids=["int", "prob"])
def test_softmax_cross_entropy_over_no_classes_is_refused_as_the_graph_is_built(labels):
    """A loss over zero classes has no softmax; said when built, not numpy's message at run."""
    with gg.Graph():
        logits = gg.input("logits", (2, 0))
        with pytest.raises(gg.ValidationError, match=r"logits \(2, 0\) have no classes"):
            gg.softmax_cross_entropy(logits, labels)


def test_an_empty_index_list_gathers_nothing_and_a_huge_one_names_itself():
    """x[[]] is numpy's empty gather; x[[2**63]] names 2**63, not the int64 it wraps to."""
    got, grad, _ = run_with_grad(lambda x: x[[]])
    assert got.shape == X[[]].shape == (0, 5)
    np.testing.assert_array_equal(grad, np.zeros_like(X))
    with gg.Graph():
        x = gg.input("x", X.shape)
        with pytest.raises(IndexError, match="index 9223372036854775808 .* out of range"):
            x[[2**63]]


def test_clip_at_a_bound_splits_the_gradient_with_the_bound_as_documented():
    """At x == bound the gradient is halved between x and the bound (minimum/maximum ties,
    as in JAX); the halves add up to the derivative either side agrees on (1)."""
    x0 = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    with gg.Graph():
        x = gg.input("x", shape=5)
        lo, hi = gg.input("lo", shape=5), gg.input("hi", shape=5)
        loss = gg.sum(gg.clip(x, lo, hi))
    feeds = {"x": x0, "lo": np.full(5, -0.5), "hi": np.full(5, 0.5)}
    g = CLIENT.run(loss, feeds, wrt=["x", "lo", "hi"]).grads
    np.testing.assert_array_equal(g["x"], [0.0, 0.5, 1.0, 0.5, 0.0])
    np.testing.assert_array_equal(g["lo"], [1.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(g["hi"], [0.0, 0.0, 0.0, 0.5, 1.0])
