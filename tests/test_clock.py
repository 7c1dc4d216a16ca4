"""The one clock (real and virtual) and the one backoff that every retry loop waits."""

from __future__ import annotations

import asyncio

import pytest

from gpuplugin.core.clock import REAL_CLOCK, Backoff, VirtualClock, jittered_backoff, wait_at_most


async def tick(clock: VirtualClock, every_s: float, ticks: list[float]) -> None:
    """Note the clock's time every ``every_s``, until cancelled."""
    while True:
        await clock.sleep(every_s)
        ticks.append(clock.monotonic())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_virtual_sleepers_wake_in_deadline_order_at_their_deadline() -> None:
    """Sleepers on a virtual clock wake earliest first, each seeing its own deadline, and none before its time."""
    clock = VirtualClock(start_s=100.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("late", 60.0), ("early", 1.5), ("middle", 30.0))]
    await clock.until_sleeping(3)
    await clock.advance(29.0)
    assert woke == [("early", 101.5)]
    await clock.advance(31.0)
    assert woke == [("early", 101.5), ("middle", 130.0), ("late", 160.0)]
    assert clock.monotonic() == 160.0
    await asyncio.gather(*tasks)


async def test_a_sleeper_that_sleeps_again_wakes_within_one_advance() -> None:
    """A task woken by advance that sleeps again wakes again within the same advance when that is due."""
    clock = VirtualClock()
    ticks: list[float] = []
    task = asyncio.create_task(tick(clock, 1.0, ticks))
    await clock.advance(3.5)
    assert ticks == [1.0, 2.0, 3.0]
    await stop(task)
    assert clock.sleeping == 0


async def test_advance_to_next_wakes_only_the_earliest_sleeper() -> None:
    """advance_to_next moves time to the earliest deadline; a woken task's new sleep, however short, waits."""
    clock = VirtualClock()
    ticks: list[float] = []
    task = asyncio.create_task(tick(clock, 0.001, ticks))
    await clock.until_sleeping()
    assert await clock.advance_to_next() == 0.001
    assert ticks == [0.001]
    await stop(task)
    with pytest.raises(RuntimeError, match="nothing sleeps"):
        await clock.advance_to_next()


async def test_a_virtual_clock_cannot_go_back() -> None:
    """advance refuses a negative step."""
    with pytest.raises(ValueError, match="cannot go back"):
        await VirtualClock().advance(-1)


async def test_wait_at_most_ends_on_the_event_or_the_time() -> None:
    """wait_at_most returns True when the event is set first, False when its time passes first, leaving no task."""
    clock = VirtualClock()
    event = asyncio.Event()
    before = asyncio.all_tasks()
    timed_out = asyncio.create_task(wait_at_most(clock, event, 5.0))
    await clock.until_sleeping()
    await clock.advance(5.0)
    assert await timed_out is False
    woken = asyncio.create_task(wait_at_most(clock, event, 5.0))
    await clock.until_sleeping()
    event.set()
    assert await woken is True
    assert clock.monotonic() == 5.0
    assert await wait_at_most(REAL_CLOCK, event, 3600) is True
    assert not [t for t in asyncio.all_tasks() - before if not t.done()]


def test_backoff_doubles_up_to_its_cap_jittered_and_resets() -> None:
    """Backoff waits double from first_s to max_s, each in the upper half of its ceiling, and start over on reset."""
    high = Backoff(0.5, 3.0, rng=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert high.attempts == 5
    high.reset()
    assert high.next() == 0.5
    low = Backoff(0.5, 3.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(4)] == [0.25, 0.5, 1.0, 1.5]


def test_backoff_doubles_up_to_its_ceiling_and_stays_in_the_upper_half() -> None:
    """The backoff doubles per attempt from the first wait up to the ceiling, each wait between half and all of it."""
    assert [jittered_backoff(n, 0.1, 1.0, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5, 100)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert jittered_backoff(3, 0.1, 1.0, rng=lambda: 0.0) == pytest.approx(0.2)
    assert jittered_backoff(10_000, 0.1, 30.0, rng=lambda: 0.5) == pytest.approx(22.5)
