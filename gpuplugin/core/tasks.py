"""Long-lived coroutines, started through one guarded helper so that none dies silently or outlives its owner.

A supervised task (``TaskSet.supervise``) that fails, or ends while it should run, is started again after a
jittered exponential backoff. One ``Supervisor`` per process counts the restarts of each task (for metrics) and
notices a task that keeps failing: ``/healthz`` names it and, after a grace period, the daemon exits non-zero so
that the kubelet restarts the pod. Task sets find that supervisor through ``supervising``, so that backends and
resource servers need no extra constructor argument for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog

from gpuplugin.core.clock import REAL_CLOCK, Clock, jittered_backoff

log = structlog.get_logger("gpuplugin.core.tasks")


@dataclass(frozen=True, slots=True)
class SupervisionSettings:
    """How failed long-lived tasks are restarted, and when one counts as failing for good."""

    first_backoff_s: float = 0.1
    """Seconds before the first restart of a failed task (0.001 to 60); doubles with each failure in the window, up
    to ``max_backoff_s``, jittered. Short: most failures are a moment's (a directory swapped, a socket reset)."""
    max_backoff_s: float = 30.0
    """Seconds, the longest wait between two restarts (``first_backoff_s`` to 3600)."""
    failure_budget: int = 5
    """Failures within ``failure_window_s`` that make a task failing (1 to 1000): ``/healthz`` then answers 503
    naming it. Five in a minute is past any transient cause we know of."""
    failure_window_s: float = 60.0
    """Seconds over which failures count towards ``failure_budget`` (1 to 86400)."""
    exit_grace_s: float = 30.0
    """Seconds from a task turning failing to the process exiting non-zero (0 to 3600), unless the task has run
    since without failing again. Long enough for a liveness probe to see the 503 and for the logs to be shipped."""

    def __post_init__(self) -> None:
        checks = (
            ("first_backoff_s", self.first_backoff_s, 0.001, 60.0),
            ("max_backoff_s", self.max_backoff_s, self.first_backoff_s, 3600.0),
            ("failure_budget", self.failure_budget, 1, 1000),
            ("failure_window_s", self.failure_window_s, 1.0, 86400.0),
            ("exit_grace_s", self.exit_grace_s, 0.0, 3600.0),
        )
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"supervision.{name}: must be from {low:g} to {high:g}, got {value!r}")


class TaskFailing(Exception):
    """A supervised task kept failing past its budget and grace period; only a process restart may help."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(f"task {task} keeps failing ({reason}); exiting so that the kubelet restarts the plugin")
        self.task = task
        self.reason = reason


@dataclass(slots=True)
class _Record:
    """One supervised task's history."""

    failures: deque[float]
    alive: int = 0
    """Supervised loops of this name (a registration started afresh may overlap the one it replaces)."""
    running: bool = False
    failing_since: float | None = None
    failed_since_marked: bool = False
    last_error: str = ""


class Supervisor:
    """Counts restarts per task and decides when a task keeps failing; one per process (the daemon's)."""

    def __init__(
        self,
        settings: SupervisionSettings = SupervisionSettings(),
        *,
        on_give_up: Callable[[TaskFailing], None] | None = None,
        clock: Clock = REAL_CLOCK,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """``on_give_up`` hears of a task still failing when its grace period ends; without it, nothing ends.
        ``clock``: what the failure window reads, and restart backoffs and grace periods wait on."""
        self.settings = settings
        self._on_give_up = on_give_up
        self.clock = clock
        self._rng = rng
        self._records: dict[str, _Record] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self.restarts: Counter[str] = Counter()
        """Restarts per task name (``owner:name``), every supervised task listed from its start."""

    def failing(self) -> dict[str, str]:
        """The tasks that keep failing, each with why (its failures and last error)."""
        return {
            name: f"{len(r.failures)} failures in {self.settings.failure_window_s:g} s, last: {r.last_error}"
            for name, r in sorted(self._records.items())
            if r.failing_since is not None
        }

    def started(self, name: str) -> None:
        record = self._record(name)
        record.alive += 1
        record.running = True
        self.restarts[name] += 0

    def ended(self, name: str) -> None:
        """A supervised loop of ``name`` ended (its owner cancelled or closed it): a task gone fails no more."""
        record = self._record(name)
        record.alive -= 1
        if record.alive > 0:
            return
        record.running = False
        if record.failing_since is not None:
            record.failing_since = None
            record.failures.clear()
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.cancel()

    def restarted(self, name: str) -> None:
        self._record(name).running = True
        self.restarts[name] += 1

    def failed(self, name: str, error: str) -> float:
        """Count a failure (or an unexpected end) of ``name``; returns the seconds to wait before its restart."""
        record = self._record(name)
        now = self.clock.monotonic()
        record.running = False
        record.last_error = error
        record.failures.append(now)
        while record.failures and record.failures[0] <= now - self.settings.failure_window_s:
            record.failures.popleft()
        if record.failing_since is not None:
            record.failed_since_marked = True
        elif len(record.failures) >= self.settings.failure_budget:
            record.failing_since = now
            record.failed_since_marked = False
            log.error(
                "task keeps failing",
                task=name,
                failures=len(record.failures),
                window_s=self.settings.failure_window_s,
                last_error=error,
                exit_in_s=self.settings.exit_grace_s if self._on_give_up is not None else None,
            )
            if self._on_give_up is not None:
                grace = self._grace_over(name)
                self._timers[name] = asyncio.get_running_loop().create_task(grace, name=f"grace period of {name}")
        s = self.settings
        return jittered_backoff(len(record.failures), s.first_backoff_s, s.max_backoff_s, self._rng)

    async def _grace_over(self, name: str) -> None:
        await self.clock.sleep(self.settings.exit_grace_s)
        self._timers.pop(name, None)
        record = self._records[name]
        if record.running and not record.failed_since_marked:
            # It has run since it was marked without failing again: it recovered.
            record.failing_since = None
            record.failures.clear()
            log.info("task recovered", task=name)
            return
        assert self._on_give_up is not None
        self._on_give_up(TaskFailing(name, self.failing()[name]))

    def _record(self, name: str) -> _Record:
        record = self._records.get(name)
        if record is None:
            record = self._records[name] = _Record(deque())
        return record

    def close(self) -> None:
        """Cancel the pending grace periods (the process is stopping anyway); they end within a loop turn."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


_current: ContextVar[Supervisor | None] = ContextVar("gpuplugin_supervisor", default=None)


@contextlib.contextmanager
def supervising(supervisor: Supervisor) -> Iterator[Supervisor]:
    """Within the block (and the tasks started in it), task sets without their own supervisor report to this one."""
    token = _current.set(supervisor)
    try:
        yield supervisor
    finally:
        _current.reset(token)


class TaskSet:
    """Owns background tasks: logs any that fails or ends while it should run, restarts the supervised ones, and
    cancels all on close."""

    def __init__(self, owner: str, supervisor: Supervisor | None = None) -> None:
        """``supervisor``: where supervised tasks report; by default the one ``supervising`` set when they start,
        else one of this set's own (which logs a task that keeps failing, and ends nothing)."""
        self._owner = owner
        self._supervisor = supervisor
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, expect_end: bool = False) -> asyncio.Task[Any]:
        """Start ``coro`` once; unless ``expect_end``, its ending on its own is logged as an error."""
        if self._closing:
            coro.close()
            raise RuntimeError(f"{self._owner} is closing; cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, expect_end))
        return task

    def supervise(
        self, start: Callable[[], Awaitable[object]], name: str, *, expect_end: bool = False
    ) -> asyncio.Task[None]:
        """Run ``start()``, and again after a jittered backoff each time it fails (or, unless ``expect_end``, ends).

        The task returned ends only when cancelled, or once ``start()`` returns where ``expect_end``.
        """
        if self._supervisor is None:
            self._supervisor = _current.get() or Supervisor()
        supervised = self._supervised(start, f"{self._owner}:{name}", self._supervisor, expect_end)
        return self.spawn(supervised, name, expect_end=True)

    async def _supervised(
        self, start: Callable[[], Awaitable[object]], name: str, supervisor: Supervisor, expect_end: bool
    ) -> None:
        supervisor.started(name)
        try:
            await self._run_again_and_again(start, name, supervisor, expect_end)
        finally:
            supervisor.ended(name)

    async def _run_again_and_again(
        self, start: Callable[[], Awaitable[object]], name: str, supervisor: Supervisor, expect_end: bool
    ) -> None:
        while True:
            exc_info: BaseException | None = None
            try:
                await start()
                if expect_end or self._closing:
                    return
                error = "ended unexpectedly"
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._closing or current is None or current.cancelling():
                    raise
                # Cancelled by something other than our owner (a library cancelling a future it shares).
                error = "cancelled from within"
            except Exception as exc:
                if self._closing:
                    return
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                exc_info = exc
            delay_s = supervisor.failed(name, error)
            log.error(
                "task failed; restarting", task=name, error=error, retry_in_s=round(delay_s, 3), exc_info=exc_info
            )
            await supervisor.clock.sleep(delay_s)
            supervisor.restarted(name)

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
