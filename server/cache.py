"""Validated graphs by fingerprint: a bounded, thread-safe LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict

from graphgrad.engine import Graph


class GraphCache:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Graph] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, fingerprint: str) -> Graph | None:
        with self._lock:
            graph = self._items.get(fingerprint)
            if graph is not None:
                self._items.move_to_end(fingerprint)
            return graph

    def put(self, graph: Graph) -> Graph:
        """Keep `graph`; returns the instance held (an equal one already cached wins)."""
        with self._lock:
            held = self._items.setdefault(graph.fingerprint, graph)
            self._items.move_to_end(graph.fingerprint)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return held
