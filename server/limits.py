"""Request limits, checked before any work is done. Exceeding one is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from graphgrad.engine import Graph, LimitError

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    max_nodes: int = 1_000_000
    max_tensor_bytes: int = 512 * MIB  # any single value: feed, intermediate, output
    max_message_bytes: int = 512 * MIB  # gRPC messages, both ways

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def check_node_count(self, n: int) -> None:
        if n > self.max_nodes:
            raise LimitError(
                f"the graph has {n} nodes, over the limit max_nodes={self.max_nodes}",
                limit="max_nodes",
            )

    def check_graph(self, graph: Graph) -> None:
        """Every value the graph can produce must fit max_tensor_bytes (huge shapes are refused).
        The node count is checked before the graph is decoded (service.register_wire)."""
        for node, t in zip(graph.nodes, graph.types, strict=True):
            if t.nbytes > self.max_tensor_bytes:
                raise LimitError(
                    f"node '{node.name}' would hold {t.shape} {t.dtype} ({t.nbytes} bytes), over "
                    f"the limit max_tensor_bytes={self.max_tensor_bytes}",
                    limit="max_tensor_bytes",
                )
