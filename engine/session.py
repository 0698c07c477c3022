"""The engine's one data plane (the role KServe's DataPlane plays): run, explain, prepare,
and training jobs with their results by placement. The in-process client and the gRPC
servicers are thin wrappers over a Session: they translate arguments (the servicers with
graphgrad.wire) and call it, nothing more.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.calibration import in_force
from graphgrad.engine.cancel import Cancellation
from graphgrad.engine.dispatch import Dispatcher
from graphgrad.engine.driver import task_source
from graphgrad.engine.errors import CancelledError, RequestError
from graphgrad.engine.executor import RunResult, check_finite
from graphgrad.engine.ir import Graph
from graphgrad.engine.job_reports import JobView, ResultPart, result_parts
from graphgrad.engine.kinds import ExecutorKind, JobStatus
from graphgrad.engine.ops.docs import OpInfo, op_infos
from graphgrad.engine.plan_cache import DerivedCache
from graphgrad.engine.planner import Explanation, describe
from graphgrad.engine.prepared import PreparedKey, PreparedRun
from graphgrad.engine.simulator import Cluster, Prediction, choose_partitions, predict
from graphgrad.engine.training import TrainSpec
from graphgrad.engine.training_run import Placement, TrainingRun, group_specs

# Prepared runs by graph instance, names and options: small, within the plan cache's bounds.
_PREPARED: DerivedCache[PreparedKey, PreparedRun] = DerivedCache("prepared runs")


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


class LocalJob:
    """A training job run in this process, in its own thread."""

    def __init__(
        self, job_id: str, run: TrainingRun, placement: list[Placement], specs: int
    ) -> None:
        self.id, self.run, self.placement, self.templates = job_id, run, placement, specs
        self.created = time.time()
        self.cancel = Cancellation()
        self.status = JobStatus.RUNNING
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.deleted = False
        self.thread = threading.Thread(target=self._work, name=f"job-{job_id}", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            self.run.run(self.cancel)
            self.status = JobStatus.DONE
        except CancelledError:
            self.status = JobStatus.CANCELLED
        except BaseException as e:  # reported through the view and the handle's wait()
            self.error = e
            self.status = JobStatus.FAILED
        finally:
            self.ended.set()

    def view(self) -> JobView:
        error = "" if self.error is None else f"{type(self.error).__name__}: {self.error}"
        return JobView(self.id, self.status, self.run.progress(), error, self.created)

    @property
    def chunks(self) -> list[int]:
        """How many chunks each stacked group of networks was cut into."""
        return list(self.run.layout or [])


class Session:
    """Run, explain and prepare requests, and train jobs, on one Dispatcher (inline or Ray)."""

    def __init__(self, dispatcher: Dispatcher | None = None) -> None:
        self.dispatcher = dispatcher or Dispatcher()
        self._jobs: dict[str, LocalJob] = {}
        self._ids = itertools.count(1)
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
            result = d.local.run_keyed(prepared.graph, prepared.key, request, cancel)
        else:
            result = d.run(prepared.graph, request, executor, cancel)
        if prepared.options.check_numerics:
            check_finite(result, request.feeds)
        prepared.ran(result.stats.wall_time)
        return result

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

    def submit(self, specs: list[TrainSpec], executor: ExecutorKind) -> str:
        """Start training `specs` in a thread of this process; returns the job's id."""
        groups, placement = group_specs(specs)
        runner, cpus = self.dispatcher.training_runner(executor)
        job_id = f"local-{next(self._ids)}"
        job = LocalJob(job_id, TrainingRun(groups, cpus=cpus, runner=runner), placement, len(specs))
        with self._lock:
            self._jobs[job_id] = job
        return job_id

    def job(self, job_id: str) -> LocalJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job '{job_id}' in this session", field="id")
        return job

    def jobs(self) -> list[JobView]:
        with self._lock:
            live = [j for j in self._jobs.values() if not j.deleted]
        return [j.view() for j in live]

    def cancel(self, job_id: str) -> JobView:
        job = self.job(job_id)
        job.cancel.cancel()
        return job.view()

    def delete(self, job_id: str) -> None:
        """Cancel the job if it runs, wait for it to stop, and drop it with its results."""
        job = self.job(job_id)
        job.cancel.cancel()
        job.thread.join()
        job.deleted = True

    def watch(self, job_id: str, interval: float = 0.1) -> Iterator[JobView]:
        """The job's view now, every `interval` seconds while it runs, and once it ends."""
        job = self.job(job_id)
        while not job.ended.wait(interval):
            yield job.view()
        yield job.view()

    def results(self, job_id: str, max_bytes: int = 4 << 20) -> Iterator[ResultPart]:
        """The job's parameters and loss history per submitted template (its placement)."""
        job = self.job(job_id)
        if job.deleted:
            raise RequestError(f"job {job_id} was deleted: it has no results", field="id")
        run = job.run
        history = run.history()

        def rows(lo: int, hi: int) -> np.ndarray:
            return history[lo:hi]

        groups = [g.n for g in run.groups]
        return result_parts(run.params(), job.placement, groups, run.steps, rows, max_bytes)
