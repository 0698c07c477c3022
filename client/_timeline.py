"""A predicted run drawn as a timeline: one lane per CPU, a bar per task, coloured by
partition as the plan picture colours it (backward tasks striped lighter)."""

from __future__ import annotations

import html
import re

from graphgrad._display import PALETTE
from graphgrad.engine import Prediction

LANE, LEFT, WIDTH = 16, 90, 560
MOST_DRAWN = 2000  # bars beyond these are left out (the text says how many tasks there are)


def timeline_svg(p: Prediction) -> str:
    lanes = sorted({(t.node, t.cpu) for t in p.timeline}, key=lambda k: (k[1] < 0, k))
    row = {lane: k for k, lane in enumerate(lanes)}
    span = p.makespan or 1.0
    height = LANE * len(lanes) + 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 10}" height="{height}" '
        'font-family="sans-serif" font-size="10">',
        f'<text x="4" y="12">predicted on {html.escape(str(p.cluster))}: '
        f"{p.makespan * 1e3:.3g} ms, bound by {html.escape(p.bound)}</text>",
    ]
    for (node, cpu), k in row.items():
        label = "caller" if cpu < 0 else f"node {node} cpu {cpu}"
        out.append(f'<text x="4" y="{30 + k * LANE + 11}">{label}</text>')
    for t in p.timeline[:MOST_DRAWN]:
        match = re.match(r"P(\d+) ", t.name)
        colour = PALETTE[int(match.group(1)) % len(PALETTE)] if match else "#d3d3d3"
        x = LEFT + WIDTH * t.start / span
        w = max(WIDTH * (t.end - t.start) / span, 0.5)
        y = 30 + row[(t.node, t.cpu)] * LANE
        opacity = "0.55" if t.name.endswith("backward") else "1"
        out.append(
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{LANE - 3}" fill="{colour}" '
            f'fill-opacity="{opacity}" stroke="#555" stroke-width="0.5">'
            f"<title>{html.escape(t.name)}: {t.start * 1e3:.3g}-{t.end * 1e3:.3g} ms</title></rect>"
        )
    out.append("</svg>")
    return "\n".join(out)
