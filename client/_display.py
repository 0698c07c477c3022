"""Pictures of graphs and plans for notebooks and terminals.

SVG through Graphviz's `dot` when it is installed, otherwise a built-in layered layout (no
external program); `to_dot()` and `to_mermaid()` for other tools; a text form for terminals.
Graphs larger than MAX_DRAWN nodes are summarised instead of drawn node by node.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from graphgrad.engine import Graph

MAX_DRAWN = 80
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
        label = (
            f"{node.name}\n{node.op} · {shape}"
            if node.op != "input"
            else f"{node.name}\ninput · {shape}"
        )
        fill = (colour or {}).get(
            node.name, "#e9ecef" if node.op in ("input", "constant") else "#ffffff"
        )
        nodes.append((node.name, label, fill))
        edges += [(src, node.name) for src in node.inputs if keep is None or src in keep]
    return Drawing(nodes, edges)


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


def layered_svg(
    d: Drawing, box_w: int = 150, box_h: int = 38, gap_x: int = 20, gap_y: int = 34
) -> str:
    """Nodes in layers by longest path from the sources, edges as straight lines."""
    layer: dict[str, int] = {}
    preds: dict[str, list[str]] = {name: [] for name, _, _ in d.nodes}
    for a, b in d.edges:
        preds[b].append(a)
    succs: dict[str, list[str]] = {name: [] for name, _, _ in d.nodes}
    for a, b in d.edges:
        succs[a].append(b)
    for name, _, _ in d.nodes:  # topological order: predecessors come first
        layer[name] = 1 + max((layer[p] for p in preds[name]), default=-1)
    for name, _, _ in d.nodes:  # inputs and constants sit just above their first consumer
        if not preds[name] and succs[name]:
            layer[name] = max(min(layer[s] for s in succs[name]) - 1, 0)
    used = sorted(set(layer.values()))  # drop emptied rows
    layer = {name: used.index(k) for name, k in layer.items()}
    rows: dict[int, list[str]] = {}
    for name, _, _ in d.nodes:
        rows.setdefault(layer[name], []).append(name)
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x if rows else 100
    pos = {}
    for row, names in rows.items():
        offset = (width - len(names) * (box_w + gap_x) + gap_x) / 2
        for col, name in enumerate(names):
            pos[name] = (offset + col * (box_w + gap_x), gap_y / 2 + row * (box_h + gap_y))
    height = (max(rows) + 1) * (box_h + gap_y) if rows else 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}"'
        f' viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial" '
        'font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
        "</defs>",
    ]
    for a, b in d.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        parts.append(
            f'<line class="edge" data-from="{html.escape(a)}" data-to="{html.escape(b)}"'
            f' x1="{xa + box_w / 2:.1f}" y1="{ya + box_h:.1f}" x2="{xb + box_w / 2:.1f}"'
            f' y2="{yb:.1f}" stroke="#555" marker-end="url(#arrow)"/>'
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


def graph_text(graph: Graph, keep: set[str] | None = None) -> str:
    lines = []
    for node, t in zip(graph.nodes, graph.types, strict=True):
        if keep is not None and node.name not in keep:
            continue
        args = ", ".join(node.inputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in node.attrs.items() if k != "value")
        call = f"{node.op}({', '.join(x for x in (args, attrs) if x)})"
        lines.append(f"{node.name:>16} = {call:<40} : {t.shape} {t.dtype}")
    return "\n".join(lines)


def summary_text(graph: Graph, keep: set[str] | None = None) -> str:
    names = [n for n in graph.nodes if keep is None or n.name in keep]
    ops = Counter(n.op for n in names)
    inputs = [n.name for n in names if n.op == "input"]
    shown = ", ".join(inputs[:8]) + (", ..." if len(inputs) > 8 else "")
    return (
        f"graph of {len(names)} nodes (too many to draw: showing a summary)\n"
        f"  inputs ({len(inputs)}): {shown}\n"
        f"  ops: {', '.join(f'{op} x{c}' for op, c in ops.most_common())}"
    )


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
    return {
        "text/plain": (title + "\n" if title else "") + graph_text(graph, keep),
        "image/svg+xml": to_svg(d),
        "text/markdown": f"```mermaid\n{to_mermaid(d)}\n```",
    }


def partition_colours(partitions: Sequence[Sequence[str]]) -> dict[str, str]:
    return {name: PALETTE[k % len(PALETTE)] for k, nodes in enumerate(partitions) for name in nodes}
