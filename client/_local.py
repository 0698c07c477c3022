"""The in-process client: the same `run` API as the remote one, on the engine directly."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ._request import Ref, build_request
from ._result import Result
from .engine import Cancellation, Executor, LocalExecutor
from .engine.executor import check_finite


class LocalClient:
    """Runs graphs in this process."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor: Executor = executor or LocalExecutor()

    def __repr__(self) -> str:
        return f"<graphgrad.LocalClient executor={self._executor.name}>"

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
        cancel = Cancellation(deadline=None if timeout is None else time.monotonic() + timeout)
        res = self._executor_for(executor).run(graph, request, cancel)
        if check_numerics:
            check_finite(res, request.feeds)
        return Result(res.values, res.grads, res.stats)

    def _executor_for(self, name: str) -> Executor:
        if name in ("auto", self._executor.name):
            return self._executor
        raise ValueError(
            f"executor '{name}' is not available in this client (it runs '{self._executor.name}')"
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
