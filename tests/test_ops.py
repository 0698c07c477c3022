"""Every registered op is gradient-checked against central differences, through the engine.

Ops get default cases from their arity (unary: one tensor; binary: equal shapes and two
broadcasting cases; variadic: three tensors); ops that need attributes or a domain list them
below. A newly registered op is covered the moment it is registered.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from graphgrad.engine import REGISTRY, Graph, LocalExecutor, Node, RunRequest
from graphgrad.engine.grad import grad_graph

from .gradcheck import numerical_vjp

POSITIVE = {"log", "sqrt", "pow", "safe_log", "logsumexp"}  # inputs drawn from (0.5, 1.5)


class Ints(tuple):
    """A case's shape whose input is int64, drawn from [-high, high): indices (negative ones
    count from the end), labels, conditions. Not differentiated."""

    high: int

    def __new__(cls, shape: tuple[int, ...], high: int) -> Ints:
        self = super().__new__(cls, shape)
        self.high = high
        return self


def dtype_of(shape: tuple[int, ...]) -> str:
    return "int64" if isinstance(shape, Ints) else "float64"


SPECIAL: dict[str, list[tuple[list[tuple[int, ...]], dict]]] = {
    "matmul": [
        ([(3, 4), (4, 2)], {}),
        ([(4,), (4, 2)], {}),
        ([(3, 4), (4,)], {}),
        ([(4,), (4,)], {}),
        ([(2, 3, 4), (4, 5)], {}),
        ([(2, 1, 3, 4), (3, 4, 2)], {}),
        ([(5,), (2, 5, 3)], {}),
    ],
    "sum": [
        ([(3, 4)], {}),
        ([(3, 4)], {"axis": 0}),
        ([(2, 3, 4)], {"axis": (0, 2), "keepdims": True}),
    ],
    "mean": [
        ([(3, 4)], {}),
        ([(3, 4)], {"axis": -1}),
        ([(2, 3, 4)], {"axis": (1,), "keepdims": True}),
    ],
    "max": [
        ([(3, 4)], {}),
        ([(3, 4)], {"axis": 1}),
        ([(2, 3, 4)], {"axis": (0, 2), "keepdims": True}),
    ],
    "reshape": [([(3, 4)], {"shape": (2, 6)}), ([(3, 4)], {"shape": (-1,)})],
    "transpose": [([(3, 4)], {}), ([(2, 3, 4)], {"axes": (1, 2, 0)})],
    "broadcast_to": [([(4,)], {"shape": (3, 4)}), ([(3, 1)], {"shape": (2, 3, 5)})],
    "concat": [([(2, 3), (4, 3), (1, 3)], {}), ([(2, 3), (2, 1)], {"axis": 1})],
    "softmax": [([(3, 4)], {}), ([(3, 4)], {"axis": 0})],
    "log_softmax": [([(3, 4)], {}), ([(3, 4)], {"axis": 0})],
    "softmax_cross_entropy": [([(3, 4), (3, 4)], {}), ([(3, 4), (3, 4)], {"axis": 0})],
    "mse": [([(3, 4), (3, 4)], {}), ([(3, 4), (4,)], {})],
    "constant": [([], {"value": np.arange(6.0).reshape(2, 3)})],
    "slice": [
        ([(5, 3)], {"axis": 0, "start": 1, "stop": 3}),
        ([(2, 4)], {"axis": -1, "start": 0, "stop": 4}),
    ],
    "max_share": [([(3, 4)], {}), ([(3, 4)], {"axis": 1})],
    # ops of opset 2
    "strided_slice": [
        ([(5, 4)], {"begin": (1, 3), "size": (2, 2), "stride": (2, -1)}),
        ([(4, 3)], {"begin": (0, 0), "size": (4, 3), "stride": (1, 1)}),
    ],
    "pad_slice": [([(2, 2)], {"shape": (5, 4), "begin": (1, 3), "stride": (2, -1)})],
    "take": [([(4, 3), Ints((2, 2), 4)], {}), ([(2, 5), Ints((3,), 5)], {"axis": -1})],
    "scatter_add": [
        ([(3, 2), Ints((3,), 4)], {"size": 4}),
        ([(2, 2, 3), Ints((2,), 5)], {"axis": 1, "size": 5}),
    ],
    "take_along_axis": [
        ([(3, 4), Ints((3, 2), 4)], {"axis": 1}),
        ([(3, 4), Ints((1, 4), 3)], {"axis": 0}),
        ([(3, 4), Ints((3, 1), 3)], {"axis": 0}),
    ],
    "put_along_axis_add": [
        ([(3, 2), Ints((3, 2), 4)], {"axis": 1, "size": 4}),
        ([(2, 4), Ints((2, 1), 3)], {"axis": 0, "size": 3}),
    ],
    "argmax": [
        ([(3, 4)], {}),
        ([(3, 4)], {"axis": 1}),
        ([(2, 3, 4)], {"axis": -1, "keepdims": True}),
        ([(3, 4)], {"keepdims": True}),
    ],
    "argmin": [([(3, 4)], {}), ([(2, 3, 4)], {"axis": 0})],
    "where": [
        ([Ints((3, 4), 2), (3, 4), (3, 4)], {}),
        ([Ints((3, 1), 2), (4,), (3, 4)], {}),
    ],
    "astype": [([(3, 4)], {"dtype": "float64"}), ([Ints((3,), 5)], {"dtype": "float64"})],
    "logsumexp": [
        ([(3, 4)], {}),
        ([(3, 4)], {"axis": 1}),
        ([(2, 3, 4)], {"axis": (0, 2), "keepdims": True}),
    ],
}
SPECIAL["softmax_cross_entropy"] += [
    ([(3, 4), Ints((3,), 4)], {}),
    ([(3, 4), Ints((4,), 3)], {"axis": 0}),
]
INT_OUTPUT = {"argmax", "argmin"}  # int64 indices whatever the input dtype
NOT_DIFFERENTIATED = {"input"}  # fed, not computed


def default_cases(arity: int | None) -> list[tuple[list[tuple[int, ...]], dict]]:
    if arity == 1:
        return [([(3, 4)], {}), ([()], {})]
    if arity == 2:
        return [([(3, 4), (3, 4)], {}), ([(3, 4), (4,)], {}), ([(3, 1), (1, 4)], {})]
    return [([(2, 3), (2, 3), (2, 3)], {})]


def cases():
    for name in sorted(REGISTRY):
        if name in NOT_DIFFERENTIATED:
            continue
        for k, (shapes, attrs) in enumerate(
            SPECIAL.get(name) or default_cases(REGISTRY[name].arity)
        ):
            yield pytest.param(name, shapes, attrs, id=f"{name}-{k}")


def random_inputs(op: str, shapes, rng) -> list[np.ndarray]:
    xs = []
    for s in shapes:
        if isinstance(s, Ints):
            xs.append(rng.integers(-s.high, s.high, size=s))
            continue
        mag = rng.uniform(0.5, 1.5, size=s)  # away from the kinks of abs/relu at 0
        xs.append(np.asarray(mag if op in POSITIVE else mag * rng.choice([-1.0, 1.0], size=s)))
    return xs


def floats(xs: list[np.ndarray]) -> tuple[str, ...]:
    """The names of the float inputs: what is differentiated (integers are not)."""
    return tuple(f"x{k}" for k, x in enumerate(xs) if x.dtype.kind == "f")


def run_op(op: str, xs: list[np.ndarray], attrs: dict, u: np.ndarray | None = None):
    nodes = [Node(f"x{k}", "input", shape=x.shape, dtype=x.dtype.name) for k, x in enumerate(xs)]
    nodes.append(Node("out", op, tuple(f"x{k}" for k in range(len(xs))), attrs))
    graph = Graph(nodes)
    wrt = floats(xs)
    u = u if wrt else None
    request = RunRequest(
        ("out",),
        {f"x{k}": x for k, x in enumerate(xs)},
        wrt if u is not None else (),
        None if u is None else {"out": u},
    )
    return LocalExecutor().run(graph, request)


@pytest.mark.parametrize(("op", "shapes", "attrs"), list(cases()))
def test_vjp_matches_central_differences(op, shapes, attrs):
    rng = np.random.default_rng(abs(hash(op)) % 2**32)
    xs = random_inputs(op, shapes, rng)
    out = run_op(op, xs, attrs).values["out"]
    u = rng.standard_normal(out.shape).astype(out.dtype)  # a seed has its output's dtype
    res = run_op(op, xs, attrs, u) if xs else None
    numeric = numerical_vjp(lambda v: run_op(op, v, attrs).values["out"], xs, u)
    for k, expected in enumerate(numeric):
        if expected is None:  # an integer input
            assert f"x{k}" not in (res.grads if res else {})
            continue
        got = res.grads[f"x{k}"]
        assert got.shape == xs[k].shape and got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8, err_msg=f"{op} input {k}")


@pytest.mark.parametrize("op", sorted(set(REGISTRY) - NOT_DIFFERENTIATED))
def test_float32_keeps_its_dtype(op):
    shapes, attrs = (SPECIAL.get(op) or default_cases(REGISTRY[op].arity))[0]
    rng = np.random.default_rng(1)
    xs = [
        x.astype(np.float32) if x.dtype.kind == "f" else x for x in random_inputs(op, shapes, rng)
    ]
    if op == "constant":
        attrs = {"value": attrs["value"].astype(np.float32)}
    out = run_op(op, xs, attrs).values["out"]
    assert out.dtype == (np.int64 if op in INT_OUTPUT else attrs.get("dtype", np.float32))
    if xs:
        res = run_op(op, xs, attrs, np.ones(out.shape, out.dtype))
        assert all(g.dtype == np.float32 for g in res.grads.values())


def test_every_registered_op_is_covered():
    covered = {p.values[0] for p in cases()}
    assert covered == set(REGISTRY) - NOT_DIFFERENTIATED
    assert len(REGISTRY) >= 31


def test_max_splits_the_gradient_between_ties():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    res = run_op("max", [x], {"axis": 1}, np.array([1.0, 1.0]))
    np.testing.assert_array_equal(res.grads["x0"], [[0, 0.5, 0.5], [1, 0, 0]])


def test_maximum_splits_the_gradient_between_ties():
    res = run_op("maximum", [np.array([1.0, 2.0]), np.array([1.0, 3.0])], {}, np.ones(2))
    np.testing.assert_array_equal(res.grads["x0"], [0.5, 0.0])
    np.testing.assert_array_equal(res.grads["x1"], [0.5, 1.0])


def test_softmax_cross_entropy_is_the_textbook_formula():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 5))
    labels = np.eye(5)[[0, 3, 1, 4]]
    res = run_op("softmax_cross_entropy", [logits, labels], {}, np.ones(4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(res.values["out"], -np.log(p[np.arange(4), [0, 3, 1, 4]]))
    np.testing.assert_allclose(res.grads["x0"], p - labels, atol=1e-12)


def _gradient_graph(op: str, xs: list[np.ndarray], attrs: dict):
    nodes = [Node(f"x{k}", "input", shape=x.shape, dtype=x.dtype.name) for k, x in enumerate(xs)]
    nodes.append(Node("out", op, tuple(f"x{k}" for k in range(len(xs))), attrs))
    wrt = floats(xs)
    return grad_graph(Graph(nodes), ["out"], wrt, ["out"]), wrt


@pytest.mark.parametrize(("op", "shapes", "attrs"), list(cases()))
def test_gradient_rule_gives_the_numeric_vjp_bit_for_bit(op, shapes, attrs):
    """Each op's gradient rule emits the numpy operations of its numeric VJP (the rule the
    interpreted backward pass ran), in the same order: the same bits."""
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    xs = random_inputs(op, shapes, rng)
    if not floats(xs):
        return
    out = run_op(op, xs, attrs).values["out"]
    u = rng.standard_normal(out.shape).astype(out.dtype)
    vjp = REGISTRY[op].vjp
    assert vjp is not None
    with np.errstate(all="ignore"):
        ref = vjp(u, xs, out, attrs, [x.dtype.kind == "f" for x in xs])
    gg_, wrt = _gradient_graph(op, xs, attrs)
    feeds = {**{f"x{k}": x for k, x in enumerate(xs)}, gg_.seeds["out"]: u}
    res = LocalExecutor().run(gg_.graph, RunRequest(tuple(dict.fromkeys(gg_.grads)), feeds))
    for w, node in zip(wrt, gg_.grads, strict=True):
        k = int(w[1:])
        expected = np.zeros_like(xs[k]) if ref[k] is None else ref[k]
        np.testing.assert_array_equal(res.values[node], expected, err_msg=f"{op} {w}")


@pytest.mark.parametrize(("op", "shapes", "attrs"), list(cases()))
def test_second_derivatives_match_central_differences(op, shapes, attrs):
    """The gradient graph differentiated again: d/dx of sum_k <w_k, dout/dx_k . u>."""
    rng = np.random.default_rng(zlib.crc32(op.encode()) + 1)
    xs = random_inputs(op, shapes, rng)
    if not floats(xs):
        return
    ints = {f"x{k}": x for k, x in enumerate(xs) if x.dtype.kind != "f"}  # held fixed
    xs_int = xs
    xs = [x for x in xs if x.dtype.kind == "f"]
    out = run_op(op, xs_int, attrs).values["out"]
    u = rng.standard_normal(out.shape).astype(out.dtype)
    gg_, wrt = _gradient_graph(op, xs_int, attrs)
    nodes = list(gg_.graph.nodes)
    ws = {f"w{k}": rng.standard_normal(x.shape) for k, x in enumerate(xs)}
    terms = []
    for k, node in enumerate(gg_.grads):
        nodes += [
            Node(f"w{k}", "input", shape=xs[k].shape, dtype="float64"),
            Node(f"p{k}", "mul", (f"w{k}", node)),
            Node(f"s{k}", "sum", (f"p{k}",)),
        ]
        terms.append(f"s{k}")
    nodes.append(Node("S", "concat", tuple(f"r{k}" for k in range(len(terms)))))
    nodes += [Node(f"r{k}", "reshape", (t,), {"shape": (1,)}) for k, t in enumerate(terms)]
    nodes.append(Node("total", "sum", ("S",)))
    graph = Graph(nodes)
    second = grad_graph(graph, ["total"], wrt)
    fixed = {gg_.seeds["out"]: u, **ws, **ints}

    def total(v: list[np.ndarray]) -> np.ndarray:
        feeds = {**fixed, **dict(zip(wrt, v, strict=True))}
        return LocalExecutor().run(graph, RunRequest(("total",), feeds)).values["total"]

    feeds = {**fixed, **dict(zip(wrt, xs, strict=True))}
    res = LocalExecutor().run(second.graph, RunRequest(tuple(dict.fromkeys(second.grads)), feeds))
    numeric = numerical_vjp(total, xs, np.ones(()))
    for k, expected in enumerate(numeric):
        np.testing.assert_allclose(
            res.values[second.grads[k]], expected, rtol=1e-5, atol=1e-6, err_msg=f"{op} {k}"
        )
