"""Time, in one place: the clock that quiet periods and timeouts read, and the one backoff every retry loop waits.

Everything that waits on time (a health quiet period, a restart backoff) takes a ``Clock``; the daemon passes the
real one (``REAL_CLOCK``, the default), tests a ``VirtualClock``, on which sleeping takes no real time: the test
moves time on with ``advance`` and sees a minute-long quiet period pass at once, in a fixed order.

Every retry loop waits ``jittered_backoff`` (or a ``Backoff``, which counts the attempts): exponential, capped by a
setting, and jittered so that many waiters failing together (the GPUs of one node, the plugins of one kubelet) do not
retry in step. A dozen lines of our own rather than a retry library: our loops wait on events that cut a backoff
short, run in NVML's health thread, or count failures for the supervisor, none of which a decorator retrying an
exception fits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Where time is read and waited on."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class RealClock:
    """The process's clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


REAL_CLOCK: Clock = RealClock()
"""The default wherever a clock may be given."""

#: Loop turns ``VirtualClock.advance`` gives the tasks it woke to run (and to sleep again) before time moves on:
#: enough for a few awaits that finish without waiting on anything (a probe answering from memory, say).
_SETTLE_TURNS = 20


class VirtualClock:
    """A clock whose time moves only through ``advance``: ``sleep`` takes no real time, and sleepers wake in the
    order of their deadlines however long the periods are."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._slept = asyncio.Event()

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until ``advance`` has moved time ``seconds`` on (at once for 0 or less, after one loop turn)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), woken))
        self._slept.set()
        # A cancelled sleeper's future is cancelled with it: ``advance`` skips it.
        await woken

    @property
    def sleeping(self) -> int:
        """How many sleepers wait now."""
        return sum(not future.done() for _, _, future in self._sleepers)

    async def until_sleeping(self, count: int = 1) -> None:
        """Wait (in real time, without timing out: wrap it in a timeout) until ``count`` sleepers wait; for a task
        that sleeps only after something real, a worker thread say, has answered."""
        while self.sleeping < count:
            self._slept.clear()
            await self._slept.wait()

    async def advance_to_next(self) -> float:
        """Move time on to the earliest sleeper's deadline, waking it (and any due with it); the seconds moved.
        A task that sleeps again at once stays asleep, however short its new sleep."""
        pending = [deadline for deadline, _, woken in self._sleepers if not woken.done()]
        if not pending:
            raise RuntimeError("nothing sleeps on this clock")
        seconds = min(pending) - self._now
        await self.advance(seconds)
        return seconds

    async def advance(self, seconds: float) -> None:
        """Move time ``seconds`` on: wake every sleeper due by then, earliest first, each at its own deadline, and
        let the woken tasks run (and sleep again, perhaps to wake within the same advance) before the next."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds:g} s)")
        target = self._now + seconds
        await _settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, woken = heapq.heappop(self._sleepers)
            if woken.done():
                continue
            self._now = max(self._now, deadline)
            woken.set_result(None)
            await _settle()
        self._now = target
        await _settle()


async def wait_at_most(clock: Clock, event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` of ``clock`` have passed, whichever comes first; True when set.
    A backoff that news cuts short (the kubelet's socket appeared, a rediscovery was asked for)."""
    if event.is_set():
        return True
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(clock.sleep(seconds))]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        # Both end here, even when we are cancelled: no task outlives the wait.
        await asyncio.gather(*waits, return_exceptions=True)
    return event.is_set()


async def _settle() -> None:
    for _ in range(_SETTLE_TURNS):
        await asyncio.sleep(0)


def jittered_backoff(attempt: int, first_s: float, max_s: float, rng: Callable[[], float] = random.random) -> float:
    """The wait before retry number ``attempt`` (1 for the first): ``first_s`` doubling up to ``max_s``, drawn from
    its upper half so that many waiters (plugins of one kubelet, tasks failing together) spread out."""
    ceiling = min(first_s * 2.0 ** min(max(attempt - 1, 0), 62), max_s)
    return ceiling * (0.5 + 0.5 * rng())


@dataclass(slots=True)
class Backoff:
    """One retry loop's backoff: ``next()`` is the wait before the next retry, ``reset()`` after a success."""

    first_s: float
    """Seconds, the ceiling of the first wait."""
    max_s: float
    """Seconds, the ceiling of every wait (a setting, never a constant in the loop)."""
    rng: Callable[[], float] = random.random
    attempts: int = 0
    """Failures since the last ``reset``."""

    def next(self) -> float:
        self.attempts += 1
        return jittered_backoff(self.attempts, self.first_s, self.max_s, self.rng)

    def reset(self) -> None:
        self.attempts = 0
