"""The client loop every target is measured with: closed-loop callers, blocks of calls alternating between targets."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypedDict

from benchmarks.measure import Latencies

Call = Callable[[int], Awaitable[object]]
"""One RPC; the argument is the call's number, to pick a request."""
Progress = Callable[[int], object]


class Loop(TypedDict):
    """How the targets of a phase are called, by this loop and by gokubelet's alike (``**loop`` to either)."""

    calls: int
    callers: int
    block_calls: int
    warmup_calls: int


async def run_calls(call: Call, calls: int, callers: int, into: Latencies | None, progress: Progress) -> None:
    """``calls`` calls by ``callers`` concurrent callers, each waiting for its answer before the next call."""
    numbers = itertools.count()

    async def caller() -> None:
        while (n := next(numbers)) < calls:
            began = time.perf_counter()
            try:
                await call(n)
            except Exception as exc:
                if into is not None:
                    into.error(exc)
                continue
            if into is not None:
                into.record(began, time.perf_counter() - began)
                progress(1)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(callers, calls)):
            group.create_task(caller())
    if into is not None:
        into.wall_s += time.perf_counter() - began


async def interleaved(
    targets: Mapping[str, Call],
    into: Mapping[str, Latencies],
    *,
    calls: int,
    callers: int,
    block_calls: int,
    warmup_calls: int,
    progress: Progress,
) -> None:
    """``calls`` calls per target in blocks, the targets' order rotating each round: drift hits every target alike."""
    names = list(targets)
    for name in names:
        await run_calls(targets[name], warmup_calls, callers, None, progress)
    done = 0
    for round_ in itertools.count():
        if done >= calls:
            return
        block = min(block_calls, calls - done)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            await run_calls(targets[name], block, callers, into[name], progress)
        done += block
