"""Gradients of gradients over the wire: a real `graphgrad serve` runs `gg.grad` nodes (the
SDK's transform sent as ordinary nodes) and differentiates a gradient output itself (a
request whose `wrt` reaches through a gradient node), checked against hand formulas."""

from __future__ import annotations

import numpy as np
import pytest

import graphgrad as gg

from .server_proc import running_server
from .test_seed import network_feeds, two_layer_network


@pytest.fixture(scope="module")
def client():
    with running_server() as server, gg.connect(server.address) as c:
        yield c


@pytest.mark.parametrize("xv", [0.5, -2.0])
def test_derivatives_of_one_over_x_squared_over_the_wire(client, xv):
    with gg.Graph():
        x = gg.input("x")
        y = 1 / x**2
        dx = gg.grad(y, x)
        d2x = gg.grad(dx, x)
    res = client.run([dx, d2x], {"x": xv})
    assert res.values[dx.name] == pytest.approx(-2 / xv**3, rel=1e-15)
    assert res.values[d2x.name] == pytest.approx(6 / xv**4, rel=1e-14)
    # The server's own transform over a graph that holds gradient nodes: d/dx of d2x.
    third = client.run(d2x, {"x": xv}, wrt=[x])
    assert third.grads["x"] == pytest.approx(-24 / xv**5, rel=1e-13)
    assert third.value == res.values[d2x.name]


def test_hessian_vector_product_over_the_wire_equals_in_process(client):
    g, L = two_layer_network()
    f = network_feeds()
    v = np.random.default_rng(7).standard_normal((10, 128))
    with g:
        V = g["V"]
        gV = gg.grad(L, V)
    # H v as the gradient (taken by the server) of <grad L, v>, seeded through gV's output.
    remote = client.run(gV, f, wrt=[V], grad_outputs={gV: v})
    local = gg.connect().run(gV, f, wrt=[V], grad_outputs={gV: v})
    np.testing.assert_array_equal(remote.grads["V"], local.grads["V"])
    eps = 1e-5

    def grad_at(shift: float) -> np.ndarray:
        return client.run(L, {**f, "V": f["V"] + shift * v}, wrt=[V]).grads["V"]

    central = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(remote.grads["V"], central, rtol=1e-6, atol=1e-8)
