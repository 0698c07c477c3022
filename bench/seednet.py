"""The seed's two-layer network in process: graphgrad's gradient against the same forward and
backward written by hand in numpy, timed in the same run (interleaved), ratio printed.

x in R^64, h = tanh(W x + b) in R^128, y = V h + a in R^10, L = 0.5 |y - t|^2, float64;
gradients for W, b, V, a. Target: graphgrad / hand-written numpy <= 2.5.
A Hessian-vector product (the VJP of the gradient nodes, seeded with a direction) is timed as
well. torch is not a dependency: where it is installed the gradient and the Hessian-vector
product are timed beside torch.autograd and torch.autograd.functional.hvp.

    python bench/seednet.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, us

import graphgrad as gg

SHAPES = {"x": (64,), "t": (10,), "W": (128, 64), "b": (128,), "V": (10, 128), "a": (10,)}
WRT = ["W", "b", "V", "a"]


def network() -> gg.Tensor:
    with gg.Graph():
        x, t = gg.input("x", shape=(64,)), gg.input("t", shape=(10,))
        W, b = gg.input("W", shape=(128, 64)), gg.input("b", shape=(128,))
        V, a = gg.input("V", shape=(10, 128)), gg.input("a", shape=(10,))
        h = gg.tanh(W @ x + b, name="h")
        y = V @ h + a
        return 0.5 * gg.sum((y - t) ** 2)


def hvp_network() -> tuple[gg.Tensor, list[gg.Tensor]]:
    """The network's loss and its Hessian-vector product nodes: d/dθ <dL/dθ, v>, one VJP of
    the gradient nodes seeded with v (inputs 'v_W', 'v_b', 'v_V', 'v_a')."""
    L = network()
    g = L.graph
    with g:
        params = [g[k] for k in WRT]
        grads = gg.grad(L, params)
        vs = [gg.input(f"v_{k}", shape=SHAPES[k]) for k in WRT]
        return L, gg.grad(grads, params, vs)


def torch_hvp(feeds: dict[str, np.ndarray], vs: dict[str, np.ndarray]) -> object:
    import torch
    from torch.autograd.functional import hvp

    x, t = (torch.tensor(feeds[k]) for k in ("x", "t"))
    params = tuple(torch.tensor(feeds[k]) for k in WRT)
    v = tuple(torch.tensor(vs[k]) for k in WRT)

    def loss(W: object, b: object, V: object, a: object) -> object:
        h = torch.tanh(W @ x + b)  # type: ignore[operator]
        y = V @ h + a  # type: ignore[operator]
        return 0.5 * ((y - t) ** 2).sum()

    return lambda: hvp(loss, params, v)[1]


def by_hand(f: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    r = f["V"] @ h + f["a"] - f["t"]
    dz = (f["V"].T @ r) * (1 - h * h)
    return 0.5 * float(r @ r), [np.outer(dz, f["x"]), dz, np.outer(r, h), r]


def torch_grad(feeds: dict[str, np.ndarray]) -> object:
    import torch

    x, t = (torch.tensor(feeds[k]) for k in ("x", "t"))
    params = [torch.tensor(feeds[k], requires_grad=True) for k in WRT]

    def step() -> object:
        W, b, V, a = params
        y = V @ torch.tanh(W @ x + b) + a
        return torch.autograd.grad(0.5 * ((y - t) ** 2).sum(), params)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s) * 0.3 for k, s in SHAPES.items()}
    L = network()
    client = gg.connect()
    res = client.run(L, feeds, wrt=WRT)
    _, expected = by_hand(feeds)
    for k, e in zip(WRT, expected, strict=True):
        np.testing.assert_allclose(res.grads[k], e, rtol=1e-12)
    fns = {
        "graphgrad": lambda: client.run(L, feeds, wrt=WRT),
        "numpy": lambda: by_hand(feeds),
    }
    _, hv = hvp_network()
    vs = {f"v_{k}": rng.standard_normal(s) for k, s in SHAPES.items() if k in WRT}
    hv_feeds = {**feeds, **vs}
    hv_names = [n.name for n in hv]
    fns["graphgrad hvp"] = lambda: client.run(hv, hv_feeds)
    try:
        hvp = torch_hvp(feeds, {k: vs[f"v_{k}"] for k in WRT})
    except ImportError:
        print("torch is not installed: no torch.autograd lines (graphgrad vs numpy only)")
    else:
        got = client.run(hv, hv_feeds)
        for name, h in zip(hv_names, hvp(), strict=True):  # type: ignore[operator]
            np.testing.assert_allclose(got.values[name], h.numpy(), rtol=1e-10, atol=1e-12)
        fns["torch hvp"] = hvp
        fns["torch grad"] = torch_grad(feeds)
    med = interleaved_medians(fns, args.calls)  # type: ignore[arg-type]
    ratio = med["graphgrad"] / med["numpy"]
    verdict = "OK" if ratio <= 2.5 else "MISSED"
    print(f"seednet gradient: graphgrad {us(med['graphgrad'])}   numpy by hand {us(med['numpy'])}")
    print(f"graphgrad / hand-written numpy = {ratio:.2f}   target <= 2.5   {verdict}")
    line = f"seednet Hessian-vector product: graphgrad {us(med['graphgrad hvp'])}"
    if "torch hvp" in med:
        line += f"   torch.autograd.functional.hvp {us(med['torch hvp'])}"
        line += f"   torch / graphgrad = {med['torch hvp'] / med['graphgrad hvp']:.2f}"
        print(f"seednet gradient: torch.autograd {us(med['torch grad'])}")
    print(line)


if __name__ == "__main__":
    main()
