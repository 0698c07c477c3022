"""Pictures of graphs and plans for notebooks and terminals.

SVG through Graphviz's `dot` when it is installed, otherwise a built-in layered layout (no
external program); `to_dot()` and `to_mermaid()` for other tools; a text form for terminals.
Graphs larger than MAX_DRAWN nodes are summarised instead of drawn node by node.
"""

from __future__ import annotations

import base64
import html
import itertools
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine import Graph, Node

MAX_DRAWN = 80
MOST_LISTED = 8  # names listed in a summary before "..."
PALETTE = ("#cfe2ff", "#d1e7dd", "#fff3cd", "#f8d7da", "#e2d9f3", "#cff4fc", "#ffe5d0", "#d3d3d3")


@dataclass(frozen=True)
class Drawing:
    """What to draw: nodes (name, label, fill colour) and edges, in topological order."""

    nodes: list[tuple[str, str, str]]
    edges: list[tuple[str, str]]


def graph_drawing(
    graph: Graph, keep: set[str] | None = None, colour: Mapping[str, str] | None = None
) -> Drawing:
    nodes, edges = [], []
    for node, t in zip(graph.nodes, graph.types, strict=True):
        if keep is not None and node.name not in keep:
            continue
        shape = "x".join(map(str, t.shape)) or "scalar"
        value = small_value(node)
        label = f"{node.name}\n{node.op} " + (f"= {value}" if value else f"· {shape}")
        fill = (colour or {}).get(
            node.name, "#e9ecef" if node.op in ("input", "constant") else "#ffffff"
        )
        nodes.append((node.name, label, fill))
        edges += [(src, node.name) for src in node.inputs if keep is None or src in keep]
    return Drawing(nodes, edges)


def small_value(node: Node, most: int = 4, width: int = 22) -> str | None:
    """A constant's value as text when it is short: a scalar or a few elements."""
    value = node.attrs.get("value") if node.op == "constant" else None
    if not isinstance(value, np.ndarray) or value.size > most:
        return None
    text = np.array2string(value, separator=", ", formatter={"all": lambda v: f"{v:.4g}"})
    return text if len(text) <= width else None


def to_dot(d: Drawing) -> str:
    lines = [
        "digraph G {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
    ]
    for name, label, fill in d.nodes:
        lines.append(f'  "{_esc(name)}" [label="{_esc(label)}", fillcolor="{fill}"];')
    lines += [f'  "{_esc(a)}" -> "{_esc(b)}";' for a, b in d.edges]
    lines.append("}")
    return "\n".join(lines)


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_mermaid(d: Drawing) -> str:
    ids = {name: f"n{k}" for k, (name, _, _) in enumerate(d.nodes)}
    lines = ["flowchart TB"]
    for name, label, fill in d.nodes:
        text = label.replace('"', "'").replace("\n", "<br/>")
        lines.append(f'  {ids[name]}["{text}"]')
        lines.append(f"  style {ids[name]} fill:{fill}")
    lines += [f"  {ids[a]} --> {ids[b]}" for a, b in d.edges]
    return "\n".join(lines)


def to_svg(d: Drawing) -> str:
    """Graphviz when available, else the built-in layered layout."""
    if shutil.which("dot"):
        try:
            out = subprocess.run(
                ["dot", "-Tsvg"],
                input=to_dot(d),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            return out[out.find("<svg") :]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to the built-in layout below
    return layered_svg(d)


# A node's name, or (edge index, row) for the lane a long edge takes through a row.
_Key = str | tuple[int, int]


@dataclass
class _Layers:
    """Rows of node names and lanes, top to bottom, and each edge's lanes in row order."""

    rows: list[list[_Key]]
    lanes: list[list[tuple[int, int]]]
    above: dict[_Key, list[_Key]]  # neighbours in the row above
    below: dict[_Key, list[_Key]]


def layers(d: Drawing, sweeps: int = 4) -> _Layers:
    """Sugiyama's layering: longest path from the sources, a node moved down next to its
    consumers where it has more of them than inner inputs (inputs and constants just above
    their first consumer), a lane in every row an edge skips, rows ordered by the mean
    position of their neighbours in the row above, then below, in turn."""
    preds: dict[str, list[str]] = {name: [] for name, _, _ in d.nodes}
    succs: dict[str, list[str]] = {name: [] for name, _, _ in d.nodes}
    for a, b in d.edges:
        preds[b].append(a)
        succs[a].append(b)
    layer: dict[str, int] = {}
    for name, _, _ in d.nodes:  # topological order: predecessors come first
        layer[name] = 1 + max((layer[p] for p in preds[name]), default=-1)
    for name, _, _ in reversed(d.nodes):  # down to the consumers where that shortens edges
        inner = sum(1 for p in preds[name] if preds[p])  # inputs follow their consumers
        if succs[name] and inner < len(succs[name]):
            layer[name] = max(min(layer[s] for s in succs[name]) - 1, layer[name])
    for name, _, _ in d.nodes:
        if not preds[name] and succs[name]:
            layer[name] = max(min(layer[s] for s in succs[name]) - 1, 0)
    used = sorted(set(layer.values()))  # drop emptied rows
    layer = {name: used.index(k) for name, k in layer.items()}
    rows: list[list[_Key]] = [[] for _ in used]
    for name, _, _ in d.nodes:
        rows[layer[name]].append(name)
    above: dict[_Key, list[_Key]] = {}
    below: dict[_Key, list[_Key]] = {}
    lanes = []
    for e, (a, b) in enumerate(d.edges):
        path = [(e, r) for r in range(layer[a] + 1, layer[b])]
        for lane in path:
            rows[lane[1]].append(lane)
        lanes.append(path)
        chain: list[_Key] = [a, *path, b]
        for u, v in itertools.pairwise(chain):
            below.setdefault(u, []).append(v)
            above.setdefault(v, []).append(u)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for r in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            ref = _places(rows[r - 1] if down else rows[r + 1])
            here = _places(rows[r])
            near = above if down else below
            centre = {
                k: sum(ref[n] for n in near[k]) / len(near[k]) if k in near else at
                for k, at in here.items()
            }
            rows[r].sort(key=centre.__getitem__)
    return _Layers(rows, lanes, above, below)


def centres(
    lay: _Layers, size: Callable[[_Key], float], gap: float, passes: int = 4
) -> dict[_Key, float]:
    """The x of each item's centre: rows packed, then in turn down and up, each item drawn
    towards the mean of its neighbours in the row before, keeping its row's order and a
    gap on either side (the mean of the placements packed from the left and from the right,
    which both keep them). Lanes of one edge line up, so long edges run straight."""
    x: dict[_Key, float] = {}
    for row in lay.rows:
        at = 0.0
        for k in row:
            x[k] = at + size(k) / 2
            at += size(k) + gap
    for sweep in range(passes):
        down = sweep % 2 == 0
        near = lay.above if down else lay.below
        for row in lay.rows if down else reversed(lay.rows):
            want = [sum(x[n] for n in near[k]) / len(near[k]) if k in near else x[k] for k in row]
            apart = [
                (size(a) + size(b)) / 2 + gap for a, b in itertools.pairwise(row)
            ]  # least distance between neighbours in the row
            left, right = want[:], want[:]
            for i in range(1, len(row)):
                left[i] = max(want[i], left[i - 1] + apart[i - 1])
            for i in range(len(row) - 2, -1, -1):
                right[i] = min(want[i], right[i + 1] - apart[i])
            for k, lo, hi in zip(row, left, right, strict=True):
                x[k] = (lo + hi) / 2
    return x


def _places(row: list[_Key]) -> dict[_Key, float]:
    """Positions in a row as fractions of its length, comparable between rows."""
    return {k: (i + 0.5) / len(row) for i, k in enumerate(row)}


def layered_svg(
    d: Drawing, box_w: int = 150, box_h: int = 38, gap_x: int = 20, gap_y: int = 34
) -> str:
    """The layers drawn: boxes in rows, each edge a polyline from the bottom of its source
    through its lanes to the top of its target. Edges leave and enter a box at ports spread
    along its side, so edges that share a box stay apart."""
    lay = layers(d)
    lane_w = gap_x / 2
    size = lambda k: box_w if isinstance(k, str) else lane_w  # noqa: E731
    mid = centres(lay, size, gap_x)
    least = min((mid[k] - size(k) / 2 for k in mid), default=0.0)
    width = max((mid[k] + size(k) / 2 for k in mid), default=60.0) - least + 2 * gap_x
    pos: dict[_Key, tuple[float, float]] = {}  # a box's top-left corner, a lane's left
    for r, row in enumerate(lay.rows):
        for k in row:
            pos[k] = (mid[k] - size(k) / 2 - least + gap_x, gap_y / 2 + r * (box_h + gap_y))
    height = max(len(lay.rows), 1) * (box_h + gap_y)
    paths = []  # every edge's points, its ends at the middle of its boxes for now
    for (a, b), lanes in zip(d.edges, lay.lanes, strict=True):
        points = [(pos[a][0] + box_w / 2, pos[a][1] + box_h)]
        for lane in lanes:
            x, y = pos[lane]
            points += [(x + lane_w / 2, y), (x + lane_w / 2, y + box_h)]
        paths.append([*points, (pos[b][0] + box_w / 2, pos[b][1])])
    _spread_ports(d.edges, paths, pos, box_w)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}"'
        f' viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial" '
        'font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
        "</defs>",
    ]
    for (a, b), points in zip(d.edges, paths, strict=True):
        parts.append(
            f'<polyline class="edge" data-from="{html.escape(a)}" data-to="{html.escape(b)}"'
            f' points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" '
            'stroke="#555" marker-end="url(#arrow)"/>'
        )
    for name, label, fill in d.nodes:
        x, y = pos[name]
        first, _, second = label.partition("\n")
        parts.append(
            f'<g class="node" data-name="{html.escape(name)}">'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill}" stroke="#333"/>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 15:.1f}" text-anchor="middle" '
            f'font-weight="bold">{html.escape(first)}</text>'
            f'<text x="{x + box_w / 2:.1f}" y="{y + 29:.1f}" text-anchor="middle" '
            f'fill="#444">{html.escape(second)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _spread_ports(
    edges: list[tuple[str, str]],
    paths: list[list[tuple[float, float]]],
    pos: Mapping[_Key, tuple[float, float]],
    box_w: float,
) -> None:
    """Moves each edge's ends along the bottom of its source and the top of its target,
    ordered by where the edge goes next, so that edges sharing a box do not overlap."""
    out: dict[str, list[int]] = {}
    into: dict[str, list[int]] = {}
    for e, (a, b) in enumerate(edges):
        out.setdefault(a, []).append(e)
        into.setdefault(b, []).append(e)
    for ends, at, toward in ((out, 0, 1), (into, -1, -2)):
        for name, es in ends.items():
            es.sort(key=lambda e: paths[e][toward][0])
            for k, e in enumerate(es):
                x = pos[name][0] + box_w * (k + 1) / (len(es) + 1)
                paths[e][at] = (x, paths[e][at][1])


def graph_text(graph: Graph, keep: set[str] | None = None) -> str:
    lines = []
    for node, t in zip(graph.nodes, graph.types, strict=True):
        if keep is not None and node.name not in keep:
            continue
        args = ", ".join(node.inputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in node.attrs.items() if k != "value")
        value = small_value(node)
        attrs = ", ".join(x for x in (attrs, value and f"value={value}") if x)
        call = f"{node.op}({', '.join(x for x in (args, attrs) if x)})"
        lines.append(f"{node.name:>16} = {call:<40} : {t.shape} {t.dtype}")
    return "\n".join(lines)


def summary_text(graph: Graph, keep: set[str] | None = None) -> str:
    names = [n for n in graph.nodes if keep is None or n.name in keep]
    ops = Counter(n.op for n in names)
    inputs = [n.name for n in names if n.op == "input"]
    shown = shortlist(inputs)
    return (
        f"graph of {len(names)} nodes (too many to draw: showing a summary)\n"
        f"  inputs ({len(inputs)}): {shown}\n"
        f"  ops: {', '.join(f'{op} x{c}' for op, c in ops.most_common())}"
    )


def shortlist(names: Sequence[str], most: int | None = None) -> str:
    """The first `most` names (MOST_LISTED), then "..." if there are more."""
    most = MOST_LISTED if most is None else most
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def mimebundle(
    graph: Graph,
    keep: set[str] | None = None,
    colour: Mapping[str, str] | None = None,
    title: str = "",
) -> dict[str, str]:
    count = len(keep) if keep is not None else len(graph)
    if count > MAX_DRAWN:
        text = summary_text(graph, keep)
        return {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}
    d = graph_drawing(graph, keep, colour)
    svg = to_svg(d)
    heading = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return {
        "text/plain": (title + "\n" if title else "") + graph_text(graph, keep),
        # JupyterLab prefers Markdown to SVG, and HTML to both: the picture goes in HTML
        # too, or a notebook would show the Mermaid block.
        "text/html": heading + svg_img(svg),
        "image/svg+xml": svg,
        "text/markdown": f"```mermaid\n{to_mermaid(d)}\n```",
    }


def svg_img(svg: str) -> str:
    """The SVG as an <img> for HTML: JupyterLab's sanitizer, which cleans the HTML of a
    notebook it did not run (one opened from a file), strips inline <svg> to its text but
    keeps an image's data URI; and the drawing's ids cannot clash with another's."""
    data = base64.b64encode(svg.encode()).decode()
    return f'<img alt="graph" src="data:image/svg+xml;base64,{data}"/>'


def partition_colours(partitions: Sequence[Sequence[str]]) -> dict[str, str]:
    return {name: PALETTE[k % len(PALETTE)] for k, nodes in enumerate(partitions) for name in nodes}
