"""Prometheus metrics of the server (`graphgrad serve --metrics-port`), aggregated across
worker processes with prometheus_client's multiprocess mode.

Off unless enabled: every hook below is then a no-op costing one check, so the request path
pays nothing on a server nobody scrapes. On, every process writes its samples to files in
one directory (named by METRICS_DIR_ENV, which worker processes inherit) and the process that
serves /metrics reads them all on each scrape.

Who calls what:
- the process that owns the metrics port (the server, or the supervisor of `--workers`):
  `start(host, port)` makes the directory, sets the environment its children inherit, and
  serves /metrics; `Endpoint.port` is the port chosen (with port 0), `close()` removes it all;
- a worker process started by it: `start(...)` too, which finds the inherited directory and
  only writes there; `port()` is the port its parent serves;
- the supervisor, when a worker exits: `process_exited(pid)` drops that worker's live gauges.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from graphgrad.engine.lru import CacheStats

log = logging.getLogger("graphgrad.server")
METRICS_DIR_ENV = "GRAPHGRAD_METRICS_DIR"  # set by the process serving /metrics
METRICS_PORT_ENV = "GRAPHGRAD_METRICS_PORT"
# Gradients take from tens of microseconds to minutes.
LATENCY_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SAMPLE_SECONDS = 1.0  # how often each process samples its gauges (caches, queues, jobs)


@dataclass(frozen=True)
class _Metrics:
    requests: Any
    latency: Any
    request_bytes: Any
    response_bytes: Any
    rejections: Any
    batch_size: Any
    calls_active: Any
    calls_queued: Any
    cache_entries: Any
    cache_bytes: Any
    jobs: Any
    training_steps: Any

    @classmethod
    def create(cls) -> _Metrics:
        from prometheus_client import Counter, Gauge, Histogram

        # Not registered in a registry: in multiprocess mode the files are what is read.
        def live_sum(name: str, doc: str, label: str) -> Gauge:
            return Gauge(name, doc, [label], registry=None, multiprocess_mode="livesum")

        return cls(
            requests=Counter(
                "graphgrad_requests",
                "Requests answered, by method and gRPC status code",
                ["method", "code"],
                registry=None,
            ),
            latency=Histogram(
                "graphgrad_request_seconds",
                "Time from a request's arrival to its answer (queueing included), by method",
                ["method"],
                buckets=LATENCY_BUCKETS,
                registry=None,
            ),
            request_bytes=Counter(
                "graphgrad_request_bytes",
                "Bytes of requests received, by method",
                ["method"],
                registry=None,
            ),
            response_bytes=Counter(
                "graphgrad_response_bytes",
                "Bytes of responses sent (every message of a stream), by method",
                ["method"],
                registry=None,
            ),
            rejections=Counter(
                "graphgrad_rejections",
                "Requests answered RESOURCE_EXHAUSTED, by the limit they met",
                ["limit"],
                registry=None,
            ),
            batch_size=Histogram(
                "graphgrad_batch_size",
                "Run requests executed together in one stacked batch (2 or more)",
                buckets=BATCH_BUCKETS,
                registry=None,
            ),
            calls_active=live_sum(
                "graphgrad_admitted_calls",
                "Calls holding a slot of an admission limit (max_concurrent_runs, max_streams)",
                "limit",
            ),
            calls_queued=live_sum(
                "graphgrad_queued_calls",
                "Calls waiting for a slot of an admission limit (the run queue's depth)",
                "limit",
            ),
            cache_entries=live_sum(
                "graphgrad_cache_entries", "Entries of the server's caches, by cache", "cache"
            ),
            cache_bytes=live_sum(
                "graphgrad_cache_bytes", "Estimated bytes of the server's caches, by cache", "cache"
            ),
            jobs=Gauge(
                "graphgrad_jobs",
                "Jobs in the job store, by state",
                ["state"],
                registry=None,
                multiprocess_mode="mostrecent",  # every worker reads the same store
            ),
            training_steps=Counter(
                "graphgrad_training_steps",
                "Training steps done by jobs (every network of a job takes each step)",
                registry=None,
            ),
        )


_on: _Metrics | None = None


def enabled() -> bool:
    return _on is not None


def _enable(directory: str) -> None:
    global _on
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    # prometheus_client picks how values are stored when it is first imported, from this
    # variable; it may have been imported before the variable was set.
    values.ValueClass = values.get_value_class()
    _on = _Metrics.create()


@dataclass
class Endpoint:
    """The HTTP endpoint serving /metrics, and the directory it reads."""

    port: int
    directory: str
    _httpd: Any

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


def start(host: str, port: int | None, worker: bool = False) -> Endpoint | None:
    """Turn metrics on for this process. In a `worker` started by a process that serves them
    (METRICS_DIR_ENV set by it): write where it reads, serve nothing. Otherwise, with a
    `port` (0: a free one), serve /metrics on `host` from a fresh directory, whatever the
    environment says (only a supervisor's workers inherit). Raises OSError when the port
    cannot be had."""
    inherited = os.environ.get(METRICS_DIR_ENV)
    if worker and inherited:
        _enable(inherited)
        return None
    for name in (METRICS_DIR_ENV, METRICS_PORT_ENV):  # not ours: no child may inherit them
        os.environ.pop(name, None)
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    directory = tempfile.mkdtemp(prefix="graphgrad-metrics-")
    try:
        _enable(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        httpd, _ = start_http_server(port, host, registry)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    os.environ[METRICS_DIR_ENV] = directory  # for the worker processes this one starts
    os.environ[METRICS_PORT_ENV] = str(httpd.server_port)
    return Endpoint(httpd.server_port, directory, httpd)


def port() -> int:
    """The port /metrics is served on, by this process or its parent; 0: none."""
    return int(os.environ.get(METRICS_PORT_ENV) or 0) if _on is not None else 0


def process_exited(pid: int) -> None:
    """A worker process has exited: its live gauges no longer count."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if _on is not None and directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)


# Hooks: no-ops while metrics are off.


# Each method's (and status's) series, looked up once: `labels()` takes a lock each time,
# and this runs for every request. Two threads may both look one up: the same series.
_by_method: dict[str, tuple[Any, Any, Any]] = {}
_by_status: dict[tuple[str, str], Any] = {}


def observe_request(
    method: str, code: str, seconds: float, request_bytes: int, response_bytes: int
) -> None:
    if _on is None:
        return
    status = _by_status.get((method, code))
    if status is None:
        status = _by_status[method, code] = _on.requests.labels(method, code)
    series = _by_method.get(method)
    if series is None:
        series = _by_method[method] = (
            _on.latency.labels(method),
            _on.request_bytes.labels(method),
            _on.response_bytes.labels(method),
        )
    status.inc()
    latency, received, sent = series
    latency.observe(seconds)
    received.inc(request_bytes)
    sent.inc(response_bytes)


def observe_rejection(limit: str) -> None:
    if _on is not None:
        _on.rejections.labels(limit).inc()


def observe_batch(size: int) -> None:
    """A dynamic batch of `size` Run requests was executed."""
    if _on is not None:
        _on.batch_size.observe(size)


def add_training_steps(steps: int) -> None:
    if _on is not None and steps > 0:
        _on.training_steps.inc(steps)


def set_admission(limit: str, active: int, queued: int) -> None:
    if _on is not None:
        _on.calls_active.labels(limit).set(active)
        _on.calls_queued.labels(limit).set(queued)


def set_caches(caches: Mapping[str, CacheStats]) -> None:
    if _on is not None:
        for name, stats in caches.items():
            _on.cache_entries.labels(name).set(stats.entries)
            _on.cache_bytes.labels(name).set(stats.bytes)


def set_jobs(counts: Mapping[str, int], states: Iterable[str]) -> None:
    """Jobs by state; every one of `states` is set (0 when absent), so none goes stale."""
    if _on is not None:
        for state in states:
            _on.jobs.labels(state).set(counts.get(state, 0))


class Sampler:
    """Calls `sample` every SAMPLE_SECONDS on a daemon thread while metrics are on: the
    gauges that are states (caches, queues, jobs) rather than events."""

    def __init__(self, sample: Callable[[], None], seconds: float = SAMPLE_SECONDS) -> None:
        self._stop = threading.Event()
        self._sample, self._seconds = sample, seconds
        self._thread: threading.Thread | None = None
        if _on is not None:
            self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self._sample()
            except Exception:  # a sample that fails (a busy store) is tried again next time
                log.exception("metrics: a sample failed")
            if self._stop.wait(self._seconds):
                return

    def stop(self) -> None:
        self._stop.set()
