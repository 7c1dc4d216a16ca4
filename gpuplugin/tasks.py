"""Long-lived coroutines, started through one guarded helper so that none dies silently or outlives its owner."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("gpuplugin.tasks")


class TaskSet:
    """Owns background tasks: logs any that fails or ends while it should run, and cancels all on close."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, expect_end: bool = False) -> asyncio.Task[Any]:
        """Start ``coro``; unless ``expect_end``, its ending on its own is logged as an error."""
        if self._closing:
            coro.close()
            raise RuntimeError(f"{self._owner} is closing; cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, expect_end))
        return task

    def _done(self, task: asyncio.Task[Any], expect_end: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is not None:
            log.error("task failed", task=task.get_name(), exc_info=exc)
        elif not expect_end:
            log.error("task ended unexpectedly", task=task.get_name())

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them to finish."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
