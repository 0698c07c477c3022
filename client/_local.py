"""The in-process client: the same `run` API as the remote one, on the engine directly."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphgrad._aio import AsyncClient
from graphgrad._builder import Tensor
from graphgrad._local_job import Job
from graphgrad._plan_view import PlanView
from graphgrad._prepared import Prepared, RunShapes, RunSpec, Seeds
from graphgrad._request import NodeRef, build_request
from graphgrad._result import Result
from graphgrad._train_specs import ArrayMap, build_specs
from graphgrad.engine import (
    SGD,
    Cancellation,
    Dispatcher,
    ExecutorKind,
    JobView,
    OpInfo,
    Optimizer,
    RunRequest,
    Session,
    cluster_from,
    load_for_client,
    tune_unless_opted_out,
)


class LocalClient(AsyncClient):
    """Runs graphs in this process: inline, or on Ray with `executor="ray"`.

    It tunes this process's malloc as graphgrad's Ray workers are tuned (large numpy
    temporaries reuse the heap instead of being page-faulted in anew by every run;
    engine/allocator.py), unless $GRAPHGRAD_TUNE_MALLOC is 0."""

    def __init__(
        self,
        *,
        ray_address: str | None = None,
        ray_num_cpus: int | None = None,
        calibration: str | Path | None = None,
    ) -> None:
        tune_unless_opted_out()
        cal = load_for_client(calibration)
        self.session = Session(
            Dispatcher(ray_address=ray_address, ray_num_cpus=ray_num_cpus, calibration=cal)
        )
        self._run_shapes = RunShapes()

    def __repr__(self) -> str:
        return "<graphgrad.LocalClient in-process>"

    def _repr_html_(self) -> str:
        ray = "not started (starts on the first executor='ray' run)"
        info = self.session.ray_info()
        if info is not None:
            address, resources = info
            ray = f"{address}, {', '.join(f'{k}: {v:g}' for k, v in sorted(resources.items()))}"
        return f"<div><b>graphgrad</b> in-process client<br/>Ray: {html.escape(ray)}</div>"

    def _before_thread(self, executor: str) -> None:
        self.session.start_for(ExecutorKind.parse(executor))

    def _prepared_run(self, spec: RunSpec, seeds: Seeds) -> Prepared:
        request = RunRequest(spec.outputs, {}, spec.wrt, seeds)
        prepared = self.session.prepare(spec.graph, request, spec.options)

        def runner(feeds: dict[str, np.ndarray], seeds: Seeds, timeout: float | None) -> Result:
            cancel = Cancellation.within(timeout)
            res = self.session.run_prepared(prepared, feeds, seeds, cancel)
            return Result(res.values, res.grads, res.stats)

        return Prepared(spec, seeds, runner)

    def explain(
        self,
        outputs: NodeRef | Sequence[NodeRef],
        wrt: NodeRef | Sequence[NodeRef] | None = (),
        *,
        executor: str = "auto",
        cpus: int | None = None,
        nodes: int | None = None,
        cpus_per_node: int | None = None,
        network_bytes_per_s: float | None = None,
    ) -> PlanView:
        """How `run(outputs, wrt=wrt)` would execute: partitions, their costs, the cuts.
        Given `cpus` (one machine) or `nodes` and `cpus_per_node`, also the predicted run
        on that cluster (`.prediction`: makespan, speedup, critical path, what bounds it)."""
        cluster = cluster_from(cpus, nodes, cpus_per_node, network_bytes_per_s, "explain")
        _, graph, request = build_request(outputs, None, wrt, None)
        explained = self.session.plan(graph, request, ExecutorKind.parse(executor), cluster)
        return PlanView(explained.explanation, graph, explained.source, explained.prediction)

    def train(
        self,
        loss: Tensor | Sequence[Tensor],
        params: ArrayMap | Sequence[ArrayMap],
        data: ArrayMap | Sequence[ArrayMap] | None = None,
        optimizer: Optimizer | None = None,
        steps: int = 200,
        batch_size: int | None = None,
        seed: int = 0,
        *,
        executor: str = "auto",
    ) -> Job:
        """Train N networks at once: `params` maps each trainable input to its N initial
        values stacked on a new leading axis; `data` maps each data input to [N, S, ...]
        (each network its own samples) or [S, ...] (shared). Returns a running Job."""
        kind = ExecutorKind.parse(executor, field="executor")
        specs = build_specs(loss, params, data, optimizer or SGD(lr=0.1), steps, batch_size, seed)
        return Job(self.session, self.session.submit((specs, kind)), len(specs))

    def jobs(self) -> list[JobView]:
        """Every job of this client that was not deleted."""
        return self.session.jobs()

    def list_ops(self) -> list[OpInfo]:
        """The ops this process can run: name, signature with named arguments, doc, attributes
        (what a server's ListOps gives)."""
        return self.session.ops()

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
