"""What the servicer delegates to: graph cache, limits and executors. No protobuf here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from graphgrad.engine import (
    Cancellation,
    Executor,
    Graph,
    LocalExecutor,
    RequestError,
    RunRequest,
    RunResult,
)
from graphgrad.engine.autodiff import plan_pass
from graphgrad.engine.ir import Node
from graphgrad.engine.planner import Plan, partition, prefers_ray, single_partition

from .cache import GraphCache
from .errors import NotFoundError
from .limits import Limits


@dataclass
class Runtime:
    limits: Limits
    executors: Mapping[str, Executor]
    cache: GraphCache

    @classmethod
    def create(
        cls,
        limits: Limits | None = None,
        executors: Mapping[str, Executor] | None = None,
        cache_size: int = 256,
    ) -> Runtime:
        return cls(
            limits or Limits(), executors or {"local": LocalExecutor()}, GraphCache(cache_size)
        )

    def register(self, nodes: Iterable[Node]) -> Graph:
        nodes = list(nodes)
        self.limits.check_node_count(len(nodes))
        graph = Graph(nodes)
        self.limits.check_graph(graph)
        return self.cache.put(graph)

    def graph(self, fingerprint: str) -> Graph:
        graph = self.cache.get(fingerprint)
        if graph is None:
            raise NotFoundError(fingerprint)
        return graph

    def choose(
        self,
        graph: Graph,
        outputs: tuple[str, ...],
        wrt: tuple[str, ...],
        seeded: tuple[str, ...],
        executor: str,
    ) -> tuple[str, Plan]:
        """The executor a request runs on and its plan; "auto" asks the cost model."""
        if executor not in ("auto", *self.executors):
            raise RequestError(
                f"executor '{executor}' is not available on this server "
                f"(available: auto, {', '.join(sorted(self.executors))})",
                field="options.executor",
            )
        pass_plan = plan_pass(graph, outputs, wrt, seeded)
        if executor == "local" or (executor == "auto" and "ray" not in self.executors):
            return "local", single_partition(graph, pass_plan)
        plan = partition(graph, pass_plan)
        if executor == "auto" and not prefers_ray(plan, self.cpus()):
            return "local", single_partition(graph, pass_plan)
        return "ray", plan

    def cpus(self) -> int:
        return int(getattr(self.executors.get("ray"), "cpus", lambda: 1)())

    def run(
        self, graph: Graph, request: RunRequest, executor: str, cancel: Cancellation
    ) -> RunResult:
        seeded = tuple(request.grad_outputs or ())
        name, _ = self.choose(graph, request.outputs, request.wrt, seeded, executor)
        return self.executors[name].run(graph, request, cancel)

    def explain(
        self, graph: Graph, outputs: tuple[str, ...], wrt: tuple[str, ...], executor: str
    ) -> tuple[str, Plan]:
        return self.choose(graph, outputs, wrt, (), executor)
