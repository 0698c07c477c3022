"""`explain()` results for people: the plan drawn with its partitions in colour."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable
from typing import Any

from graphgrad import _display
from graphgrad._timeline import timeline_svg
from graphgrad.engine import Explanation, Graph, Prediction, RequestError


class PlanView:
    """How a run would execute: `executor`, `partitions`, `cuts` (see Explanation); shows
    itself as a drawing coloured by partition in notebooks and as text in terminals."""

    def __init__(
        self,
        explanation: Explanation,
        graph: Graph,
        sources: Callable[[int, str], str] | None = None,
        prediction: Prediction | None = None,
    ) -> None:
        self.explanation = explanation
        self._graph = graph
        self._sources = sources
        self.prediction = prediction  # explain(..., cpus=) or (nodes=, cpus_per_node=)

    def source(self, partition: int, phase: str = "backward") -> str:
        """The Python generated for a partition's "forward" or "backward" task (compiled
        once, cached): one line per node, its name in a comment. In-process clients only:
        a server compiles its own."""
        if self._sources is None:
            raise RequestError(
                "program source is shown by in-process clients (gg.connect())", field="source"
            )
        return self._sources(partition, phase)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.explanation, name)

    def __str__(self) -> str:
        """The explanation, with the inputs fed to a partition summarised when there are
        many of them, as a large graph's display summarises its inputs."""
        text = self._plan_text()
        return text if self.prediction is None else f"{text}\n{self.prediction}"

    def _plan_text(self) -> str:
        e = self.explanation
        fed = [c for c in e.cuts if c.src < 0]
        if len(fed) <= _display.MOST_LISTED:
            return str(e)
        lines = [str(dataclasses.replace(e, cuts=tuple(c for c in e.cuts if c.src >= 0)))]
        for dst in sorted({c.dst for c in fed}):
            into = [c for c in fed if c.dst == dst]
            lines.append(
                f"  feeds -> P{dst}: {len(into)} inputs ({sum(c.bytes for c in into)} bytes): "
                + _display.shortlist([c.node for c in into])
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        e = self.explanation
        return (
            f"<graphgrad.Plan {e.executor}: {len(e.partitions)} partition(s), "
            f"{e.cut_bytes} bytes across cuts>"
        )

    def _colours(self) -> dict[str, str]:
        return _display.partition_colours([p.nodes for p in self.explanation.partitions])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        keep = {n for p in self.explanation.partitions for n in p.nodes}
        keep |= {c.node for c in self.explanation.cuts}
        bundle = _display.mimebundle(self._graph, keep, self._colours(), title=str(self))
        legend = "".join(
            f'<span style="background:{_display.PALETTE[p.index % len(_display.PALETTE)]};'
            f'padding:2px 6px;margin-right:4px">P{p.index}: {len(p.nodes)} nodes, '
            f"{p.flops:.3g} flops</span>"
            for p in self.explanation.partitions
        )
        if "image/svg+xml" in bundle:
            bundle["text/html"] = (
                f"<div><b>{html.escape(repr(self))}</b><br/>{legend}</div>"
                + _display.svg_img(bundle["image/svg+xml"])
            )
            if self.prediction is not None:  # the predicted timeline under the plan
                bundle["text/html"] += "<br/>" + _display.svg_img(timeline_svg(self.prediction))
        return bundle

    def to_dot(self) -> str:
        keep = {n for p in self.explanation.partitions for n in p.nodes}
        return _display.to_dot(_display.graph_drawing(self._graph, keep, self._colours()))
