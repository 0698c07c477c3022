"""Choosing where a request runs: "local", "ray", or "auto" (the cost model decides)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from graphgrad.engine.autodiff import RunRequest, plan_pass
from graphgrad.engine.calibration import Calibration, in_force
from graphgrad.engine.driver import Schedule
from graphgrad.engine.errors import RequestError
from graphgrad.engine.executor import Cancellation, Executor, LocalExecutor, RunResult
from graphgrad.engine.ir import Graph
from graphgrad.engine.plan_cache import DerivedCache, RequestKey
from graphgrad.engine.planner import MAX_PARTITIONS, Plan, may_prefer_ray, single_partition
from graphgrad.engine.simulator import Cluster, choose_partitions
from graphgrad.engine.training_run import SegmentRunner

log = logging.getLogger("graphgrad.dispatch")
_SINGLE: DerivedCache[RequestKey, Plan] = DerivedCache("single-partition plans")


@dataclass(frozen=True, slots=True)
class ChoiceKey:
    request: RequestKey
    cpus: int
    calibration: str  # its source


# The auto policy's partition count (0: inline), simulated once per request, CPUs and
# calibration.
_AUTO: DerivedCache[ChoiceKey, int] = DerivedCache("auto choices")
EXECUTOR_NAMES = ("auto", "local", "ray")


def check_executor(name: str, field: str = "options.executor") -> None:
    if name not in EXECUTOR_NAMES:
        raise RequestError(f"executor must be one of {EXECUTOR_NAMES}, got '{name}'", field=field)


class Dispatcher:
    """Holds the executors; Ray is created (and imported) only when first needed."""

    def __init__(
        self,
        *,
        ray_address: str | None = None,
        ray_num_cpus: int | None = None,
        ray_enabled: bool = True,
        calibration: Calibration | None = None,
    ) -> None:
        self.local = LocalExecutor()
        self.ray_enabled = ray_enabled
        self._calibration = calibration
        self._ray_args = (ray_address, ray_num_cpus)
        self._ray: Any = None
        self._lock = threading.Lock()

    @property
    def calibration(self) -> Calibration:
        """Its own calibration if it was given one, else the process's (engine/calibration.py)."""
        return self._calibration or in_force()

    @property
    def ray(self) -> Any:
        """The Ray executor (starting Ray if it is not running)."""
        if not self.ray_enabled:
            raise RequestError(
                "the Ray executor is disabled on this server (--no-ray)", field="options.executor"
            )
        with self._lock:  # one executor, even when the first requests race
            if self._ray is None:
                if not (self._ray_args[0] or os.environ.get("RAY_ADDRESS")):
                    # An embedded Ray serves this machine alone: Ray's single-host mode keeps
                    # every address on loopback. Ray reads this when it is first imported.
                    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                from graphgrad.engine.ray_executor import (
                    RayExecutor,  # ray is imported here and only here
                )

                self._ray = RayExecutor(*self._ray_args)
            return self._ray

    def ray_ready(self) -> bool:
        return self._ray is not None and self._ray.started()

    def ray_cpus(self) -> int:
        """The CPUs of the Ray that is up (1 while none is)."""
        return int(self.ray.cpus()) if self.ray_ready() else 1

    def choose(
        self,
        graph: Graph,
        request: RunRequest,
        executor: str,
        cancel: Cancellation | None = None,
    ) -> tuple[str, Plan]:
        """The executor a request runs on and its plan; `cancel` stops planning too."""
        check_executor(executor)
        partitions = self._partitions(graph, request, executor, cancel)
        if partitions:
            return "ray", self.ray.plan(graph, request, cancel, partitions)[0]
        seeded = tuple(request.grad_outputs or ())
        key = RequestKey(graph.serial, request.outputs, request.wrt, seeded)
        pass_plan = plan_pass(graph, request.outputs, request.wrt, seeded)
        return "local", _SINGLE.get_or_make(key, lambda: single_partition(graph, pass_plan))

    def schedule(
        self,
        graph: Graph,
        request: RunRequest,
        executor: str,
        cancel: Cancellation | None = None,
    ) -> tuple[str, Plan, Schedule]:
        """`choose`, with the schedule of the plan chosen."""
        check_executor(executor)
        partitions = self._partitions(graph, request, executor, cancel)
        if partitions:
            return "ray", *self.ray.plan(graph, request, cancel, partitions)
        return "local", *self.local.plan(graph, request, cancel)

    def _partitions(
        self, graph: Graph, request: RunRequest, executor: str, cancel: Cancellation | None
    ) -> int:
        """At most how many partitions the request runs in on Ray; 0: it runs inline."""
        if executor == "ray":
            return MAX_PARTITIONS
        return self.auto_partitions(graph, request, cancel) if executor == "auto" else 0

    def auto_partitions(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> int:
        """The auto policy: how many partitions to run on Ray, or 0 to run inline. Ray only
        when it is already up (a request never waits for Ray to start unless it asked for
        Ray) and the plan simulator, with the calibration in force, predicts it wins; a
        linear bound rules out most graphs before any partitioning."""
        cpus = self.ray_cpus()
        if cpus < 2:
            return 0
        seeded = tuple(request.grad_outputs or ())
        pass_plan = plan_pass(graph, request.outputs, request.wrt, seeded)
        if not may_prefer_ray(graph, pass_plan, cpus):
            return 0
        cal = self.calibration
        key = ChoiceKey(
            RequestKey(graph.serial, request.outputs, request.wrt, seeded), cpus, cal.source
        )
        bare = RunRequest(request.outputs, {}, request.wrt, request.grad_outputs)

        def choose() -> int:
            return choose_partitions(graph, bare, Cluster(1, cpus), cal, cancel).partitions

        return _AUTO.get_or_make(key, choose)

    def training_runner(self, executor: str) -> tuple[SegmentRunner, int]:
        """The runner of training segments and the CPUs it has. Starts Ray (on the caller's
        thread: Ray must start on the main thread) when the job will use it."""
        check_executor(executor, field="executor")
        if executor == "local" or (executor == "auto" and not self.ray_ready()):
            return SegmentRunner(), 1
        from graphgrad.engine.ray_training import RaySegmentRunner  # imports ray

        self.ray.start()
        return RaySegmentRunner(self.ray), int(self.ray.cpus())

    def executor(self, name: str) -> Executor:
        executor: Executor = self.ray if name == "ray" else self.local
        return executor

    def run(
        self,
        graph: Graph,
        request: RunRequest,
        executor: str = "auto",
        cancel: Cancellation | None = None,
    ) -> RunResult:
        check_executor(executor)
        if executor == "local" or (executor == "auto" and not self.ray_ready()):
            return self.local.run(graph, request, cancel)  # what `choose` would pick
        if executor == "ray":
            return self.ray.run(graph, request, cancel)
        partitions = self.auto_partitions(graph, request, cancel)
        if partitions:
            return self.ray.run(graph, request, cancel, partitions)
        return self.local.run(graph, request, cancel)
