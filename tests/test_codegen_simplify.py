"""Compiled programs simplify exactly: constants folded, identities dropped, dead buffers
reused in place (never a feed, an export or a buffer a view still reads), with the same bits
as the unsimplified nodes."""

from __future__ import annotations

import numpy as np

import graphgrad as gg
from graphgrad.engine import Cancellation, FeedError, LocalExecutor, RunRequest
from graphgrad.engine.codegen import compile_program


def _program(g: gg.Graph, outputs: list[str]):
    graph = g.freeze()
    nodes = [
        i
        for i in graph.ancestors([graph.index[o] for o in outputs])
        if graph.nodes[i].op != "input"
    ]
    return graph, compile_program(graph, nodes, [graph.index[o] for o in outputs])


def _line(source: str, name: str) -> str:
    return next(line for line in source.splitlines() if f"'{name}'" in line)


def test_a_dead_buffer_is_reused_but_never_a_feed_or_an_export():
    with gg.Graph() as g:
        x = gg.input("x", shape=(4,))
        t = gg.mul(x, x, name="t")  # reads the feed: may not write into it
        u = gg.add(t, 1.0, name="u")  # t dies here and is no output: u reuses it
        v = gg.mul(u, 3.0, name="v")  # u is an output: v must not overwrite it
        gg.neg(v, name="w")  # v dies here: w reuses it
    graph, prog = _program(g, ["u", "w"])
    assert "out=" not in _line(prog.source, "t")
    assert "out=" in _line(prog.source, "u") and "out=" not in _line(prog.source, "v")
    assert "out=" in _line(prog.source, "w")
    xv = np.array([1.0, -2.0, 0.5, 3.0])
    given = xv.copy()
    out = prog({graph.index["x"]: given}, Cancellation())
    np.testing.assert_array_equal(given, xv)  # the feed is untouched
    np.testing.assert_array_equal(out[graph.index["u"]], xv * xv + 1.0)
    np.testing.assert_array_equal(out[graph.index["w"]], -((xv * xv + 1.0) * 3.0))


def test_a_buffer_that_a_view_reads_is_not_overwritten():
    with gg.Graph() as g:
        x = gg.input("x", shape=(2, 2))
        t = gg.mul(x, x, name="t")
        r = gg.transpose(t, name="r")  # a view of t's buffer
        u = gg.add(t, 1.0, name="u")  # t dies here, but r still reads its buffer
        gg.add(u, r, name="y")
    graph, prog = _program(g, ["y"])
    assert "out=" not in _line(prog.source, "u")
    xv = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = prog({graph.index["x"]: xv}, Cancellation())
    np.testing.assert_array_equal(out[graph.index["y"]], (xv * xv + 1.0) + (xv * xv).T)


def test_constants_fold_and_identities_drop_with_the_same_bits():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        one = gg.constant(np.float64(2.0)) * gg.constant(np.float64(0.5))  # folds to 1
        y = gg.mul(x, one, name="y")  # x * 1 is x
        z = gg.sub(gg.div(y, one), gg.constant(np.float64(0.0)), name="z")  # also x
        gg.pow(gg.tanh(z, name="h"), one, name="p")  # h ** 1 is h
    graph, prog = _program(g, ["y", "p"])
    assert " mul" not in prog.source and " pow" not in prog.source and " div" not in prog.source
    xv = np.array([-0.0, 1.5, np.nan])
    out = prog({graph.index["x"]: xv}, Cancellation())
    y, p = out[graph.index["y"]], out[graph.index["p"]]
    assert y is not xv  # an output equal to a feed is a copy, never the caller's array
    np.testing.assert_array_equal(y.view(np.int64), (xv * 1.0).view(np.int64))
    np.testing.assert_array_equal(p.view(np.int64), (np.tanh(xv) ** 1.0).view(np.int64))


def test_the_warm_inline_path_still_checks_every_feed():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        gg.sum(x * x, name="L")
    graph, executor = g.freeze(), LocalExecutor()
    ok = RunRequest(("L",), {"x": np.ones(3)}, ("x",))
    np.testing.assert_array_equal(executor.run(graph, ok).grads["x"], 2 * np.ones(3))
    for feeds, words in [
        ({"x": np.ones(4)}, "expects shape (3,)"),
        ({"x": np.ones(3, dtype=np.float32)}, "float64"),
        ({}, "missing feed"),
        ({"x": np.ones(3), "q": np.ones(3)}, "not an input"),
        ({"x": [1.0, 1.0, 1.0]}, "numpy array"),
    ]:
        try:
            executor.run(graph, RunRequest(("L",), feeds, ("x",)))
        except FeedError as e:
            assert words in str(e)
        else:
            raise AssertionError(f"{feeds} was accepted")
