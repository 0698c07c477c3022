"""Gradients as graphs (engine/grad.py, `gg.grad`): the seed's examples, second derivatives,
Hessian-vector products, and bit-identity with the interpreted backward pass."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import graphgrad as gg
from graphgrad.engine import Graph, LocalExecutor, RunRequest
from graphgrad.engine.grad import grad_graph

from .strategies import random_requests
from .test_seed import network_feeds, two_layer_network


@pytest.mark.parametrize("xv", [0.5, 1.0, 2.0, -3.0])
def test_one_over_x_squared_and_its_second_derivative(xv):
    with gg.Graph():
        x = gg.input("x")
        z = x**2
        y = 1 / z
        dx, dz = gg.grad(y, [x, z])
        d2x = gg.grad(dx, x)
    res = gg.connect().run([y, dx, dz, d2x], {"x": xv})
    assert res.values[dx.name] == pytest.approx(-2 / xv**3, rel=1e-15)
    assert res.values[dz.name] == pytest.approx(-1 / (xv**2) ** 2, rel=1e-15)
    assert res.values[d2x.name] == pytest.approx(6 / xv**4, rel=1e-14)


@pytest.mark.parametrize("xv", [0.5, 1.5, -2.0])
def test_two_paths_of_x_over_x_squared(xv):
    with gg.Graph():
        x = gg.input("x")
        z = gg.mul(x, x, name="z")
        y = gg.div(x, z, name="y")
        dx, dz = gg.grad(y, [x, z])
        d2x = gg.grad(dx, x)
    res = gg.connect().run([dx, dz, d2x], {"x": xv})
    assert res.values[dz.name] == pytest.approx(-xv / xv**4, rel=1e-15)
    assert res.values[dx.name] == pytest.approx(-1 / xv**2, rel=1e-14)
    assert res.values[d2x.name] == pytest.approx(2 / xv**3, rel=1e-13)  # d/dx -1/x^2


def test_gradient_nodes_equal_the_run_gradients_bit_for_bit():
    g, L = two_layer_network()
    f = network_feeds()
    wrt = ["W", "b", "V", "a", "h", "x"]
    with g:
        grads = gg.grad(L, [g[n] for n in wrt])
    ref = gg.connect().run(L, f, wrt=wrt)
    res = gg.connect().run(grads, f)
    for n, node in zip(wrt, grads, strict=True):
        np.testing.assert_array_equal(res.values[node.name], ref.grads[n])


def test_hessian_vector_product_of_the_two_layer_network():
    g, L = two_layer_network()
    f = network_feeds()
    rng = np.random.default_rng(5)
    vW, vV = rng.standard_normal((128, 64)), rng.standard_normal((10, 128))
    with g:
        W, V = g["W"], g["V"]
        gW, gV = gg.grad(L, [W, V])
        u = gg.input("vW", shape=(128, 64))
        w = gg.input("vV", shape=(10, 128))
        # H v = d/d(W, V) <grad L, v>, as one VJP of both gradients seeded with v.
        hW, hV = gg.grad([gW, gV], [W, V], [u, w])
    client = gg.connect()
    res = client.run([hW, hV], {**f, "vW": vW, "vV": vV})

    def grads(eps: float) -> list[np.ndarray]:
        moved = {**f, "W": f["W"] + eps * vW, "V": f["V"] + eps * vV}
        r = client.run(L, moved, wrt=["W", "V"])
        return [r.grads["W"], r.grads["V"]]

    eps = 1e-5
    plus, minus = grads(eps), grads(-eps)
    for got, p, m in zip([res.values[hW.name], res.values[hV.name]], plus, minus, strict=True):
        np.testing.assert_allclose(got, (p - m) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_grad_outputs_may_be_arrays_and_wrt_outside_the_region_gets_zeros():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        unused = gg.input("u", shape=(2,))
        y = gg.sin(x)
        dx, du = gg.grad(y, [x, unused], np.array([1.0, 2.0, 3.0]))
    xv = np.array([0.1, 0.2, 0.3])
    res = gg.connect().run([dx, du], {"x": xv})
    np.testing.assert_array_equal(res.values[dx.name], np.array([1.0, 2.0, 3.0]) * np.cos(xv))
    np.testing.assert_array_equal(res.values[du.name], np.zeros(2))


def test_non_scalar_output_needs_grad_outputs():
    with gg.Graph():
        x = gg.input("x", shape=(3,))
        with pytest.raises(gg.RequestError, match="non-scalar"):
            gg.grad(gg.sin(x), x)


@settings(max_examples=150)
@given(random_requests())
def test_gradient_graphs_are_bit_identical_to_the_interpreted_backward(case):
    nodes, request = case
    graph = Graph(nodes)
    if not request.wrt:
        return
    ref = LocalExecutor().run(graph, request)
    seeded = tuple(request.grad_outputs or ())
    gg_ = grad_graph(graph, request.outputs, request.wrt, seeded)
    feeds = dict(request.feeds)
    for out, seed_input in gg_.seeds.items():
        feeds[seed_input] = request.grad_outputs[out]
    res = LocalExecutor().run(gg_.graph, RunRequest(tuple(dict.fromkeys(gg_.grads)), feeds))
    for w, node in zip(request.wrt, gg_.grads, strict=True):
        np.testing.assert_array_equal(res.values[node], ref.grads[w], err_msg=w)
