"""Notebook displays and async twins, without a notebook."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re

import numpy as np

import graphgrad as gg
from graphgrad import _display

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
    assert html_svg(bundle["text/html"]) == bundle["image/svg+xml"]
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


# -- notebook polish: what a notebook renders -------------------------------------------------


def unrolled_rnn(steps=6):
    """An RNN unrolled over `steps` steps: inputs reused by every step, long edges across rows."""
    with gg.Graph() as g:
        W = gg.input("W", shape=(8, 8))
        U = gg.input("U", shape=(8, 4))
        b = gg.input("b", shape=(8,))
        h = gg.input("h0", shape=(8,))
        loss = gg.constant(0.0, name="zero")
        for k in range(steps):
            x = gg.input(f"x{k}", shape=(4,))
            h = gg.tanh(W @ h + U @ x + b, name=f"h{k + 1}")
            loss = loss + gg.sum(h * h)
    return g, loss


def svg_boxes_and_edges(svg):
    """Boxes {name: (x0, y0, x1, y1)} and edges [(from, to, [(x, y), ...])] of a layered SVG."""
    boxes = {}
    for name, x, y, w, h in re.findall(
        r'<g class="node" data-name="([^"]+)"><rect x="([\d.]+)" y="([\d.]+)" '
        r'width="([\d.]+)" height="([\d.]+)"',
        svg,
    ):
        x0, y0 = float(x), float(y)
        boxes[name] = (x0, y0, x0 + float(w), y0 + float(h))
    edges = [
        (a, b, [tuple(map(float, p.split(","))) for p in pts.split()])
        for a, b, pts in re.findall(
            r'class="edge" data-from="([^"]+)" data-to="([^"]+)" points="([^"]+)"', svg
        )
    ]
    return boxes, edges


def crosses(p, q, box, margin=0.5):
    """Whether segment p-q enters the box's interior (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    lo, hi = 0.0, 1.0
    for step, room in ((-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)):
        if step == 0:
            if room < 0:
                return False
            continue
        t = room / step
        if step < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
    return lo < hi


def test_edges_of_an_unrolled_rnn_pass_around_every_box():
    g, _ = unrolled_rnn()
    svg = _display.layered_svg(_display.graph_drawing(g.freeze()))
    boxes, edges = svg_boxes_and_edges(svg)
    assert set(boxes) == {n.name for n in g.nodes} and len(boxes) >= 43
    assert sorted((a, b) for a, b, _ in edges) == sorted(
        (src, n.name) for n in g.nodes for src in n.inputs
    )
    for a, b, points in edges:
        assert points[0][1] == boxes[a][3] and points[-1][1] == boxes[b][1]  # box to box
        for p, q in itertools.pairwise(points):
            hit = [n for n, box in boxes.items() if crosses(p, q, box)]
            assert not hit, f"edge {a} -> {b} passes through {hit}"


def test_the_geometry_check_sees_a_crossing():
    assert crosses((0, 0), (100, 100), (40, 40, 60, 60))
    assert not crosses((0, 0), (100, 0), (40, 10, 60, 60))
    assert not crosses((50, 0), (50, 40), (40, 40, 60, 60))  # touching the top edge


def test_a_graph_shows_as_html_for_jupyterlab_which_ranks_markdown_above_svg():
    g, _ = two_layer_network()
    bundle = g._repr_mimebundle_()
    assert html_svg(bundle["text/html"]) == bundle["image/svg+xml"]
    assert "&lt;graphgrad.Graph" in bundle["text/html"]  # the title above the picture
    assert "<svg" not in bundle["text/html"]  # sanitized to its text in untrusted notebooks


def html_svg(text):
    """The SVG an HTML output shows as a data-URI image."""
    (data,) = re.findall(r'<img alt="graph" src="data:image/svg\+xml;base64,([^"]+)"', text)
    return base64.b64decode(data).decode()


def test_small_constants_show_their_value():
    with gg.Graph() as g:
        x = gg.input("x", shape=(3,))
        half = gg.constant(0.5, name="half")
        few = gg.constant([1.0, 2.0, 3.0], name="few")
        many = gg.constant(np.arange(100.0), name="many")
        gg.sum(x * half + few + many[:3], name="out")
    labels = {name: label for name, label, _ in _display.graph_drawing(g.freeze()).nodes}
    assert labels["half"].endswith("= 0.5")
    assert labels["few"].endswith("= [1, 2, 3]")
    assert "=" not in labels["many"] and "100" in labels["many"]  # its shape, not 100 values
    bundle = g._repr_mimebundle_()
    assert "= 0.5" in bundle["image/svg+xml"] and "= [1, 2, 3]" in bundle["text/markdown"]
    lines = {ln.split("=")[0].strip(): ln for ln in bundle["text/plain"].splitlines()}
    assert "value=0.5" in lines["half"] and "value=[1, 2, 3]" in lines["few"]
    assert "value" not in lines["many"]


def test_explain_summarises_a_long_list_of_feeds():
    with gg.Graph():
        xs = [gg.input(f"x{k}", shape=(4,)) for k in range(30)]
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        loss = gg.sum(total, name="L")
    plan = gg.connect().explain(loss, wrt=["x0"])
    text = str(plan)
    fed = [ln for ln in text.splitlines() if ln.startswith("  feeds -> P0")]
    assert fed == ["  feeds -> P0: 30 inputs (960 bytes): x0, x1, x2, x3, x4, x5, x6, x7, ..."]
    assert len(text.splitlines()) == 3 and text in plan._repr_mimebundle_()["text/plain"]
    few = gg.connect().explain(gg.sum(xs[0] * xs[1]), wrt=["x0"])
    assert "  feeds -> P0: x1 (32 bytes)" in str(few).splitlines()  # a few: one line each


def test_job_plot_keeps_its_axis_labels_inside_the_saved_figure():
    import io

    import matplotlib

    matplotlib.use("Agg")
    job = gg.connect().train(mlp(8), init(3, 8, 0), own_data(3), steps=5).wait(progress=False)
    ax = job.plot()
    fig = ax.figure
    fig.savefig(io.BytesIO(), format="png")  # as a notebook or a script saves it
    drawn = ax.get_tightbbox(fig.canvas.get_renderer())  # labels and tick labels included
    box = fig.bbox
    assert ax.xaxis.label.get_text() == "step" and ax.yaxis.label.get_text() == "loss"
    assert box.x0 <= drawn.x0 and drawn.x1 <= box.x1, (drawn, box)
    assert box.y0 <= drawn.y0 and drawn.y1 <= box.y1, (drawn, box)


def diverging(n=3, bad=1):
    """`n` networks of which `bad` have targets so large that their loss overflows to
    infinity at step 1 (and to NaN after it)."""
    data = own_data(n)
    data["t"][:bad] = 1e200
    return mlp(8), init(n, 8, 0), data


def test_a_job_whose_loss_becomes_nan_says_so():
    job = gg.connect().train(*diverging(), steps=5).wait(progress=False)
    assert job.status == "done" and job.progress.networks_nonfinite == 1
    assert not np.isfinite(job.history[0]).any() and np.isfinite(job.history[1:]).all()
    assert "loss NaN or infinite in 1 of 3 networks" in repr(job)
    assert "loss NaN or infinite in 1 of 3 networks" in job._repr_html_()
    fine = gg.connect().train(mlp(8), init(2, 8, 0), own_data(2), steps=2).wait(progress=False)
    assert fine.progress.networks_nonfinite == 0 and "NaN" not in repr(fine)
