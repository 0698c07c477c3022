"""What the servicer delegates to: graph cache, limits and the dispatcher. No protobuf here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from graphgrad.engine import Cancellation, Graph, RunRequest, RunResult
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.ir import Node
from graphgrad.engine.planner import Explanation, describe

from .cache import GraphCache
from .errors import NotFoundError
from .limits import Limits


@dataclass
class Runtime:
    limits: Limits
    dispatcher: Dispatcher
    cache: GraphCache

    @classmethod
    def create(
        cls,
        limits: Limits | None = None,
        dispatcher: Dispatcher | None = None,
        cache_size: int = 256,
    ) -> Runtime:
        return cls(
            limits or Limits(), dispatcher or Dispatcher(ray_enabled=False), GraphCache(cache_size)
        )

    def register(self, nodes: Iterable[Node]) -> Graph:
        """Validate and keep a graph; its node count was checked before it was decoded."""
        graph = Graph(nodes)
        self.limits.check_graph(graph)
        return self.cache.put(graph)

    def graph(self, fingerprint: str) -> Graph:
        graph = self.cache.get(fingerprint)
        if graph is None:
            raise NotFoundError(fingerprint)
        return graph

    def run(
        self, graph: Graph, request: RunRequest, executor: str, cancel: Cancellation
    ) -> RunResult:
        return self.dispatcher.run(graph, request, executor, cancel)

    def explain(self, graph: Graph, request: RunRequest, executor: str) -> Explanation:
        name, plan = self.dispatcher.choose(graph, request, executor)
        return describe(graph, name, plan)
