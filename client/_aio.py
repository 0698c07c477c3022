"""What both clients share: `run` and `prepare` over each client's own `_prepared_run`, and the
awaitable twins of the blocking SDK calls, usable from a notebook's running event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphgrad._job_display import plot_history
from graphgrad._prepared import Prepared, RunShapes, RunSpec, Seeds, run_spec
from graphgrad._request import NodeRef
from graphgrad._result import Result


class AsyncClient:
    """Mixed into both clients: `await client.run_async(...)` and friends, and the docs of
    what both clients do alike (methods without a docstring inherit these, in `help()`)."""

    _run_shapes: RunShapes  # each client makes its own in __init__

    def run(
        self,
        outputs: NodeRef | Sequence[NodeRef],
        feeds: Mapping[NodeRef, Any] | None = None,
        wrt: NodeRef | Sequence[NodeRef] | None = (),
        grad_outputs: Mapping[NodeRef, Any] | None = None,
        *,
        executor: str = "auto",
        check_numerics: bool = False,
        exact: bool = False,
        timeout: float | None = None,
    ) -> Result:
        """Values of `outputs` and, for each node of `wrt`, the gradient of the outputs with
        respect to it: `res.value`/`res.values[name]`, `res.grads[name]`, `res.stats`.

        outputs: a node (or its name) or a list of them. feeds: input node (or name) -> array.
        wrt: the nodes to differentiate with respect to (inputs, constants or any node).
        grad_outputs: output -> seed cotangent, needed for each non-scalar output that is
        differentiated (a scalar output is seeded with 1). executor: "auto", "local" or "ray".
        check_numerics: fail naming the first node that makes a NaN or infinity.
        exact: never stacked with other requests by a server that batches them
        (docs/batching.md), so the results are exactly this request's alone.
        timeout: seconds before the run is cancelled (DEADLINE_EXCEEDED remotely).
        Errors: FeedError (a feed's shape or dtype), RequestError (what is asked),
        ValidationError (the graph), ExecutionError (an op failed, naming its node); from a
        server each is also a RemoteError carrying the gRPC code. A remote client uploads
        the graph once per fingerprint, then runs it by reference.
        """
        # A call shape seen before (same nodes, options) reuses its Prepared.
        key, prepared = None, None
        if grad_outputs is None:
            options = (executor, check_numerics, exact)
            key, prepared = self._run_shapes.find(outputs, wrt, feeds, options)
        if prepared is None:
            spec, seeds = run_spec(
                outputs, wrt, grad_outputs, executor, check_numerics, feeds, exact
            )
            prepared = self._prepared_run(spec, seeds)
            if key is not None:
                self._run_shapes.put(key, prepared)
        return prepared(feeds, timeout=timeout)

    def _prepared_run(self, spec: RunSpec, seeds: Seeds) -> Prepared:
        """The client's Prepared for a spec: how it runs (in process or over the wire)."""
        raise NotImplementedError

    def prepare(
        self,
        outputs: NodeRef | Sequence[NodeRef],
        wrt: NodeRef | Sequence[NodeRef] | None = (),
        grad_outputs: Mapping[NodeRef, Any] | None = None,
        *,
        executor: str = "auto",
        check_numerics: bool = False,
        exact: bool = False,
    ) -> Prepared:
        """A run fixed once and called with feeds: `prepared = client.prepare(L, wrt=["W"])`,
        then `prepared(feeds) -> Result` (what `run(L, feeds, wrt=["W"])` returns) as often as
        needed, with less work per call: the graph's registration, the names' checks, the
        plan and (remotely) the request's encoded form are done once, each call sends only
        the feeds. `run` itself is prepare-then-call.

        outputs, wrt, grad_outputs, executor, check_numerics, exact: as for `run`. grad_outputs
        given here are the seeds of every call; a call may pass others for the same outputs
        (`prepared(feeds, grad_outputs={...})`). A call takes `timeout=` in seconds.
        """
        spec, seeds = run_spec(outputs, wrt, grad_outputs, executor, check_numerics, None, exact)
        return self._prepared_run(spec, seeds)

    def _before_thread(self, executor: str) -> None:
        """Work that must happen on the caller's thread (starting Ray) before going off it."""

    async def run_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.run, *args, **kwargs)

    async def explain_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.explain, *args, **kwargs)  # type: ignore[attr-defined]

    async def train_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.train, *args, **kwargs)  # type: ignore[attr-defined]


class AsyncJob:
    """Mixed into both job handles: `await job.wait_async()`, and the results both read alike
    from `_fetch()` (per-network params, the loss history)."""

    def _fetch(self) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        raise NotImplementedError

    @property
    def params(self) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """The trained parameters: a dict of arrays, or a list of them, one per network."""
        params = self._fetch()[0]
        return params[0] if len(params) == 1 else params

    @property
    def history(self) -> np.ndarray:
        """The loss per network and step (networks x steps)."""
        return self._fetch()[1]

    def plot(self, networks: Sequence[int] | None = None, ax: Any = None) -> Any:
        """Loss curves: the median and the 10-90% band across networks, or chosen networks.
        Needs matplotlib (pip install graphgrad[plot])."""
        return plot_history(self.history, networks, ax)

    async def wait_async(self, progress: bool = True, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.wait, progress, timeout)  # type: ignore[attr-defined]
