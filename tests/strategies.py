"""Hypothesis strategies: random valid graphs over a few shape-preserving and reducing ops."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from graphgrad.engine import Node

UNARY = ["tanh", "sin", "neg", "sigmoid", "exp"]
BINARY = ["add", "mul", "sub", "maximum"]


@st.composite
def random_graphs(draw, min_nodes: int = 2, max_nodes: int = 30, shape=(3,)):
    """(nodes, feeds, output name, wrt names): a DAG whose last node is a scalar loss.

    Nodes often feed several consumers, so gradients along many paths must add up.
    """
    n_inputs = draw(st.integers(1, 3))
    nodes = [Node(f"in{k}", "input", shape=shape, dtype="float64") for k in range(n_inputs)]
    for k in range(draw(st.integers(min_nodes, max_nodes))):
        names = [n.name for n in nodes]
        if draw(st.booleans()):
            op = draw(st.sampled_from(UNARY))
            ins: tuple[str, ...] = (draw(st.sampled_from(names)),)
        else:
            op = draw(st.sampled_from(BINARY))
            ins = (draw(st.sampled_from(names)), draw(st.sampled_from(names)))
        nodes.append(Node(f"n{k}", op, ins))
    # The loss sums every node, so every node is used (fan-out everywhere).
    terms = [n.name for n in nodes[n_inputs:]]
    nodes.append(Node("stack", "concat", tuple(terms)))
    nodes.append(Node("loss", "sum", ("stack",)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    feeds = {f"in{k}": rng.uniform(-1, 1, size=shape) for k in range(n_inputs)}
    return nodes, feeds, "loss", [f"in{k}" for k in range(n_inputs)] + terms[:2]
