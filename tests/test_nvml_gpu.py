"""The NVML backend on real GPUs through the real pynvml; skipped where NVML does not start.

Run on a GPU node with ``.venv/bin/pytest -q -m gpu tests/test_nvml_gpu.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.events import THREAD_NAME, XidObserved
from gpuplugin.core.backend import HealthChanged
from gpuplugin.core.model import Health, PCIeLevel
from gpuplugin.devices.health import HealthPolicy

pytestmark = pytest.mark.gpu


@pytest.fixture
def real_nvml() -> Any:
    """The real pynvml, once nvmlInit has been seen to work here; otherwise the test is skipped."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        pytest.skip(f"NVML does not start here ({error}): needs the NVIDIA driver and a GPU")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("NVML started but sees no GPU")
    finally:
        pynvml.nvmlShutdown()
    return pynvml


@pytest.fixture
async def backend(real_nvml: Any) -> AsyncIterator[NvmlBackend]:
    settings = NvmlSettings(event_wait_timeout_ms=500)
    started = NvmlBackend(settings, HealthPolicy(recovery_quiet_period_s=0.05), real_nvml)
    await started.start()
    try:
        yield started
    finally:
        await started.aclose()


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


async def test_discovers_real_gpus(backend: NvmlBackend) -> None:
    """Every GPU is served Healthy by its GPU- UUID with memory, and every pair of GPUs has a link."""
    tree = await backend.discover()
    assert tree.devices, "NVML reports GPUs but none is served (all MIG-enabled?)"
    for device in tree.devices:
        assert device.id.startswith("GPU-")
        assert device.health is Health.HEALTHY
        assert int(device.attributes["memory_mib"]) > 0
        assert device.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": device.id}
    gpus = tree.gpus()
    for a, b in itertools.combinations(gpus, 2):
        link = tree.links[frozenset((a, b))]
        assert link.nvlinks >= 0
        assert isinstance(link.pcie, PCIeLevel)
    print({tuple(sorted(pair)): link for pair, link in tree.links.items()})


async def test_health_thread_starts_and_stops_promptly(real_nvml: Any) -> None:
    """On start one health thread waits on NVML events; aclose ends it within a wait timeout."""
    backend = NvmlBackend(NvmlSettings(event_wait_timeout_ms=500), HealthPolicy(), real_nvml)
    await backend.start()
    try:
        # Longer than one wait: the thread has seen NVML's Timeout and waits again.
        await asyncio.sleep(0.7)
        assert len(health_threads()) == 1
        assert backend.fault_counts["wait-failing"] == 0
    finally:
        began = time.monotonic()
        await backend.aclose()
    assert time.monotonic() - began < 2.0
    assert not health_threads()


async def test_event_at_thread_boundary_reaches_stream(backend: NvmlBackend) -> None:
    """An XID handed over the health thread's callback comes out of events() for that GPU."""
    gpu = (await backend.discover()).devices[0].gpu
    poster = threading.Thread(target=backend.post_from_thread, args=(XidObserved(gpu, 79),))
    poster.start()
    stream = backend.events()
    try:
        event = await asyncio.wait_for(anext(stream), 2.0)
    finally:
        await stream.aclose()
    poster.join()
    assert event == HealthChanged(gpu, Health.UNHEALTHY, "XID 79", 79)
