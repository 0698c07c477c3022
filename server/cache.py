"""Validated graphs by fingerprint: a thread-safe LRU bounded by count and estimated bytes."""

from __future__ import annotations

from graphgrad.engine import Graph, LimitError
from graphgrad.engine.lru import LRU, CacheStats

DEFAULT_GRAPHS = 256
DEFAULT_GRAPH_BYTES = 1 << 30


class GraphCache:
    def __init__(self, capacity: int = DEFAULT_GRAPHS, max_bytes: int = DEFAULT_GRAPH_BYTES):
        self._graphs: LRU[str, Graph] = LRU(capacity, max_bytes, Graph.approx_bytes)

    def __len__(self) -> int:
        return len(self._graphs)

    def stats(self) -> CacheStats:
        return self._graphs.stats()

    def get(self, fingerprint: str) -> Graph | None:
        return self._graphs.get(fingerprint)

    def peek(self, fingerprint: str) -> Graph | None:
        """get(), without marking the graph used (its place in the LRU order stays)."""
        return self._graphs.peek(fingerprint)

    def put(self, graph: Graph) -> Graph:
        """Keep `graph`; returns the instance held (an equal one already cached wins). A graph
        larger than the whole cache is refused: its fingerprint would be gone at once."""
        if not self._graphs.fits(graph):
            raise LimitError(
                f"the graph ({len(graph)} nodes) takes about {graph.approx_bytes()} bytes, over "
                f"the limit graph_cache_bytes={self._graphs.max_bytes}",
                limit="graph_cache_bytes",
            )
        return self._graphs.put(graph.fingerprint, graph)
