"""The lecture's examples built with the SDK: values and gradients, printed.

python examples/seed_demo.py            # in process
python examples/seed_demo.py HOST:PORT  # against a running `graphgrad serve`
"""

from __future__ import annotations

import sys

import numpy as np

import graphgrad as gg


def main(address: str | None = None) -> None:
    client = gg.connect(address) if address else gg.connect()
    np.set_printoptions(precision=4, suppress=True)

    with gg.Graph():
        x = gg.input("x")
        y = 1 / x**2
    res = client.run(y, {"x": 2.0}, wrt=[x])
    print(
        f"y = 1/x^2 at x=2:   y = {res.value:.4f}   dy/dx = {res.grads['x']:.4f}"
        f"   (-2/x^3 = {-2 / 8:.4f})"
    )

    with gg.Graph():
        x = gg.input("x")
        z = x * x
        y = x / z
    res = client.run(y, {"x": 2.0}, wrt=[x])
    print(
        f"z = x^2, y = x/z:   y = {res.value:.4f}   dy/dx = {res.grads['x']:.4f}"
        f"   (-1/x^2 = {-1 / 4:.4f}, two paths added)"
    )

    with gg.Graph():
        x = gg.input("x", shape=(4,))
        t = gg.input("t", shape=(2,))
        W = gg.input("W", shape=(3, 4))
        b = gg.input("b", shape=(3,))
        V = gg.input("V", shape=(2, 3))
        a = gg.input("a", shape=(2,))
        h = gg.tanh(W @ x + b, name="h")
        y = gg.add(V @ h, a, name="y")
        L = gg.mul(0.5, gg.sum((y - t) ** 2), name="L")
    rng = np.random.default_rng(0)
    feeds = {
        n: rng.standard_normal(s)
        for n, s in {"x": (4,), "t": (2,), "W": (3, 4), "b": (3,), "V": (2, 3), "a": (2,)}.items()
    }
    res = client.run([L, "y", "h"], feeds, wrt=["W", "b", "V", "a"])
    print("two-layer network  h = tanh(Wx + b), y = Vh + a, L = 1/2 |y - t|^2")
    print(f"  L = {res.values['L']:.4f}")
    print(f"  dL/da = {res.grads['a']}   (y - t = {res.values['y'] - feeds['t']})")
    print(f"  dL/dV =\n{res.grads['V']}")
    print(f"  dL/db = {res.grads['b']}")
    print(f"  dL/dW =\n{res.grads['W']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
