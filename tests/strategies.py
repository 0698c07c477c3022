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


@st.composite
def random_requests(draw, max_nodes: int = 25, shape=(3,)):
    """(nodes, RunRequest): a random graph as in `random_graphs`, with constants read by ops
    and an input nothing reads, and a random legal request over it: outputs and `wrt` drawn
    from every node (inputs, constants, intermediates, the loss, the unused input), with
    repeats, and sometimes `grad_outputs` seeding several outputs."""
    from graphgrad.engine import Graph, RunRequest

    nodes, feeds, loss, _ = draw(random_graphs(max_nodes=max_nodes, shape=shape))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    n_consts = draw(st.integers(0, 2))
    consts = [
        Node(f"c{k}", "constant", attrs={"value": rng.uniform(-1, 1, size=shape)})
        for k in range(n_consts)
    ]
    # Rewire some operand slots of the ops to read the constants.
    body = []
    for n in nodes:
        if consts and n.op in BINARY and draw(st.booleans()):
            n = n.replace(inputs=(n.inputs[0], draw(st.sampled_from(consts)).name))
        body.append(n)
    unused = Node("unused", "input", shape=(2,), dtype="float64")
    nodes = [unused, *consts, *body]
    names = [n.name for n in nodes]
    graph = Graph(nodes)
    outputs = draw(st.lists(st.sampled_from(names), max_size=3))
    # Leaves (inputs, constants, the unused input) drawn on purpose: among 30 names they
    # would be rare.
    leaves = [n.name for n in nodes if n.op in ("input", "constant")]
    wrt = draw(st.lists(st.sampled_from(names), max_size=4))
    wrt += draw(st.lists(st.sampled_from(leaves), min_size=0 if wrt else 1, max_size=3))
    wrt = tuple(draw(st.permutations(wrt)))
    grad_outputs = None
    if draw(st.booleans()):
        seeded = draw(st.lists(st.sampled_from([loss, *outputs]), min_size=1, unique=True))
        grad_outputs = {
            o: rng.uniform(-1, 1, size=graph.types[graph.index[o]].shape) for o in seeded
        }
    if "unused" in outputs or draw(st.booleans()):
        feeds = {**feeds, "unused": rng.uniform(-1, 1, size=(2,))}
    request = RunRequest((loss, *outputs), feeds, wrt, grad_outputs)
    return nodes, request
