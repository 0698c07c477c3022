"""The in-process client: the same `run` API as the remote one, on the engine directly."""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping, Sequence
from typing import Any

from ._aio import AsyncClient
from ._builder import Tensor
from ._jobs import ArrayMap, Job, build_specs, start_job
from ._plan import Plan
from ._request import Ref, build_request
from ._result import Result
from .engine import Cancellation, RunRequest
from .engine.dispatch import Dispatcher
from .engine.driver import task_source
from .engine.executor import check_finite
from .engine.ops.docs import OpInfo, op_infos
from .engine.planner import describe
from .engine.simulator import cluster_from, predict
from .engine.training import SGD, Optimizer


class LocalClient(AsyncClient):
    """Runs graphs in this process: inline, or on Ray with `executor="ray"`."""

    def __init__(self, *, ray_address: str | None = None, ray_num_cpus: int | None = None) -> None:
        self._dispatcher = Dispatcher(ray_address=ray_address, ray_num_cpus=ray_num_cpus)
        self._jobs = 0

    def __repr__(self) -> str:
        return "<graphgrad.LocalClient in-process>"

    def _repr_html_(self) -> str:
        ray = "not started (starts on the first executor='ray' run)"
        if self._dispatcher.ray_ready():
            address, resources = self._dispatcher.ray.info()
            ray = f"{address}, {', '.join(f'{k}: {v:g}' for k, v in sorted(resources.items()))}"
        return f"<div><b>graphgrad</b> in-process client<br/>Ray: {html.escape(ray)}</div>"

    def _before_thread(self, executor: str) -> None:
        if executor == "ray":  # Ray must start on the caller's (main) thread
            self._dispatcher.ray.start()

    def run(
        self,
        outputs: Ref | Sequence[Ref],
        feeds: Mapping[Ref, Any] | None = None,
        wrt: Ref | Sequence[Ref] | None = (),
        grad_outputs: Mapping[Ref, Any] | None = None,
        *,
        executor: str = "auto",
        check_numerics: bool = False,
        timeout: float | None = None,
    ) -> Result:
        _, graph, request = build_request(outputs, feeds, wrt, grad_outputs)
        cancel = Cancellation.within(timeout)
        res = self._dispatcher.run(graph, request, executor, cancel)
        if check_numerics:
            check_finite(res, request.feeds)
        return Result(res.values, res.grads, res.stats)

    def explain(
        self,
        outputs: Ref | Sequence[Ref],
        wrt: Ref | Sequence[Ref] | None = (),
        *,
        executor: str = "auto",
        cpus: int | None = None,
        nodes: int | None = None,
        cpus_per_node: int | None = None,
        network_bytes_per_s: float | None = None,
    ) -> Plan:
        """How `run(outputs, wrt=wrt)` would execute: partitions, their costs, the cuts.
        Given `cpus` (one machine) or `nodes` and `cpus_per_node`, also the predicted run
        on that cluster (`.prediction`: makespan, speedup, critical path, what bounds it)."""
        cluster = cluster_from(cpus, nodes, cpus_per_node, network_bytes_per_s, "explain")
        _, graph, request = build_request(outputs, None, wrt, None)
        name, plan = self._dispatcher.choose(
            graph, RunRequest(request.outputs, {}, request.wrt), executor
        )
        _, sched = self._dispatcher.executor(name).plan(
            graph, RunRequest(request.outputs, {}, request.wrt)
        )
        run = RunRequest(request.outputs, {}, request.wrt)
        prediction = None if cluster is None else predict(graph, run, cluster)
        return Plan(
            describe(graph, name, plan), graph, functools.partial(task_source, sched), prediction
        )

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
        specs = build_specs(loss, params, data, optimizer or SGD(lr=0.1), steps, batch_size, seed)
        runner, cpus = self._dispatcher.training_runner(executor)
        self._jobs += 1
        return start_job(specs, runner, cpus, f"local-{self._jobs}")

    def list_ops(self) -> list[OpInfo]:
        """The ops this process can run: name, signature with named arguments, doc, attributes
        (what a server's ListOps gives)."""
        return op_infos()

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
