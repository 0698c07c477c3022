"""The executor interface, run results and stats, and the local (in-process) executor."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from graphgrad.engine.autodiff import PassPlan, RunRequest, plan_pass
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.codegen import TIER_UP_CALLS
from graphgrad.engine.driver import (
    InlineProgram,
    InlineRunner,
    Schedule,
    inline_program,
    run_inline,
    run_schedule,
    schedule,
)
from graphgrad.engine.eager import EagerOpError, held_tape, record, run_tape
from graphgrad.engine.errors import ExecutionError, RequestError
from graphgrad.engine.ir import Graph
from graphgrad.engine.plan_cache import DerivedCache, RequestKey
from graphgrad.engine.planner import MAX_PARTITIONS, Plan, partition, single_partition

__all__ = ["Cancellation", "Executor", "LocalExecutor", "RunResult", "RunStats", "TaskStat"]


@dataclass(frozen=True, slots=True)
class TaskStat:
    """One unit of work: a partition's forward or backward pass."""

    partition: int
    phase: str  # "forward" | "backward" | "forward+backward" (one inline program)
    start: float  # seconds since the epoch
    end: float
    where: str  # "inline", or the Ray node id and worker
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class RunStats:
    executor: str
    wall_time: float
    partitions: int = 1
    bytes_moved: int = 0
    tasks: tuple[TaskStat, ...] = ()
    batch_size: int = 1  # requests run together in one stacked run (engine/stacking.py)
    worker: str = ""  # the server process that answered ("HOST:PID"); "" in process


@dataclass(frozen=True, slots=True)
class RunResult:
    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    stats: RunStats


def check_finite(result: RunResult, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise naming the first tensor holding NaN or infinity (what `check_numerics` asks)."""
    for kind, arrays in (("feeds", feeds), ("values", result.values), ("grads", result.grads)):
        for name, a in arrays.items():
            if not np.isfinite(a).all():
                raise RequestError(
                    f"{kind}['{name}'] holds NaN or infinity (check_numerics is on)",
                    field=f"{kind}['{name}']",
                )


class Executor(Protocol):
    name: str

    def plan(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> tuple[Plan, Schedule]: ...

    def run(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> RunResult: ...


@dataclass(frozen=True, slots=True)
class PartitionedKey:
    request: RequestKey
    min_partition_seconds: float | None  # None: a single partition
    max_partitions: int = MAX_PARTITIONS


_SCHEDULES: DerivedCache[PartitionedKey, tuple[Plan, Schedule]] = DerivedCache("local schedules")
_INLINE: DerivedCache[RequestKey, InlineProgram] = DerivedCache("inline programs")


def request_key(graph: Graph, request: RunRequest) -> RequestKey:
    return RequestKey(graph.serial, request.outputs, request.wrt, tuple(request.grad_outputs or ()))


class LocalExecutor:
    """Runs requests in this process: the driver (engine/driver.py) with the inline runner,
    over a single partition; given `min_partition_seconds`, over the partitions the Ray
    executor would make (so partitioned plans can be checked without Ray)."""

    name = "local"

    def __init__(
        self, min_partition_seconds: float | None = None, max_partitions: int = MAX_PARTITIONS
    ) -> None:
        self.min_partition_seconds = min_partition_seconds
        self.max_partitions = max_partitions

    def plan(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> tuple[Plan, Schedule]:
        seeded = tuple(request.grad_outputs or ())
        bar, most = self.min_partition_seconds, self.max_partitions

        def partitioner(pp: PassPlan) -> Plan:
            if bar is None:
                return single_partition(graph, pp)
            return partition(graph, pp, min_seconds=bar, max_partitions=most, cancel=cancel)

        def make() -> tuple[Plan, Schedule]:
            sched = schedule(graph, request.outputs, request.wrt, seeded, partitioner)
            return sched.plan, sched

        key = PartitionedKey(request_key(graph, request), bar, most)
        return _SCHEDULES.get_or_make(key, make)

    def run_keyed(
        self,
        graph: Graph,
        key: RequestKey,
        request: RunRequest,
        cancel: Cancellation | None,
        may_compile: Callable[[], bool] = lambda: True,
        may_run_eager: Callable[[], bool] = lambda: True,
    ) -> RunResult:
        """Run as one inline program, `key` being `request_key(graph, request)` (a prepared
        run holds it: the warm path builds no key). `may_compile`: asked when the request
        would tier up; False keeps it on the eager tier (its program would not fit the
        memory its runs were admitted with). `may_run_eager`: asked where it has no program;
        False compiles it at once (its tape would not fit)."""
        t0 = time.time()
        values, grads = self._run_inline(
            graph, key, request, cancel or Cancellation(), may_compile, may_run_eager
        )
        t1 = time.time()
        phase = "forward+backward" if request.wrt else "forward"
        stat = TaskStat(0, phase, t0, t1, "inline")
        return RunResult(values, grads, RunStats(self.name, t1 - t0, 1, tasks=(stat,)))

    def run(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> RunResult:
        if self.min_partition_seconds is None:  # one partition: one program, one call
            return self.run_keyed(graph, request_key(graph, request), request, cancel)
        t0 = time.time()
        _, sched = self.plan(graph, request, cancel)
        out = run_schedule(graph, sched, request, InlineRunner(), cancel or Cancellation())
        tasks = tuple(TaskStat(s.partition, s.phase, m.start, m.end, m.where) for s, m in out.tasks)
        parts = max(len(sched.plan.partitions), 1)
        return RunResult(
            out.values, out.grads, RunStats(self.name, time.time() - t0, parts, tasks=tasks)
        )

    def compiled(self, key: RequestKey) -> bool:
        """Whether the request's program is made: its runs are the compiled tier's (else the
        next run is eager, unless it tiers up)."""
        return _INLINE.get(key) is not None

    def _run_inline(
        self,
        graph: Graph,
        key: RequestKey,
        request: RunRequest,
        cancel: Cancellation,
        may_compile: Callable[[], bool] = lambda: True,
        may_run_eager: Callable[[], bool] = lambda: True,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Tiers, as JIT engines have them: a request's first calls run eagerly (engine/
        eager.py: no gradient graph, no program); the TIER_UP_CALLS-th makes its program and
        compiles it at once, and later calls run that. A request whose tape would not fit
        its budget (`may_run_eager`) runs its program from the first call."""
        ip, tp = _INLINE.get(key), None
        if ip is None and may_run_eager():
            tp = held_tape(key)
            try:
                if tp is None:  # the first call: its tape is made, then run
                    tp, values, grads = record(graph, key, request, cancel)
                    return values, grads
                tp.calls += 1
                if tp.calls < TIER_UP_CALLS or not may_compile():
                    return run_tape(graph, tp, request, cancel)
            except EagerOpError as e:
                # The program runs it: its error names the node (gradient ones too), unless
                # the program is over the memory this run was admitted with.
                if e.node is not None and not may_compile():
                    where = "the gradient of its op" if e.gradient else "its op"
                    raise ExecutionError(f"{where} failed: {e}", node=e.node) from e
        if ip is None:

            def make() -> InlineProgram:
                sched = self.plan(graph, request, cancel)[1]
                pp = plan_pass(graph, key.outputs, key.wrt, key.seeded)
                return inline_program(graph, sched, pp)

            ip = _INLINE.get_or_make(key, make)
            if tp is not None and tp.calls >= TIER_UP_CALLS:
                ip.program.compiled()
        return run_inline(graph, ip, request, cancel)
