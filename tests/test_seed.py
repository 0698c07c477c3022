"""The lecture's worked examples, exactly, against hand-derived formulas."""

import numpy as np
import pytest

import graphgrad as gg


@pytest.mark.parametrize("xv", [0.5, 1.0, 2.0, -3.0])
def test_one_over_x_squared(xv):
    with gg.Graph():
        x = gg.input("x")
        z = x**2  # g(u) = u^2
        y = 1 / z  # f(u) = 1/u
    res = gg.connect().run(y, {"x": xv}, wrt=[x, z])
    assert res.value == pytest.approx(1 / xv**2, rel=1e-15)
    assert res.grads["x"] == pytest.approx(-2 / xv**3, rel=1e-15)
    assert res.grads[z.name] == pytest.approx(-1 / (xv**2) ** 2, rel=1e-15)  # dy/dz = -1/z^2


@pytest.mark.parametrize("xv", [0.5, 1.5, -2.0])
def test_two_paths_into_x_add_up(xv):
    with gg.Graph():
        x = gg.input("x")
        z = gg.mul(x, x, name="z")  # z = x^2
        y = gg.div(x, z, name="y")  # y = f(z, x) = x / z: x reaches y along two paths
    res = gg.connect().run(y, {"x": xv}, wrt=["x", "z"])
    assert res.grads["z"] == pytest.approx(-xv / xv**4, rel=1e-15)  # dy/dz = -x/z^2
    # dy/dx = dy/dz * 2x + 1/z = -1/x^2, the sum over both paths.
    assert res.grads["x"] == pytest.approx(-1 / xv**2, rel=1e-14)


def two_layer_network(dtype="float64"):
    with gg.Graph() as g:
        x = gg.input("x", shape=(64,), dtype=dtype)
        t = gg.input("t", shape=(10,), dtype=dtype)
        W = gg.input("W", shape=(128, 64), dtype=dtype)
        b = gg.input("b", shape=(128,), dtype=dtype)
        V = gg.input("V", shape=(10, 128), dtype=dtype)
        a = gg.input("a", shape=(10,), dtype=dtype)
        h = gg.tanh(W @ x + b, name="h")
        y = gg.add(V @ h, a, name="y")
        L = gg.mul(0.5, gg.sum((y - t) ** 2), name="L")
    return g, L


def network_feeds(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    shapes = {"x": (64,), "t": (10,), "W": (128, 64), "b": (128,), "V": (10, 128), "a": (10,)}
    return {k: (rng.standard_normal(s) * 0.3).astype(dtype) for k, s in shapes.items()}


def test_two_layer_network_against_hand_written_formulas():
    _, L = two_layer_network()
    f = network_feeds()
    res = gg.connect().run([L, "h", "y"], f, wrt=["W", "b", "V", "a", "h", "x"])
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    y = f["V"] @ h + f["a"]
    r = y - f["t"]
    dh = f["V"].T @ r
    dz = dh * (1 - h**2)
    np.testing.assert_allclose(res.values["L"], 0.5 * r @ r, rtol=1e-13)
    np.testing.assert_allclose(res.values["h"], h, rtol=1e-13)
    np.testing.assert_allclose(res.grads["a"], r, rtol=1e-13)  # dL/da = y - y*
    np.testing.assert_allclose(res.grads["V"], np.outer(r, h), rtol=1e-13)  # (y - y*) h^T
    np.testing.assert_allclose(res.grads["h"], dh, rtol=1e-13)  # V^T (y - y*)
    np.testing.assert_allclose(res.grads["b"], dz, rtol=1e-13)  # (1 - h^2) * dL/dh
    np.testing.assert_allclose(res.grads["W"], np.outer(dz, f["x"]), rtol=1e-13)
    np.testing.assert_allclose(res.grads["x"], f["W"].T @ dz, rtol=1e-13)


def test_two_layer_network_float32():
    _, L = two_layer_network("float32")
    f = network_feeds(dtype="float32")
    res = gg.connect().run(L, f, wrt=["W", "a"])
    assert res.value.dtype == np.float32 and res.grads["W"].dtype == np.float32
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    r = f["V"] @ h + f["a"] - f["t"]
    np.testing.assert_allclose(res.grads["a"], r, rtol=1e-5, atol=1e-6)
