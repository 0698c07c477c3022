"""The engine Session under the server's bounds: the graph cache, and request limits checked
before any work. What the servicers delegate to; no protobuf here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from graphgrad.engine import (
    Cancellation,
    Dispatcher,
    ExecutorKind,
    Graph,
    Node,
    RunOptions,
    RunRequest,
    RunResult,
    Session,
)
from graphgrad.engine.errors import GraphError, NotFoundError
from graphgrad.engine.lru import CacheStats
from graphgrad.engine.plan_cache import PLANS
from graphgrad.engine.planner import Explanation
from graphgrad.engine.prepared import PreparedRun
from graphgrad.engine.stacking import StackCancellation, StackKey, run_stacked
from graphgrad.server.cache import DEFAULT_GRAPH_BYTES, DEFAULT_GRAPHS, GraphCache
from graphgrad.server.limits import Limits


@dataclass(frozen=True)
class Pending:
    """A Run request, admitted, that may run stacked with others (server/batcher.py)."""

    graph: Graph
    request: RunRequest
    options: RunOptions
    cancel: Cancellation


@dataclass
class Runtime:
    limits: Limits
    session: Session
    cache: GraphCache

    @classmethod
    def create(
        cls,
        limits: Limits | None = None,
        dispatcher: Dispatcher | None = None,
        cache_size: int = DEFAULT_GRAPHS,
        cache_bytes: int = DEFAULT_GRAPH_BYTES,
    ) -> Runtime:
        return cls(
            limits or Limits(),
            Session(dispatcher or Dispatcher(ray_enabled=False)),
            GraphCache(cache_size, cache_bytes),
        )

    @property
    def dispatcher(self) -> Dispatcher:
        return self.session.dispatcher

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

    def prepare(self, graph: Graph, request: RunRequest, options: RunOptions) -> PreparedRun:
        """The session's prepared run, refused if the peak memory of its next run, from
        declared shapes, is over max_request_bytes (each estimate worked out once per request:
        its eager tier's from its tape, its compiled program's when it would tier up or runs
        elsewhere; Session.admission_memory), and held to that budget afterwards."""
        prepared = self.session.prepare(graph, request, options)
        mem = self.session.admission_memory(prepared)
        limit = self.limits.max_request_bytes
        # A tape may hold more at its peak than the program (then the first call compiles:
        # PreparedRun.may_run_eager); at most twice as much (tests/test_memory_bounds.py), so
        # a request over twice the limit is refused without building its gradient graph.
        if limit < mem.peak <= 2 * limit:
            mem = min(mem, prepared.compiled_memory(), key=lambda m: m.peak)
        self.limits.check_request_bytes(mem.peak, f"{prepared.description()} ({mem})")
        prepared.budget, prepared.admitted_bytes = self.limits.max_request_bytes, mem.peak
        return prepared

    def run(
        self, graph: Graph, request: RunRequest, options: RunOptions, cancel: Cancellation
    ) -> RunResult:
        prepared = self.prepare(graph, request, options)
        return self.session.run_prepared(prepared, request.feeds, request.grad_outputs, cancel)

    def run_stack(
        self, key: StackKey, members: Sequence[Pending], size: int
    ) -> list[RunResult | GraphError]:
        """Members (each admitted, all with `key`) as one stacked run of `size` rows, split:
        each member's result or its own error. It stops when every member is cancelled."""
        cancel = StackCancellation([m.cancel for m in members])
        options = RunOptions(key.executor)
        return run_stacked(
            lambda graph, request: self.session.run(graph, request, options, cancel),
            members[0].graph,
            key,
            [m.request for m in members],
            [m.options.check_numerics for m in members],
            size,
        )

    def explain(
        self,
        graph: Graph,
        request: RunRequest,
        executor: ExecutorKind,
        cancel: Cancellation | None = None,
    ) -> Explanation:
        return self.session.explain(graph, request, executor, cancel)

    def caches(self) -> dict[str, CacheStats]:
        return {"graphs": self.cache.stats(), "plans": PLANS.stats()}
