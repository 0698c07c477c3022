"""Notebook displays and async twins, without a notebook."""

from __future__ import annotations

import asyncio
import re

import numpy as np

import graphgrad as gg

from .test_jobs import init, mlp, own_data
from .test_seed import network_feeds, two_layer_network


def test_two_layer_network_svg_and_mermaid_have_its_nodes_and_edges():
    g, _ = two_layer_network()
    bundle = g._repr_mimebundle_()
    svg, mermaid = bundle["image/svg+xml"], bundle["text/markdown"]
    names = {n.name for n in g.nodes}
    drawn = set(re.findall(r'data-name="([^"]+)"', svg)) or names  # Graphviz has no data-name
    assert drawn == names
    edges = {(a, b) for a, b in re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', svg)}
    expected = {(src, n.name) for n in g.nodes for src in n.inputs}
    assert not edges or edges == expected
    ids = dict(re.findall(r'\s+(n\d+)\["([^<"]+)<br/>', mermaid))
    assert set(ids.values()) == names
    arrows = {(ids[a], ids[b]) for a, b in re.findall(r"(n\d+) --> (n\d+)", mermaid)}
    assert arrows == expected
    assert "h = tanh" in str(g).replace("  ", " ") or "tanh(" in str(g)
    assert g.to_dot().startswith("digraph") and '"h" -> ' in g.to_dot()


def test_a_node_shows_the_subgraph_it_depends_on():
    g, _ = two_layer_network()
    h = g["h"]
    mermaid = h.to_mermaid()
    assert "h<br/>" in mermaid and "V<br/>" not in mermaid and "L<br/>" not in mermaid


def test_large_graphs_are_summarised():
    with gg.Graph() as g:
        x = gg.input("x")
        for _ in range(500):
            x = gg.sin(x)
    bundle = g._repr_mimebundle_()
    assert "image/svg+xml" not in bundle
    assert "501 nodes" in bundle["text/plain"] and "sin x500" in bundle["text/plain"]


def test_plan_is_coloured_by_partition():
    from .test_planner import wide_graph

    _, loss, wrt = wide_graph(branches=3, layers=2)
    plan = gg.connect().explain(loss, wrt=wrt, executor="ray")
    bundle = plan._repr_mimebundle_()
    assert len(plan.partitions) == 4 and "P3:" in bundle["text/html"]  # 3 branches, 1 join
    fills = set(re.findall(r'fill="(#[0-9a-f]{6})"', bundle["image/svg+xml"]))
    assert len(fills & {"#cfe2ff", "#d1e7dd", "#fff3cd", "#f8d7da"}) == 4


def test_result_job_and_client_reprs():
    _, L = two_layer_network()
    client = gg.connect()
    res = client.run([L, "h"], network_feeds(), wrt=["W"])
    html = res._repr_html_()
    assert "gradient" in html and "(128, 64)" in html and "local" in html
    job = client.train(mlp(8), init(3, 8, 0), own_data(3), steps=5).wait(progress=False)
    assert "step 5/5" in job._repr_html_() and "3 networks" in job._repr_html_()
    assert "in-process" in client._repr_html_()


def test_async_twins_run_inside_an_event_loop():
    _, L = two_layer_network()
    client = gg.connect()
    f = network_feeds()

    async def main():
        res, plan = await asyncio.gather(
            client.run_async(L, f, wrt=["a"]), client.explain_async(L, wrt=["a"])
        )
        job = await client.train_async(mlp(8), init(2, 8, 0), own_data(2), steps=4)
        await job.wait_async(progress=False)
        return res, plan, job

    res, plan, job = asyncio.run(main())
    np.testing.assert_array_equal(res.grads["a"], client.run(L, f, wrt=["a"]).grads["a"])
    assert plan.executor == "local" and job.status == "done"
