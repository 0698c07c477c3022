"""Validated graphs by fingerprint: a bounded, thread-safe LRU."""

from __future__ import annotations

from graphgrad.engine import Graph
from graphgrad.engine.lru import LRU


class GraphCache:
    def __init__(self, capacity: int = 256) -> None:
        self._graphs: LRU[str, Graph] = LRU(capacity)

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, fingerprint: str) -> Graph | None:
        return self._graphs.get(fingerprint)

    def put(self, graph: Graph) -> Graph:
        """Keep `graph`; returns the instance held (an equal one already cached wins)."""
        return self._graphs.put(graph.fingerprint, graph)
