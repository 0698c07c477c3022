"""The Ray executor: one forward and one backward task per partition, submitted together as
one DAG of ObjectRefs. This is the only module that imports ray."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from . import _ray_reaper
from .autodiff import (
    RunRequest,
    check_feeds,
    plan_pass,
    seed_cotangents,
)
from .errors import CancelledError, GraphError
from .executor import Cancellation, RunResult, RunStats, TaskStat
from .ir import Graph
from .jobs import SegmentRunner, next_segment
from .lru import LRU
from .planner import MIN_PARTITION_S, Plan, partition
from .tasks import (
    TaskMeta,
    TaskSpec,
    gradient_totals,
    run_backward,
    run_forward,
    task_specs,
    unowned_value,
)
from .training import ChunkState, ChunkTrainer, TrainSpec

log = logging.getLogger("graphgrad.ray")

# Worker side: graphs by fingerprint, so a graph is rebuilt once per worker, not per task.
_GRAPHS: LRU[str, Graph] = LRU(32, 1 << 30, Graph.approx_bytes)


def _graph(fingerprint: str, nodes_ref: list[Any]) -> Graph:
    return _GRAPHS.get_or_make(fingerprint, lambda: Graph(ray.get(nodes_ref[0])))


_ALLOCATOR_TUNED = False


def _tune_allocator() -> None:
    """Once per worker process: keep numpy's large temporaries on the heap.

    In Ray workers glibc hands every large array a fresh mmap (and page faults it in), which
    made the same numpy code twice as slow as in the driver; raising the mmap and trim
    thresholds restores driver speed. Workers only: the server keeps glibc's defaults.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def _where() -> str:
    return f"node {ray.get_runtime_context().get_node_id()[:8]} pid {os.getpid()}"


# Feeds travel in bundles (see FeedBundles), passed as the first `n_bundles` top-level
# arguments so that Ray resolves them zero-copy; exports or contributions follow.
def _merged(bundles: Sequence[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    return {j: v for bundle in bundles for j, v in bundle.items()}


@ray.remote(num_returns=3)
def _forward_task(
    fingerprint: str, nodes_ref: list[Any], spec: TaskSpec, n_bundles: int, *args: Any
) -> Any:
    _tune_allocator()
    feeds = _merged(args[:n_bundles])
    graph = _graph(fingerprint, nodes_ref)
    return run_forward(graph, spec, feeds, list(args[n_bundles:]), _where())


@ray.remote(num_returns=4)
def _backward_task(
    fingerprint: str,
    nodes_ref: list[Any],
    spec: TaskSpec,
    saved: dict[int, np.ndarray],
    seeds: dict[int, np.ndarray],
    n_bundles: int,
    *args: Any,
) -> Any:
    _tune_allocator()
    values = {**saved, **_merged(args[:n_bundles])}
    graph = _graph(fingerprint, nodes_ref)
    return run_backward(graph, spec, values, seeds, list(args[n_bundles:]), _where())


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


@ray.remote
def _train_segment(spec: TrainSpec, state: ChunkState, until: int) -> tuple[ChunkState, float]:
    _tune_allocator()
    start = time.perf_counter()
    done = ChunkTrainer(spec).run(state.writable(), until)
    return done, time.perf_counter() - start


class RaySegmentRunner(SegmentRunner):
    """Each chunk as a chain of Ray tasks, one segment in flight per chunk: no barrier between
    chunks, progress as each segment finishes. Segments grow (see `next_segment`) until each
    lasts about SEGMENT_SECONDS, so Ray's cost per task is lost in them. A killed worker
    costs a retry (segments are deterministic)."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor = executor

    def train(
        self,
        chunks: Sequence[TrainSpec],
        states: list[ChunkState],
        steps: int,
        segment: int,
        cancel: Cancellation,
        on_segment: Callable[[], None],
    ) -> None:
        self.executor.start()
        spec_refs = [ray.put(spec) for spec in chunks]
        lengths = [segment] * len(chunks)
        owner: dict[Any, int] = {}

        def submit(k: int) -> None:
            until = min(steps, states[k].step + lengths[k])
            owner[_train_segment.remote(spec_refs[k], states[k], until)] = k

        for k in range(len(chunks)):
            if states[k].step < steps:
                submit(k)
        try:
            while owner:
                cancel.check()
                ready, _ = ray.wait(list(owner), num_returns=1, timeout=0.1)
                for ref in ready:
                    k = owner.pop(ref)
                    done, seconds = ray.get(ref)
                    lengths[k] = next_segment(done.step - states[k].step, seconds, lengths[k])
                    done.losses[:0] = states[k].losses  # those not yet taken, then the new
                    states[k] = done
                    if done.step < steps:
                        submit(k)
                if ready:
                    on_segment()
        except CancelledError:
            _cancel_all(list(owner))
            raise
        except RayTaskError as e:
            raise _unwrap(e) from None


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

    def _nodes_ref(self, graph: Graph) -> list[Any]:
        ref, _ = self._nodes_refs.get_or_make(
            graph.fingerprint, lambda: (ray.put(list(graph.nodes)), graph.approx_bytes())
        )
        return [ref]  # nested, so tasks receive the ref and fetch it only on a cache miss

    def plan(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> tuple[Plan, list[TaskSpec]]:
        seeded = tuple(request.grad_outputs or ())
        pass_plan = plan_pass(graph, request.outputs, request.wrt, seeded)

        def make() -> tuple[Plan, list[TaskSpec]]:
            parts = partition(
                graph, pass_plan, min_seconds=self.min_partition_seconds, cancel=cancel
            )
            plan_id = hashlib.sha256(
                repr((graph.fingerprint, request.outputs, request.wrt, seeded)).encode()
            ).hexdigest()[:16]
            seeded_pos = (
                tuple(graph.index[n] for n in seeded)
                if seeded
                else (pass_plan.outputs[:1] if pass_plan.wrt else ())
            )
            return parts, task_specs(graph, pass_plan, parts, seeded_pos, plan_id)

        key = ("ray-plan", request.outputs, request.wrt, seeded, self.min_partition_seconds)
        return graph.memo(key, make)

    def run(
        self, graph: Graph, request: RunRequest, cancel: Cancellation | None = None
    ) -> RunResult:
        cancel = cancel or Cancellation()
        self.start()
        t0 = time.time()
        pass_plan = plan_pass(
            graph, request.outputs, request.wrt, tuple(request.grad_outputs or ())
        )
        feeds = check_feeds(graph, pass_plan, request.feeds)
        seeds = seed_cotangents(graph, pass_plan, request.grad_outputs)
        parts, specs = self.plan(graph, request, cancel)
        fp, nodes_ref = graph.fingerprint, self._nodes_ref(graph)
        bundles = FeedBundles(specs, feeds)

        # Submit the whole DAG: every forward, then every backward, without waiting.
        exports: dict[int, Any] = {}
        saved: dict[int, Any] = {}
        metas: list[tuple[int, str, Any]] = []
        refs: list[Any] = []
        for s in specs:
            fed = bundles.refs(s.feeds)
            e, sv, m = _forward_task.remote(
                fp, nodes_ref, s, len(fed), *fed, *[exports[q] for q in s.upstream]
            )
            exports[s.index], saved[s.index] = e, sv
            metas.append((s.index, "forward", m))
            refs += [e, sv, m]
        to_parts: dict[int, Any] = {}
        to_caller, grad_refs = [], []
        if pass_plan.wrt:
            for s in reversed(specs):
                if not s.has_backward:
                    continue
                mine = {o: seeds[o] for o in s.seeds}
                fed = bundles.refs(s.saved_feeds)
                tp, tc, g, m = _backward_task.remote(
                    fp,
                    nodes_ref,
                    s,
                    saved[s.index],
                    mine,
                    len(fed),
                    *fed,
                    *[to_parts[q] for q in s.downstream if q in to_parts],
                )
                to_parts[s.index] = tp
                to_caller.append(tc)
                grad_refs.append(g)
                metas.append((s.index, "backward", m))
                refs += [tp, tc, g, m]
        del saved  # activations are freed once their backward task has run

        out_refs = {o: exports[parts.owner[o]] for o in pass_plan.outputs if o in parts.owner}
        wanted = list(
            {
                id(r): r
                for r in [*out_refs.values(), *to_caller, *grad_refs, *(m for _, _, m in metas)]
            }.values()
        )
        self._wait(wanted, refs, cancel)
        try:
            values = {
                graph.nodes[o].name: (
                    ray.get(out_refs[o])[o] if o in out_refs else unowned_value(graph, o, feeds)
                )
                for o in pass_plan.outputs
            }
            caller_seeds = {o: v for o, v in seeds.items() if o not in parts.owner}
            owned_totals = {k: v for g in ray.get(grad_refs) for k, v in g.items()}
            grads = gradient_totals(
                graph, pass_plan.wrt, caller_seeds, ray.get(to_caller), owned_totals
            )
            task_metas: list[tuple[int, str, TaskMeta]] = [
                (k, phase, meta)
                for (k, phase, _), meta in zip(
                    metas, ray.get([m for _, _, m in metas]), strict=True
                )
            ]
        except RayTaskError as e:
            raise _unwrap(e) from None
        except RayError as e:
            raise GraphError(f"the Ray task failed: {e}") from e
        t1 = time.time()
        tasks = tuple(
            TaskStat(k, phase, m.start, m.end, m.where, m.bytes_in, m.bytes_out)
            for k, phase, m in task_metas
        )
        moved = sum(t.bytes_out for t in tasks)
        return RunResult(values, grads, RunStats(self.name, t1 - t0, len(specs), moved, tasks))

    @staticmethod
    def _wait(wanted: list[Any], every: list[Any], cancel: Cancellation) -> None:
        pending = wanted
        try:
            while pending:
                cancel.check()
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.05)
        except CancelledError:
            _cancel_all(every)
            raise


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


def _cancel_all(refs: Sequence[Any]) -> None:
    """Cancel the tasks behind `refs` (and what they spawned); finished ones are skipped."""
    for ref in refs:
        with contextlib.suppress(RayError, TypeError, ValueError):
            ray.cancel(ref, recursive=True)


def _unwrap(e: RayTaskError) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, GraphError):
        return cause
    if isinstance(e, TaskCancelledError):
        return CancelledError("the run was cancelled")
    return GraphError(f"a Ray task failed: {cause or e}")
