"""The Ray executor: the driver (engine/driver.py) with a runner that submits each partition's
forward and backward task to Ray, as one DAG of ObjectRefs without waiting in between; and
the Ray connection the training runner (engine/ray_training.py) shares. Ray is imported here
and in the training runner only, and both are imported lazily (engine/dispatch.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from graphgrad.engine import _ray_reaper
from graphgrad.engine.allocator import tune_for_speed
from graphgrad.engine.autodiff import RunRequest
from graphgrad.engine.driver import FORWARD, Schedule, TaskSpec, run_schedule, run_task
from graphgrad.engine.errors import CancelledError, GraphError
from graphgrad.engine.executor import Cancellation, LocalExecutor, RunResult, RunStats, TaskStat
from graphgrad.engine.ir import Graph
from graphgrad.engine.lru import LRU
from graphgrad.engine.planner import MAX_PARTITIONS, MIN_PARTITION_S, Plan

log = logging.getLogger("graphgrad.ray")

# Worker side: graphs by fingerprint, so a graph is rebuilt once per worker, not per task.
_GRAPHS: LRU[str, Graph] = LRU(32, 1 << 30, Graph.approx_bytes)


def _graph(fingerprint: str, nodes_ref: list[Any]) -> Graph:
    return _GRAPHS.get_or_make(fingerprint, lambda: Graph(ray.get(nodes_ref[0])))


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Once per worker process: keep numpy's large temporaries on the heap.

    In Ray workers glibc hands every large array a fresh mmap (and page faults it in), which
    made the same numpy code twice as slow; raising the mmap and trim thresholds
    (engine/allocator.py) restores the speed. The in-process client tunes its process the
    same way unless opted out; the server returns memory instead (server/cli.py).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    tune_for_speed()


def _where() -> str:
    return f"node {ray.get_runtime_context().get_node_id()[:8]} pid {os.getpid()}"


# Feeds travel in bundles (see FeedBundles), passed as the first `n_bundles` top-level
# arguments so that Ray resolves them zero-copy; exports or contributions follow.
def _merged(bundles: Sequence[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    return {j: v for bundle in bundles for j, v in bundle.items()}


def _run(fingerprint: str, nodes_ref: list[Any], spec: TaskSpec, n_bundles: int, *args: Any) -> Any:
    tune_allocator()
    feeds = _merged(args[:n_bundles])
    graph = _graph(fingerprint, nodes_ref)
    return run_task(graph, spec, feeds, list(args[n_bundles:]), Cancellation(), _where())


# The same body under two names, so that `ray list tasks` and `ps` tell the phases apart.
@ray.remote(num_returns=2)
def _forward_task(*args: Any) -> Any:
    return _run(*args)


@ray.remote(num_returns=2)
def _backward_task(*args: Any) -> Any:
    return _run(*args)


class FeedBundles:
    """Fed inputs staged into the object store, one object per group of feeds that the same
    partitions read: each `ray.put` costs about a millisecond here, so 36 weight matrices go
    in 8 puts rather than 36, and no task receives feeds of another partition (a backward
    task may receive feeds its forward read and it does not). Bundles are put when the
    first task that reads them is submitted, so staging overlaps running."""

    def __init__(self, specs: Sequence[TaskSpec], feeds: dict[int, np.ndarray]) -> None:
        readers: dict[int, set[int]] = {}
        for s in specs:
            for j in s.feeds:
                readers.setdefault(j, set()).add(s.index)
        groups: dict[frozenset[int], list[int]] = {}
        for j, parts in readers.items():
            groups.setdefault(frozenset(parts), []).append(j)
        self._group_of = {j: key for key, members in groups.items() for j in members}
        self._groups = groups
        self._feeds = feeds
        self._refs: dict[frozenset[int], Any] = {}

    def refs(self, feeds: Sequence[int]) -> list[Any]:
        """The bundle refs holding `feeds`, putting those not staged yet."""
        keys = list(dict.fromkeys(self._group_of[j] for j in feeds))
        for key in keys:
            if key not in self._refs:
                self._refs[key] = ray.put({j: self._feeds[j] for j in self._groups[key]})
        return [self._refs[key] for key in keys]


class RayExecutor:
    """Runs partitioned graphs on Ray: the embedded local Ray by default, or a cluster."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        min_partition_seconds: float = MIN_PARTITION_S,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.min_partition_seconds = min_partition_seconds
        self._lock = threading.Lock()
        # (ref, estimated bytes): the object store holds each graph's nodes once.
        self._nodes_refs: LRU[str, tuple[Any, int]] = LRU(64, 1 << 30, lambda v: v[1])
        self._cpus, self._cpus_at = 1, -1e9
        self._reaper: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or join) Ray; safe to call many times and from several threads."""
        with self._lock:
            if ray.is_initialized():
                return
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, **kwargs)
            else:
                # A new embedded Ray, never some other cluster that happens to run here; it is
                # this machine's alone, so it listens on loopback only.
                before = _ray_reaper.children(os.getpid())
                ray.init(
                    address="local", num_cpus=self.num_cpus, _node_ip_address="127.0.0.1", **kwargs
                )
                started = _ray_reaper.children(os.getpid()) - before
                if started:
                    self._reaper = _start_reaper(started)
            log.info("ray ready: %s", ray.cluster_resources())

    def started(self) -> bool:
        return bool(ray.is_initialized())

    def cpus(self) -> int:
        """CPUs in the cluster (asked of Ray at most every few seconds: it is a GCS call)."""
        self.start()
        now = time.monotonic()
        if now - self._cpus_at > 5.0:
            self._cpus = int(ray.cluster_resources().get("CPU", 1))
            self._cpus_at = now
        return self._cpus

    def info(self) -> tuple[str, dict[str, float]]:
        if not ray.is_initialized():
            return "", {}
        return str(ray.get_runtime_context().gcs_address), dict(ray.cluster_resources())

    def nodes_ref(self, graph: Graph) -> list[Any]:
        ref, _ = self._nodes_refs.get_or_make(
            graph.fingerprint, lambda: (ray.put(list(graph.nodes)), graph.approx_bytes())
        )
        return [ref]  # nested, so tasks receive the ref and fetch it only on a cache miss

    def plan(
        self,
        graph: Graph,
        request: RunRequest,
        cancel: Cancellation | None = None,
        max_partitions: int = MAX_PARTITIONS,
    ) -> tuple[Plan, Schedule]:
        """The schedule the local executor makes over the same partitions (one cache holds
        both: a local run partitioned like a Ray run is the same schedule); at most
        `max_partitions` of them (the auto policy's choice, engine/simulator.py)."""
        executor = LocalExecutor(self.min_partition_seconds, max_partitions)
        return executor.plan(graph, request, cancel)

    def run(
        self,
        graph: Graph,
        request: RunRequest,
        cancel: Cancellation | None = None,
        max_partitions: int = MAX_PARTITIONS,
    ) -> RunResult:
        cancel = cancel or Cancellation()
        self.start()
        t0 = time.time()
        _, sched = self.plan(graph, request, cancel, max_partitions)
        try:
            out = run_schedule(graph, sched, request, _RayRunner(self), cancel)
        except RayTaskError as e:
            raise unwrap_task_error(e) from None
        except RayError as e:
            raise GraphError(f"the Ray task failed: {e}") from e
        tasks = tuple(
            TaskStat(s.partition, s.phase, m.start, m.end, m.where, m.bytes_in, m.bytes_out)
            for s, m in out.tasks
        )
        moved = sum(t.bytes_out for t in tasks)
        return RunResult(
            out.values,
            out.grads,
            RunStats(self.name, time.time() - t0, len(sched.plan.partitions), moved, tasks),
        )

    @staticmethod
    def _wait(wanted: list[Any], every: list[Any], cancel: Cancellation) -> None:
        pending = wanted
        try:
            while pending:
                cancel.check()
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.05)
        except CancelledError:
            cancel_all(every)
            raise


class _RayRunner:
    """Submits each task to Ray with its upstream tasks' ObjectRefs (Ray passes it the values
    once they exist); fed inputs are staged in bundles as the tasks reading them go."""

    name = "ray"

    def __init__(self, executor: RayExecutor) -> None:
        self._executor = executor
        self._refs: list[Any] = []

    def begin(self, schedule: Schedule, feeds: dict[int, np.ndarray], cancel: Cancellation) -> None:
        self._fp = schedule.graph.fingerprint
        self._nodes = self._executor.nodes_ref(schedule.graph)
        self._bundles = FeedBundles(schedule.tasks[:-1], feeds)

    def submit(self, spec: TaskSpec, upstream: Sequence[Any]) -> tuple[Any, Any]:
        fed = self._bundles.refs(spec.feeds)
        task = _forward_task if spec.phase == FORWARD else _backward_task
        exports, meta = task.remote(self._fp, self._nodes, spec, len(fed), *fed, *upstream)
        self._refs += [exports, meta]
        return exports, meta

    def gather(self, handles: Sequence[Any], cancel: Cancellation) -> list[Any]:
        RayExecutor._wait(list({id(h): h for h in handles}.values()), self._refs, cancel)
        return list(ray.get(list(handles)))


def _start_reaper(ray_pids: set[int]) -> subprocess.Popen[bytes]:
    """The watchdog that kills the embedded Ray's processes once this process is gone, even
    by SIGKILL (see _ray_reaper). Its stdin is a pipe only this process holds (Python's fds
    are not inherited), so its end of file is this process's exit. A session of its own, so
    a terminal's signals reach the server and not it."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", _ray_reaper.__file__, *_ray_reaper.tagged(ray_pids)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def cancel_all(refs: Sequence[Any]) -> None:
    """Cancel the tasks behind `refs` (and what they spawned); finished ones are skipped."""
    for ref in refs:
        with contextlib.suppress(RayError, TypeError, ValueError):
            ray.cancel(ref, recursive=True)


def unwrap_task_error(e: RayTaskError) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, GraphError):
        return cause
    if isinstance(e, TaskCancelledError):
        return CancelledError("the run was cancelled")
    return GraphError(f"a Ray task failed: {cause or e}")
