"""Awaitable twins of the blocking SDK calls, usable from a notebook's running event loop."""

from __future__ import annotations

import asyncio
from typing import Any


class AsyncClient:
    """Mixed into both clients: `await client.run_async(...)` and friends."""

    def _before_thread(self, executor: str) -> None:
        """Work that must happen on the caller's thread (starting Ray) before going off it."""

    async def run_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.run, *args, **kwargs)  # type: ignore[attr-defined]

    async def explain_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.explain, *args, **kwargs)  # type: ignore[attr-defined]

    async def train_async(self, *args: Any, **kwargs: Any) -> Any:
        self._before_thread(kwargs.get("executor", "auto"))
        return await asyncio.to_thread(self.train, *args, **kwargs)  # type: ignore[attr-defined]


class AsyncJob:
    """Mixed into both job handles: `await job.wait_async()`."""

    async def wait_async(self, progress: bool = True, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.wait, progress, timeout)  # type: ignore[attr-defined]
