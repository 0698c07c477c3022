"""The engine's one data plane (the role KServe's DataPlane plays): run, explain, prepare,
and training jobs with their results by placement. The in-process client and the gRPC
servicers are thin wrappers over a Session: they translate arguments (the servicers with
graphgrad.wire) and call it, nothing more.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.calibration import in_force
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.driver import task_source
from graphgrad.engine.errors import RequestError
from graphgrad.engine.executor import RunResult, check_finite
from graphgrad.engine.ir import Graph
from graphgrad.engine.job_manager import JobManager, ManagedJob
from graphgrad.engine.job_reports import JobView, ResultPart
from graphgrad.engine.job_store import MemoryJobStore
from graphgrad.engine.kinds import ExecutorKind
from graphgrad.engine.memory import RequestMemory
from graphgrad.engine.ops.docs import OpInfo, op_infos
from graphgrad.engine.plan_cache import DerivedCache
from graphgrad.engine.planner import Explanation, describe
from graphgrad.engine.prepared import PreparedKey, PreparedRun
from graphgrad.engine.simulator import Cluster, Prediction, choose_partitions, predict
from graphgrad.engine.training import TrainSpec

# Prepared runs by graph instance, names and options: small, within the plan cache's bounds.
_PREPARED: DerivedCache[PreparedKey, PreparedRun] = DerivedCache("prepared runs")
# A job as the in-process client submits it: its templates' specs and the executor.
LocalSpec = tuple[list[TrainSpec], ExecutorKind]


@dataclass(frozen=True)
class RunOptions:
    executor: ExecutorKind = ExecutorKind.AUTO
    check_numerics: bool = False
    exact: bool = False  # never stacked with other requests (engine/stacking.py)


@dataclass(frozen=True)
class Explained:
    """An explanation, the generated source of its partitions' tasks, and its predicted run
    on the cluster asked about (None: none asked)."""

    explanation: Explanation
    source: Callable[[int, str], str]
    prediction: Prediction | None = None


class Session:
    """Run, explain and prepare requests, and train jobs, on one Dispatcher (inline or Ray).

    Jobs go through one JobManager: by default one of this process, in memory (its specs
    are LocalSpec; every job starts at once; its results may be read while it runs; a job
    that failed keeps its exception on its handle), or the one a server attaches (durable,
    shared by its workers, its specs the wire's bytes)."""

    def __init__(
        self, dispatcher: Dispatcher | None = None, jobs: JobManager[Any] | None = None
    ) -> None:
        self.dispatcher = dispatcher or Dispatcher()
        self._manager = jobs
        self._handles: dict[str, ManagedJob] = {}  # the in-memory manager's jobs, kept
        self._lock = threading.Lock()

    # --- requests --------------------------------------------------------------------------

    def run(
        self,
        graph: Graph,
        request: RunRequest,
        options: RunOptions = RunOptions(),
        cancel: Cancellation | None = None,
    ) -> RunResult:
        """`prepare` then `run_prepared`: one path for every run."""
        prepared = self.prepare(graph, request, options)
        return self.run_prepared(prepared, request.feeds, request.grad_outputs, cancel)

    def prepare(
        self, graph: Graph, request: RunRequest, options: RunOptions = RunOptions()
    ) -> PreparedRun:
        """The request's outputs, wrt and seeded outputs (the keys of its grad_outputs; its
        feeds are not looked at) checked and planned once, for runs that only bring feeds.
        Prepared runs are kept (in the plan cache), so preparing again is a lookup."""
        seeded = tuple(request.grad_outputs or ())
        key = PreparedRun.key_of(graph, request.outputs, request.wrt, seeded, options)
        return _PREPARED.get_or_make(key, lambda: PreparedRun(graph, key.request, options))

    def prepared(
        self,
        graph: Graph,
        outputs: Sequence[str],
        wrt: Sequence[str],
        seeded: Sequence[str],
        options: RunOptions,
    ) -> PreparedRun | None:
        """The prepared run of these names, if one is held (a look: nothing is planned)."""
        return _PREPARED.get(PreparedRun.key_of(graph, outputs, wrt, seeded, options))

    def run_prepared(
        self,
        prepared: PreparedRun,
        feeds: Mapping[str, np.ndarray],
        grad_outputs: Mapping[str, np.ndarray] | None = None,
        cancel: Cancellation | None = None,
    ) -> RunResult:
        """Run a prepared request on `feeds` (checked against `prepared.feeds` by the program)
        and seeds (for the outputs it seeds)."""
        request = prepared.request(feeds, grad_outputs)
        executor, d = str(prepared.options.executor), self.dispatcher
        if executor == ExecutorKind.AUTO:
            executor = self._auto(prepared, request, cancel) if d.ray_ready() else "local"
        if executor == ExecutorKind.LOCAL:
            result = d.local.run_keyed(
                prepared.graph,
                prepared.key,
                request,
                cancel,
                prepared.may_compile,
                prepared.may_run_eager,
            )
        else:  # admitted with its eager estimate if it was to run locally then
            prepared.check_compiled_budget()
            result = d.run(prepared.graph, request, executor, cancel)
        if prepared.options.check_numerics:
            check_finite(result, request.feeds)
        prepared.ran(result.stats.wall_time)
        return result

    def admission_memory(self, prepared: PreparedRun) -> RequestMemory:
        """The peak memory of its next run: on the eager tier where it runs locally and its
        program is not made yet (so admitting a new request builds no gradient graph; its
        tier-up asks `prepared.may_compile`), else its compiled program's."""
        executor, d = str(prepared.options.executor), self.dispatcher
        local = executor == ExecutorKind.LOCAL or (
            executor == ExecutorKind.AUTO and not d.ray_ready()
        )
        if local and not d.local.compiled(prepared.key):
            return prepared.eager_memory()
        return prepared.compiled_memory()

    def _auto(self, prepared: PreparedRun, request: RunRequest, cancel: Cancellation | None) -> str:
        """Where "auto" runs a prepared run while Ray is up: the dispatcher's choice (a pass
        over the graph at least), kept on the run for as long as the CPUs and the calibration
        it was made with hold."""
        d = self.dispatcher
        key = (int(d.ray.cpus()), in_force().source)
        if prepared.auto is None or prepared.auto[0] != key:
            prepared.auto = (key, d.choose(prepared.graph, request, ExecutorKind.AUTO, cancel)[0])
        return prepared.auto[1]

    def explain(
        self,
        graph: Graph,
        request: RunRequest,
        executor: ExecutorKind = ExecutorKind.AUTO,
        cancel: Cancellation | None = None,
    ) -> Explanation:
        name, plan = self.dispatcher.choose(graph, request, executor, cancel)
        return describe(graph, name, plan)

    def predict(
        self,
        graph: Graph,
        request: RunRequest,
        cluster: Cluster,
        cancel: Cancellation | None = None,
    ) -> Prediction:
        """The request's run on `cluster`, simulated with the calibration in force, in the
        partition count the auto policy picks there (the default plan's if none is Ray's)."""
        bare = RunRequest(request.outputs, {}, request.wrt)
        cal = self.dispatcher.calibration
        choice = choose_partitions(graph, bare, cluster, cal, cancel)
        p = choice.prediction or predict(graph, bare, cluster, cal, cancel)
        return dataclasses.replace(p, choice=str(choice))

    def plan(
        self,
        graph: Graph,
        request: RunRequest,
        executor: ExecutorKind = ExecutorKind.AUTO,
        cluster: Cluster | None = None,
    ) -> Explained:
        """The explanation with the source of each partition's tasks (compiled once), and
        the prediction on `cluster` if one is given."""
        bare = RunRequest(request.outputs, {}, request.wrt)
        name, plan, sched = self.dispatcher.schedule(graph, bare, executor)
        prediction = None if cluster is None else self.predict(graph, bare, cluster)
        source = functools.partial(task_source, sched)
        return Explained(describe(graph, name, plan), source, prediction)

    def ops(self) -> list[OpInfo]:
        """The ops this engine runs: name, signature, doc, attributes (ListOps' answer)."""
        return op_infos()

    def start_for(self, executor: ExecutorKind) -> None:
        """Start what `executor` needs on the caller's thread (Ray must start on the main
        thread) before work goes to another thread."""
        if executor == ExecutorKind.RAY:
            self.dispatcher.ray.start()

    def ray_info(self) -> tuple[str, dict[str, float]] | None:
        """Ray's address and resources, or None while Ray is not running."""
        if not self.dispatcher.ray_ready():
            return None
        info: tuple[str, dict[str, float]] = self.dispatcher.ray.info()
        return info

    # --- jobs ------------------------------------------------------------------------------

    def attach_jobs(self, manager: JobManager[Any]) -> None:
        """Send this session's jobs to `manager` (a server's durable one)."""
        self._manager = manager

    @property
    def job_manager(self) -> JobManager[Any]:
        with self._lock:
            if self._manager is None:
                self._manager = self._local_manager()
            return self._manager

    def _local_manager(self) -> JobManager[LocalSpec]:
        ids = itertools.count(1)

        def keep(job: ManagedJob) -> None:
            with self._lock:
                self._handles[job.id] = job

        return JobManager(
            MemoryJobStore(),
            self.dispatcher,
            lambda spec: spec,
            max_running=sys.maxsize,  # each job in its own thread, at once
            max_queued=0,
            lease_seconds=math.inf,  # this process's: never taken over
            owner="local",
            new_id=lambda: f"local-{next(ids)}",
            on_start=keep,
            partial_results=True,
        )

    def submit(self, spec: Any) -> str:
        """Check and queue a job (the manager's spec: LocalSpec in memory); returns its id.
        The in-memory manager starts it at once, in a thread of this process."""
        return self.job_manager.submit(spec)

    def job(self, job_id: str) -> ManagedJob:
        with self._lock:
            kept = self._handles.get(job_id)
        return kept if kept is not None else self.job_manager.job(job_id)

    def jobs(self) -> list[JobView]:
        """Every job that was not deleted, newest first."""
        return self.job_manager.list()

    def cancel(self, job_id: str) -> JobView:
        return self.job_manager.cancel(job_id)

    def delete(self, job_id: str) -> None:
        """Cancel the job if it runs and drop it with its results; a job of this process's
        memory is waited for until it stops."""
        self.job_manager.delete(job_id)
        with self._lock:
            kept = self._handles.get(job_id)
        if kept is not None:
            kept.deleted = True
            kept.ended.wait()

    def watch(self, job_id: str, interval: float | None = None) -> Iterator[JobView]:
        """The job's view now and at every change until it ends (and every `interval`
        seconds), blocking between them."""
        return self.job_manager.watch(job_id, interval)

    def watch_async(self, job_id: str) -> AsyncIterator[JobView]:
        """As `watch`, waiting on the event loop: an idle watcher holds no thread."""
        return self.job_manager.watch_async(job_id)

    def results(self, job_id: str, max_bytes: int = 4 << 20) -> Iterator[ResultPart]:
        """The job's parameters and loss history per submitted template (its placement)."""
        with self._lock:
            kept = self._handles.get(job_id)
        if kept is not None and kept.deleted:
            raise RequestError(f"job {job_id} was deleted: it has no results", field="id")
        return self.job_manager.results(job_id, max_bytes)
