"""The NVML backend's health thread and what the loop makes of its events, against the fake NVML."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.events import THREAD_NAME, XidObserved
from gpuplugin.backends.nvml.fake import FakeGpu, FakeNvml, h200_node
from gpuplugin.core.backend import HealthChanged, InventoryChanged
from gpuplugin.core.clock import REAL_CLOCK, Clock, VirtualClock
from gpuplugin.core.model import Health
from gpuplugin.core.tasks import SupervisionSettings, Supervisor, supervising
from gpuplugin.devices.health import HealthPolicy, XidAction
from tests.fakes import next_event, until

XID = FakeNvml.nvmlEventTypeXidCriticalError
SBE = FakeNvml.nvmlEventTypeSingleBitEccError
DBE = FakeNvml.nvmlEventTypeDoubleBitEccError
#: An XID neither ignored nor fatal by default: recoverable.
RECOVERABLE_XID = 62
#: Restarts fast enough for a test: five failures within the window make a task failing.
QUICK = SupervisionSettings(first_backoff_s=0.01, max_backoff_s=0.05, failure_budget=5, exit_grace_s=0.3)
HEALTH_TASK = "nvml:health thread"
#: Virtual seconds, for the recovery tests on a VirtualClock.
QUIET_S = 30.0


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Any:
    """Fail any test that leaves a health thread running."""
    yield
    assert not health_threads(), "health thread left running"


async def no_event(backend: NvmlBackend, within_s: float = 0.2) -> None:
    with pytest.raises(TimeoutError):
        await next_event(backend, within_s)


def settings(**overrides: Any) -> NvmlSettings:
    values: dict[str, Any] = {
        "event_wait_timeout_ms": 50,
        "retry_backoff_initial_s": 0.01,
        "rediscover_backoff_max_s": 0.02,
    }
    return NvmlSettings(**{**values, **overrides})


@asynccontextmanager
async def running(
    fake: FakeNvml, policy: HealthPolicy | None = None, clock: Clock = REAL_CLOCK, **overrides: Any
) -> AsyncIterator[NvmlBackend]:
    policy = policy or HealthPolicy(recovery_quiet_period_s=0.05)
    backend = NvmlBackend(settings(**overrides), policy, fake, clock=clock)
    await backend.start()
    try:
        # Events reach only GPUs registered on the thread's set, as with NVML.
        await until(lambda: all(fake.registered(gpu.uuid) for gpu in fake.gpus if not gpu.lost))
        yield backend
    finally:
        await backend.aclose()


def uuids(fake: FakeNvml) -> list[str]:
    return [gpu.uuid for gpu in fake.gpus]


async def test_xid_marks_only_its_gpu_unhealthy() -> None:
    """A fatal XID on one GPU yields one Unhealthy event for that GPU, for the whole GPU, and nothing for others."""
    fake = h200_node(2)
    _, b = uuids(fake)
    async with running(fake) as backend:
        assert fake.emit_xid(b, 79) == 1
        event = await next_event(backend)
        assert event == HealthChanged(gpu=b, health=Health.UNHEALTHY, reason="XID 79", xid=79, instance=None)
        await no_event(backend)
        assert backend.xid_counts == {(79, XidAction.FATAL): 1}


async def test_ignored_xid_changes_nothing() -> None:
    """An application XID (13) is counted but yields no health event."""
    fake = h200_node(2)
    async with running(fake) as backend:
        fake.emit_xid(uuids(fake)[0], 13)
        await until(lambda: backend.xid_counts[(13, XidAction.IGNORE)] == 1)
        await no_event(backend)


async def sleeping(clock: VirtualClock) -> None:
    """Until a task sleeps on ``clock`` (after a probe in a worker thread, say)."""
    async with asyncio.timeout(5.0):
        await clock.until_sleeping()


async def test_recoverable_xid_recovers_after_quiet_period() -> None:
    """A recoverable XID turns the GPU Unhealthy, then Healthy once the quiet period passed and the probe answers."""
    fake = h200_node(2)
    a = uuids(fake)[0]
    clock = VirtualClock()
    async with running(fake, HealthPolicy(recovery_quiet_period_s=QUIET_S), clock) as backend:
        fake.emit_xid(a, RECOVERABLE_XID)
        down = await next_event(backend)
        assert isinstance(down, HealthChanged)
        assert (down.gpu, down.health, down.xid) == (a, Health.UNHEALTHY, RECOVERABLE_XID)
        await sleeping(clock)
        probes = fake.calls["nvmlDeviceGetHandleByUUID"]
        await clock.advance(QUIET_S - 0.1)
        assert fake.calls["nvmlDeviceGetHandleByUUID"] == probes, "probed before the quiet period ended"
        await clock.advance(0.1)
        up = await next_event(backend)
        assert isinstance(up, HealthChanged)
        assert (up.gpu, up.health) == (a, Health.HEALTHY)
        assert fake.calls["nvmlDeviceGetHandleByUUID"] == probes + 1


async def test_recovery_waits_for_the_probe() -> None:
    """After a recoverable XID the GPU stays Unhealthy while the probe fails, and recovers when it succeeds."""
    fake = h200_node(2)
    a = uuids(fake)[0]
    clock = VirtualClock()
    policy = HealthPolicy(recovery_quiet_period_s=QUIET_S)
    async with running(fake, policy, clock) as backend:
        with fake.lock:
            fake.gpu(a).errors["nvmlDeviceGetMemoryInfo"] = FakeNvml.NVML_ERROR_UNKNOWN
        fake.emit_xid(a, RECOVERABLE_XID)
        down = await next_event(backend)
        assert isinstance(down, HealthChanged)
        assert down.health is Health.UNHEALTHY
        await sleeping(clock)
        probes = fake.calls["nvmlDeviceGetMemoryInfo"]
        await clock.advance(QUIET_S)
        # The probe failed, so the tracker sleeps again (its backoff before the next probe) rather than ending.
        await sleeping(clock)
        assert fake.calls["nvmlDeviceGetMemoryInfo"] == probes + 1
        with fake.lock:
            fake.gpu(a).errors.clear()
        await clock.advance(policy.probe_retry_first_s)
        up = await next_event(backend)
        assert isinstance(up, HealthChanged)
        assert (up.gpu, up.health) == (a, Health.HEALTHY)


async def test_mig_instance_ids_pass_through() -> None:
    """An XID naming a GPU and compute instance reaches the tracker with that instance pair."""
    fake = h200_node(1)
    a = uuids(fake)[0]
    async with running(fake) as backend:
        fake.emit_xid(a, 79, instance=(3, 0))
        event = await next_event(backend)
        assert isinstance(event, HealthChanged)
        assert (event.gpu, event.instance, event.xid) == (a, (3, 0), 79)


async def test_lost_gpu_unhealthy_others_still_watched() -> None:
    """A GPU that falls off the bus turns Unhealthy alone, and events of the other GPUs still arrive."""
    fake = h200_node(2)
    a, b = uuids(fake)
    async with running(fake) as backend:
        fake.lose(a)
        event = await next_event(backend)
        assert isinstance(event, HealthChanged)
        assert (event.gpu, event.health) == (a, Health.UNHEALTHY)
        assert "lost" in event.reason
        await until(lambda: fake.registered(b) and not fake.registered(a))
        fake.emit_xid(b, 79)
        other = await next_event(backend)
        assert isinstance(other, HealthChanged)
        assert (other.gpu, other.health) == (b, Health.UNHEALTHY)
        assert backend.fault_counts["gpu-lost"] == 1


async def test_ecc_double_bit_is_fatal_single_bit_is_counted() -> None:
    """A single-bit ECC error is only counted; a double-bit one turns the GPU Unhealthy."""
    fake = h200_node(1)
    a = uuids(fake)[0]
    async with running(fake) as backend:
        fake.emit_ecc(a, double_bit=False)
        await until(lambda: backend.fault_counts["ecc-single-bit"] == 1)
        await no_event(backend)
        fake.emit_ecc(a, double_bit=True)
        event = await next_event(backend)
        assert isinstance(event, HealthChanged)
        assert (event.gpu, event.health) == (a, Health.UNHEALTHY)
        assert "ECC" in event.reason


async def test_only_supported_event_types_are_registered() -> None:
    """A GPU that does not support XID events is registered for the ECC types alone."""
    fake = FakeNvml([FakeGpu("GPU-a", 0, "00000000:00:06.0", supported_events=SBE | DBE)])
    async with running(fake):
        assert fake.registered("GPU-a") == SBE | DBE
        assert fake.emit_xid("GPU-a", 79) == 0


async def test_persistent_wait_errors_mark_all_unhealthy_once_then_recover() -> None:
    """Failing waits mark every GPU Unhealthy once the threshold is reached, log it once, and recover them after;
    a GPU already down for a fatal XID stays down."""
    fake = h200_node(3, nvlinks_per_pair=4)
    a, b, c = uuids(fake)
    async with running(fake, wait_error_threshold=3) as backend:
        fake.emit_xid(a, 79)
        assert (await next_event(backend)) == HealthChanged(a, Health.UNHEALTHY, "XID 79", 79)
        with capture_logs() as logs:
            fake.fail_waits(FakeNvml.NVML_ERROR_UNKNOWN)
            down = [await next_event(backend), await next_event(backend)]
            failed = fake.calls["nvmlEventSetWait_v2"]
            await until(lambda: fake.calls["nvmlEventSetWait_v2"] >= failed + 5)  # Many more failed waits.
            fake.clear_wait_failures()
            up = [await next_event(backend), await next_event(backend)]
        assert all(isinstance(e, HealthChanged) and e.health is Health.UNHEALTHY for e in down)
        assert {e.gpu for e in down if isinstance(e, HealthChanged)} == {b, c}
        assert all(isinstance(e, HealthChanged) and e.health is Health.HEALTHY for e in up)
        assert {e.gpu for e in up if isinstance(e, HealthChanged)} == {b, c}
        assert fake.calls["nvmlEventSetWait_v2"] > 3
        errors = [entry for entry in logs if entry["log_level"] == "error"]
        assert len(errors) == 1
        assert "Unknown" in errors[0]["reason"]
        await no_event(backend)


async def test_wait_errors_below_threshold_change_nothing() -> None:
    """A couple of failed waits, fewer than the threshold, leave health as it is."""
    fake = h200_node(2)
    async with running(fake, wait_error_threshold=3) as backend:
        fake.fail_waits(FakeNvml.NVML_ERROR_UNKNOWN, times=2)
        await no_event(backend, 0.3)
        assert backend.fault_counts["wait-failing"] == 0


async def test_mig_config_change_rediscovers() -> None:
    """A MIG configuration change makes the backend discover again and emit the new inventory."""
    fake = h200_node(2)
    a, b = uuids(fake)
    async with running(fake) as backend:
        fake.set_mig_mode(b, FakeNvml.NVML_DEVICE_MIG_ENABLE)
        fake.emit_mig_change(b)
        event = await next_event(backend)
        assert isinstance(event, InventoryChanged)
        assert [d.id for d in event.tree.devices] == [a]
        assert (await backend.discover()) == event.tree
        # The MIG-enabled GPU is still watched for its next layout change, and only for that.
        await until(lambda: fake.registered(b) == FakeNvml.nvmlEventMigConfigChange)
        fake.set_mig_mode(b, FakeNvml.NVML_DEVICE_MIG_DISABLE)
        fake.emit_mig_change(b)
        again = await next_event(backend)
        assert isinstance(again, InventoryChanged)
        assert [d.id for d in again.tree.devices] == [a, b]


async def test_observation_posted_at_thread_boundary_reaches_stream() -> None:
    """An observation handed over by a thread through ``post_from_thread`` comes out of ``events()``."""
    fake = h200_node(1)
    a = uuids(fake)[0]
    async with running(fake) as backend:
        poster = threading.Thread(target=backend.post_from_thread, args=(XidObserved(a, 79),))
        poster.start()
        event = await next_event(backend)
        poster.join()
        assert event == HealthChanged(a, Health.UNHEALTHY, "XID 79", 79)


async def test_event_for_unserved_gpu_is_ignored() -> None:
    """An observation naming a UUID the backend does not serve yields no event, only a warning naming it."""
    fake = h200_node(1)
    async with running(fake) as backend:
        with capture_logs() as logs:
            backend.post_from_thread(XidObserved("GPU-unknown", 79))
            await no_event(backend)
        # The warning shows the observation was handled: a callback that raised would also yield no event.
        assert [e["uuid"] for e in logs if e["event"] == "health event for a gpu not served"] == ["GPU-unknown"]
        assert backend.xid_counts == {}


async def test_shutdown_is_prompt_and_releases_everything() -> None:
    """``aclose`` stops the health thread within the wait timeout, frees the event set, shuts NVML down, and is
    safe to call twice."""
    fake = h200_node(2)
    backend = NvmlBackend(settings(event_wait_timeout_ms=300), HealthPolicy(), fake)
    await backend.start()
    await until(lambda: fake.live_event_sets() == 1)
    assert len(health_threads()) == 1
    started = time.monotonic()
    await backend.aclose()
    assert time.monotonic() - started < 1.0
    assert not health_threads()
    assert fake.live_event_sets() == 0
    assert not fake.initialized
    await backend.aclose()
    assert fake.calls["nvmlShutdown"] == 1


async def test_a_dead_health_thread_is_restarted_and_its_gpus_recover() -> None:
    """A health thread killed by a non-NVML exception marks every GPU Unhealthy, is restarted by the supervisor
    (the restart counted), and the new thread's first good wait brings the GPUs back Healthy."""
    fake = h200_node(2)
    supervisor = Supervisor(QUICK)
    with supervising(supervisor), capture_logs() as logs:
        async with running(fake) as backend:
            [first] = health_threads()
            fake.break_waits(MemoryError())
            down = [await next_event(backend), await next_event(backend)]
            # Hang guards, not timings: a loaded machine can take seconds to start and schedule the new thread.
            up = [await next_event(backend, timeout_s=15), await next_event(backend, timeout_s=15)]
            # The tracker's own probes of a lost GPU may bring it back before the restart is counted.
            await until(lambda: supervisor.restarts[HEALTH_TASK] == 1, timeout_s=15)
            await until(lambda: first not in health_threads() and len(health_threads()) == 1)
            await until(lambda: all(fake.registered(uuid) for uuid in uuids(fake)))
            # The new thread watches: an XID still turns its GPU Unhealthy.
            fake.emit_xid(uuids(fake)[0], 79)
            assert (await next_event(backend)) == HealthChanged(uuids(fake)[0], Health.UNHEALTHY, "XID 79", 79)
            assert supervisor.failing() == {}
    assert all(isinstance(e, HealthChanged) and e.health is Health.UNHEALTHY for e in down)
    assert {e.gpu for e in down if isinstance(e, HealthChanged)} == set(uuids(fake))
    assert all(isinstance(e, HealthChanged) and e.health is Health.HEALTHY for e in up)
    assert {e.gpu for e in up if isinstance(e, HealthChanged)} == set(uuids(fake))
    restarts = [e for e in logs if e["event"] == "task failed; restarting"]
    assert [(e["task"], "MemoryError" in e["error"]) for e in restarts] == [(HEALTH_TASK, True)]


async def test_a_health_thread_that_keeps_dying_is_reported_failing() -> None:
    """A health thread that dies on every start is restarted up to the failure budget, then the supervisor reports
    it failing (``/healthz`` 503) naming the error; its GPUs stay Unhealthy meanwhile."""
    fake = h200_node(1)
    supervisor = Supervisor(QUICK)
    with supervising(supervisor), capture_logs():
        async with running(fake) as backend:
            fake.break_waits(RuntimeError("bug in the watch loop"), times=None)
            down = await next_event(backend)
            assert isinstance(down, HealthChanged)
            assert down.health is Health.UNHEALTHY
            await until(lambda: HEALTH_TASK in supervisor.failing(), timeout_s=5.0)
            assert "bug in the watch loop" in supervisor.failing()[HEALTH_TASK]
            assert supervisor.restarts[HEALTH_TASK] >= QUICK.failure_budget - 1
            await no_event(backend)
            fake.clear_wait_failures()
    supervisor.close()


async def test_a_stopped_or_replaced_health_thread_is_no_failure() -> None:
    """A health thread replaced after a MIG change, or stopped at shutdown, is not restarted nor counted."""
    fake = h200_node(2)
    b = uuids(fake)[1]
    supervisor = Supervisor(QUICK)
    with supervising(supervisor), capture_logs() as logs:
        async with running(fake) as backend:
            fake.set_mig_mode(b, FakeNvml.NVML_DEVICE_MIG_ENABLE)
            fake.emit_mig_change(b)
            assert isinstance(await next_event(backend), InventoryChanged)
            await until(lambda: len(health_threads()) == 1)
            await no_event(backend)
    assert supervisor.restarts[HEALTH_TASK] == 0
    assert [e for e in logs if e["log_level"] == "error"] == []
