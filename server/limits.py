"""Request limits, checked before any work is done. Exceeding one is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from graphgrad.engine import Graph, LimitError

MIB = 1 << 20


def one_per_cpu() -> int:
    """The default of the caps on CPU work at once (runs, running jobs): one per CPU."""
    return os.cpu_count() or 1


def default_request_bytes() -> int:
    """An eighth of the machine's memory: a few requests at their budget fit at once."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(256 * MIB, total // 8)


@dataclass(frozen=True, slots=True)
class Limits:
    max_nodes: int = 1_000_000
    max_tensor_bytes: int = 512 * MIB  # any single value: feed, intermediate, output
    max_message_bytes: int = 512 * MIB  # gRPC messages, both ways
    # One request's peak memory from declared shapes: values kept for the backward, the
    # gradients (zero ones too) and the response; for a job, its history and checkpoints.
    max_request_bytes: int = field(default_factory=default_request_bytes)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def check_node_count(self, n: int) -> None:
        if n > self.max_nodes:
            raise LimitError(
                f"the graph has {n} nodes, over the limit max_nodes={self.max_nodes}",
                limit="max_nodes",
            )

    def check_request_bytes(self, need: int, what: str) -> None:
        """`what` (e.g. "the run of 'L' with wrt=['x']") would take `need` bytes at its peak."""
        if need > self.max_request_bytes:
            raise LimitError(
                f"{what} needs about {need} bytes, over the limit "
                f"max_request_bytes={self.max_request_bytes}",
                limit="max_request_bytes",
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
