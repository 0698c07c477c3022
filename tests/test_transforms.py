"""Function transforms (gg.grad, gg.value_and_grad, gg.vmap) over Python functions: hand-derived
gradients, central differences on pytrees, vmap against a Python loop, one trace per argument
signature, nesting, and the same transforms against a real server."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg
from tests.gradcheck import numerical_vjp
from tests.server_proc import running_server

XS = np.array([0.5, 1.5, -2.0, 3.0])


@pytest.mark.parametrize("x", XS)
def test_grad_of_one_over_x_squared_is_minus_two_over_x_cubed(x):
    assert gg.grad(lambda v: 1 / v**2)(x) == pytest.approx(-2 / x**3, rel=1e-12)


@pytest.mark.parametrize("x", XS)
def test_x_over_x_squared_adds_both_paths(x):
    # y = x / x^2 reaches x directly and through x^2: dy/dx = 1/x^2 - 2x * x/x^4 = -1/x^2
    value, dydx = gg.value_and_grad(lambda v: v / v**2)(x)
    assert value == pytest.approx(1 / x, rel=1e-12)
    assert dydx == pytest.approx(-1 / x**2, rel=1e-12)


@pytest.mark.parametrize("x", XS)
def test_grad_of_grad_is_the_second_derivative(x):
    d2 = gg.grad(gg.grad(lambda v: 1 / v**2))
    assert d2(x) == pytest.approx(6 / x**4, rel=1e-12)


def make_loss(m):
    """One model written once, run by graphgrad (m=gg) and by numpy (m=np) for the check."""

    def loss(params, batch):
        h = m.tanh(params["W"] @ batch[0] + params["b"])
        out = params["layers"][1] * (params["layers"][0] @ h)
        return m.sum((out - batch[1]) ** 2) + m.sum(params["b"] ** 2)

    return loss


def random_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.standard_normal((3, 4)),
        "b": rng.standard_normal(3),
        "layers": [rng.standard_normal((2, 3)), rng.standard_normal(2)],
    }
    batch = (rng.standard_normal(4), rng.standard_normal(2))
    return params, batch


def leaves(params):
    return [params["W"], params["b"], *params["layers"]]


def rebuild(xs):
    return {"W": xs[0], "b": xs[1], "layers": [xs[2], xs[3]]}


def test_gradients_on_pytrees_match_central_differences():
    params, batch = random_problem()
    value, g = gg.value_and_grad(make_loss(gg))(params, batch)
    loss_np = make_loss(np)
    assert value == pytest.approx(loss_np(params, batch), rel=1e-12)
    assert set(g) == {"W", "b", "layers"} and isinstance(g["layers"], list)
    expected = numerical_vjp(lambda xs: loss_np(rebuild(xs), batch), leaves(params), np.ones(()))
    for got, want in zip(leaves(g), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_argnums_tuple_differentiates_each_argument_in_its_structure():
    params, batch = random_problem(1)
    gp, gb = gg.grad(make_loss(gg), argnums=(0, 1))(params, batch)
    assert isinstance(gb, tuple) and len(gb) == 2
    loss_np = make_loss(np)
    want_b = numerical_vjp(lambda xs: loss_np(params, tuple(xs)), list(batch), np.ones(()))
    for got, want in zip(gb, want_b, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gp["W"], gg.grad(make_loss(gg))(params, batch)["W"], rtol=1e-15)


def test_has_aux_returns_the_auxiliary_nodes_as_arrays():
    def f(x):
        h = gg.tanh(x)
        return gg.sum(h**2), {"h": h, "twice": 2 * h}

    x = np.array([0.3, -1.2])
    (value, aux), g = gg.value_and_grad(f, has_aux=True)(x)
    assert value == pytest.approx(np.sum(np.tanh(x) ** 2), rel=1e-14)
    np.testing.assert_allclose(aux["h"], np.tanh(x), rtol=1e-15)
    np.testing.assert_allclose(aux["twice"], 2 * np.tanh(x), rtol=1e-15)
    np.testing.assert_allclose(g, 2 * np.tanh(x) * (1 - np.tanh(x) ** 2), rtol=1e-12)
    g2, aux2 = gg.grad(f, has_aux=True)(x)
    np.testing.assert_array_equal(g2, g)
    np.testing.assert_array_equal(aux2["h"], aux["h"])


def test_an_argument_the_function_ignores_gets_zeros():
    g = gg.grad(lambda x, y: gg.sum(x * 2), argnums=1)(np.ones(2), np.ones(3))
    np.testing.assert_array_equal(g, np.zeros(3))


def test_python_if_on_a_node_raises_the_builders_error():
    def f(x):
        return x if x else -x

    with pytest.raises(TypeError, match="truth value of graph node 'x'"):
        gg.grad(f)(1.0)


def test_python_if_on_a_comparison_raises_the_builders_error():
    def f(x):
        return x if x > 0 else -x

    with pytest.raises(TypeError, match="truth value of graph node 'greater_\\d+'"):
        gg.grad(f)(1.0)


def test_integer_labels_are_arguments_that_are_not_differentiated():
    rng = np.random.default_rng(5)
    X, labels = rng.standard_normal((5, 2)), np.array([0, 1, 2, 1, 0])
    W = rng.standard_normal((2, 3))

    def loss(W, X, labels):
        return gg.mean(gg.softmax_cross_entropy(X @ W, labels))

    value, g = gg.value_and_grad(loss)(W, X, labels)
    logits = X @ W
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert value == pytest.approx(-np.mean(np.log(p[np.arange(5), labels])), rel=1e-12)
    np.testing.assert_allclose(g, X.T @ (p - np.eye(3)[labels]) / 5, rtol=1e-12, atol=1e-15)
    with pytest.raises(gg.RequestError, match="wrt 'labels' is int64"):
        gg.grad(loss, argnums=2)(W, X, labels)


def test_bad_uses_get_clear_errors():
    with pytest.raises(TypeError, match="must return a scalar, got shape \\(3,\\)"):
        gg.grad(lambda x: x * 2)(np.ones(3))
    with pytest.raises(TypeError, match="takes a Python function .* got int"):
        gg.grad(3)
    with pytest.raises(TypeError, match="argument x is a str"):
        gg.grad(lambda x: x)("a")
    with pytest.raises(TypeError, match="dtype int8"):
        gg.grad(lambda x: gg.sum(x))(np.ones(2, np.int8))
    with pytest.raises(ValueError, match="argnums 2 out of range for 1"):
        gg.grad(lambda x: x, argnums=2)(1.0)
    with pytest.raises(TypeError, match="must return \\(value, aux\\)"):
        gg.grad(lambda x: x, has_aux=True)(1.0)
    with pytest.raises(ValueError, match="different sizes"):
        gg.vmap(lambda a, b: a * b)(np.ones((2, 3)), np.ones((3, 3)))


def test_graph_level_grad_still_builds_nodes():
    with gg.Graph():
        x = gg.input("x")
        dy = gg.grad(1 / x**2, x)
        assert isinstance(dy, gg.Tensor)
        res = gg.connect().run(dy, {"x": 2.0})
    assert res.value == pytest.approx(-0.25)


def test_vmap_equals_a_python_loop():
    rng = np.random.default_rng(2)
    W, xs, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(3)

    def f(W, x, b):
        return {"y": gg.tanh(W @ x + b), "n": gg.sum(x**2)}

    out = gg.vmap(f, in_axes=(None, 0, None))(W, xs, b)
    np.testing.assert_allclose(out["y"], [np.tanh(W @ x + b) for x in xs], rtol=1e-14)
    np.testing.assert_allclose(out["n"], [np.sum(x**2) for x in xs], rtol=1e-14)
    # the mapped axis may sit anywhere on the way in and out
    moved = gg.vmap(lambda x: gg.tanh(W @ x), in_axes=1, out_axes=1)(xs.T)
    np.testing.assert_allclose(moved, np.stack([np.tanh(W @ x) for x in xs], axis=1), rtol=1e-14)


def test_vmap_over_a_dict_of_stacked_parameters_is_an_ensemble():
    rng = np.random.default_rng(6)
    stacked = {"W": rng.standard_normal((4, 3, 2)), "b": rng.standard_normal((4, 3))}
    x, t = rng.standard_normal(2), rng.standard_normal(3)

    def loss(p, x, t):
        return gg.sum((gg.tanh(p["W"] @ x + p["b"]) - t) ** 2)

    losses, grads = gg.vmap(gg.value_and_grad(loss), in_axes=(0, None, None))(stacked, x, t)
    for k in range(4):
        one = {"W": stacked["W"][k], "b": stacked["b"][k]}
        value, g = gg.value_and_grad(loss)(one, x, t)
        assert losses[k] == pytest.approx(value, rel=1e-13)
        np.testing.assert_allclose(grads["W"][k], g["W"], rtol=1e-13)
        np.testing.assert_allclose(grads["b"][k], g["b"], rtol=1e-13)


def test_the_trace_cache_is_bounded():
    from graphgrad._transforms import CACHE_ENTRIES

    g = gg.grad(lambda x: gg.sum(x))
    for n in range(1, CACHE_ENTRIES + 6):
        np.testing.assert_array_equal(g(np.zeros(n)), np.ones(n))
    assert g.traces == CACHE_ENTRIES + 5 and g.cache_size() == CACHE_ENTRIES


def test_vmap_of_grad_gives_per_example_gradients_and_grad_of_vmap_their_sum():
    xs = np.arange(1.0, 7.0).reshape(3, 2)
    per_example = gg.vmap(gg.grad(lambda x: gg.sum(x**3)))(xs)
    np.testing.assert_allclose(per_example, 3 * xs**2, rtol=1e-14)
    summed = gg.grad(lambda x: gg.sum(gg.vmap(lambda r: gg.sum(r**3))(x)))(xs)
    np.testing.assert_allclose(summed, 3 * xs**2, rtol=1e-14)


def rnn_loss(params, xs, target):
    h = gg.tanh(params["Wx"] @ xs[0])
    for x in xs[1:]:
        h = gg.tanh(params["Wx"] @ x + params["Wh"] @ h)
    return gg.sum((h - target) ** 2)


def test_rnn_over_lengths_two_to_eleven_traces_one_graph_per_length():
    rng = np.random.default_rng(3)
    params = {"Wx": rng.standard_normal((3, 2)) * 0.5, "Wh": rng.standard_normal((3, 3)) * 0.5}
    calls = []

    def counted(params, xs, target):
        calls.append(len(xs))
        return rnn_loss(params, xs, target)

    vg = gg.value_and_grad(counted)
    target = rng.standard_normal(3)
    for _ in range(2):
        for length in range(2, 12):
            xs = [rng.standard_normal(2) for _ in range(length)]
            value, g = vg(params, xs, target)
            assert np.isfinite(value) and g["Wx"].shape == (3, 2) and g["Wh"].shape == (3, 3)
    assert calls == list(range(2, 12))  # traced once per length, the second pass ran cached
    assert vg.traces == 10 and vg.cache_size() == 10
    # and a length's gradient is right: central differences at length 4
    xs = [rng.standard_normal(2) for _ in range(4)]
    _, g = vg(params, xs, target)

    def rnn_np(ws):
        h = np.tanh(ws[0] @ xs[0])
        for x in xs[1:]:
            h = np.tanh(ws[0] @ x + ws[1] @ h)
        return np.sum((h - target) ** 2)

    want = numerical_vjp(rnn_np, [params["Wx"], params["Wh"]], np.ones(()))
    np.testing.assert_allclose(g["Wx"], want[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["Wh"], want[1], rtol=1e-6, atol=1e-9)


def test_the_fingerprint_names_one_graph_per_signature():
    g = gg.grad(lambda x: gg.sum(x**2))
    a = g.fingerprint(np.ones(3))
    assert g.fingerprint(np.zeros(3)) == a
    assert g.fingerprint(np.ones(4)) != a
    assert g.fingerprint(np.ones(3, np.float32)) != a
    assert g.traces == 3


@pytest.fixture(scope="module")
def remote():
    with running_server() as server, gg.connect(server.address) as client:
        yield client


def test_transforms_run_the_same_on_a_server(remote):
    params, batch = random_problem(4)
    local = gg.value_and_grad(make_loss(gg))(params, batch)
    vg = gg.value_and_grad(make_loss(gg), client=remote)
    for _ in range(2):
        value, g = vg(params, batch)
        assert value == pytest.approx(local[0], rel=1e-12)
        for got, want in zip(leaves(g), leaves(local[1]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)
    assert vg.traces == 1
    xs = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(
        gg.vmap(lambda r: gg.sum(r**2), client=remote)(xs), (xs**2).sum(1), rtol=1e-14
    )
    assert gg.grad(gg.grad(lambda v: 1 / v**2), client=remote)(2.0) == pytest.approx(6 / 16)


def test_a_bool_is_not_an_axis_or_an_argument_number():
    """True is an int to Python; as an axis or argnums it is a mistake, not axis 1."""
    xs = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match="in_axes .*True"):
        gg.vmap(lambda x: x * 2, in_axes=True)(xs)
    with pytest.raises(ValueError, match="in_axes .*True"):
        gg.vmap(lambda x, y: x * y, in_axes=(0, True))(xs, xs)
    with pytest.raises(ValueError, match="out_axes .*True"):
        gg.vmap(lambda x: x * 2, out_axes=True)(xs)
    with pytest.raises(ValueError, match="argnums True"):
        gg.grad(lambda x, y: gg.sum(x * y), argnums=True)(xs, xs)


def test_input_names_stay_unique_when_paths_collide():
    """A dict key holding '.' can spell another leaf's path; each input keeps its own name."""
    d = {"a": {"b": np.ones(2), "b#2": np.full(2, 2.0)}, "a.b": np.full(2, 3.0)}
    grads = gg.grad(lambda d: gg.sum(d["a"]["b"] * 1.0 + d["a"]["b#2"] * 2.0 + d["a.b"] * 3.0))(d)
    np.testing.assert_array_equal(grads["a"]["b"], np.ones(2))
    np.testing.assert_array_equal(grads["a"]["b#2"], np.full(2, 2.0))
    np.testing.assert_array_equal(grads["a.b"], np.full(2, 3.0))


def test_the_gradient_for_an_empty_argument_is_empty():
    """JAX's answer: the structure of the argument, with no leaves; nothing to run."""
    f = lambda d, x: gg.sum(x * 2.0)  # noqa: E731
    assert gg.grad(f)({}, np.ones(2)) == {}
    assert gg.grad(f)([], np.ones(2)) == []
    value, grads = gg.value_and_grad(f, argnums=(0, 1))({}, np.ones(2))
    assert value == 4.0 and grads[0] == {}
    np.testing.assert_array_equal(grads[1], np.full(2, 2.0))
