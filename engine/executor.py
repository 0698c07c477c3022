"""The executor interface, run results and stats, and the local (in-process) executor."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .autodiff import (
    Cotangents,
    RunRequest,
    backward_step,
    check_feeds,
    compiled,
    evaluate,
    owned,
    plan_pass,
    seed_cotangents,
)
from .errors import CancelledError, RequestError
from .ir import Graph


@dataclass(frozen=True, slots=True)
class TaskStat:
    """One unit of work: a partition's forward or backward pass."""

    partition: int
    phase: str  # "forward" | "backward"
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


@dataclass(frozen=True, slots=True)
class RunResult:
    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    stats: RunStats


@dataclass(slots=True)
class Cancellation:
    """A deadline and a cancel flag, checked between nodes and between tasks."""

    deadline: float | None = None  # time.monotonic() value
    cancelled: bool = False  # set from any thread; a plain bool is enough under the GIL

    @classmethod
    def within(cls, seconds: float | None) -> Cancellation:
        """A cancellation whose deadline is `seconds` from now (None: no deadline)."""
        return cls(deadline=None if seconds is None else time.monotonic() + seconds)

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise CancelledError("the run was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CancelledError("the run's deadline passed")


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

    def run(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> RunResult: ...


class LocalExecutor:
    """Runs the whole graph in this process, dropping each value once nothing needs it."""

    name = "local"

    def run(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> RunResult:
        # NaN and infinity are values like any other here; numpy's warnings about them are noise.
        with np.errstate(all="ignore"):
            return self._run(graph, request, cancel or Cancellation())

    def _run(self, graph: Graph, request: RunRequest, cancel: Cancellation) -> RunResult:
        t0 = time.time()
        plan = plan_pass(graph, request.outputs, request.wrt, list(request.grad_outputs or ()))
        values = check_feeds(graph, plan, request.feeds)
        seeds = seed_cotangents(graph, plan, request.grad_outputs)
        forward, backward = compiled(graph, plan)

        # Reference counts: one per later use, in the forward or in a VJP; outputs are pinned.
        uses = dict(plan.uses)
        pinned = set(plan.outputs)

        def release(nodes: tuple[int, ...]) -> None:
            for j in nodes:
                uses[j] -= 1
                if uses[j] <= 0 and j not in pinned:
                    del values[j]

        for step in forward:
            cancel.check()
            values[step.node] = evaluate(step, values)
            release(step.inputs)
        out_values = {graph.nodes[o].name: values[o] for o in plan.outputs}
        t1 = time.time()

        cot = Cotangents()
        for o, s in seeds.items():
            cot.seed(o, s)
        wanted = set(plan.wrt)
        grads: dict[int, np.ndarray | None] = {}
        for step in backward:
            cancel.check()
            g = cot.total(step.node)
            if step.node in wanted:
                grads[step.node] = g
            if g is not None:
                backward_step(step, g, values, cot)
            release((step.node, *step.inputs))
        for w in plan.wrt:
            if w not in grads:
                grads[w] = cot.total(w)
        t2 = time.time()

        grad_out = {}
        for w in plan.wrt:
            g, t = grads[w], graph.types[w]
            grad_out[graph.nodes[w].name] = np.zeros(t.shape, t.dtype) if g is None else owned(g)
        tasks = [TaskStat(0, "forward", t0, t1, "inline")]
        if plan.wrt:
            tasks.append(TaskStat(0, "backward", t1, t2, "inline"))
        return RunResult(out_values, grad_out, RunStats(self.name, t2 - t0, tasks=tuple(tasks)))
