"""Starting the NVML backend: settings, the entry point's factory, and what happens when NVML is missing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.backends.nvml import DeviceIdStrategy, NvmlBackend, NvmlSettings, create
from gpuplugin.backends.nvml.fake import FakeNvml, h200_node
from gpuplugin.backends.nvml.library import preload_library
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import Backend, BackendUnavailable, InventoryChanged
from gpuplugin.core.clock import VirtualClock
from gpuplugin.core.errors import ConfigError
from gpuplugin.devices.health import HealthPolicy
from tests.fakes import next_event


def test_settings_defaults() -> None:
    """Empty options give NVIDIA's defaults: nvidia.com/gpu by UUID, no device specs, fail on init error, 5 s waits."""
    settings = NvmlSettings.from_options({})
    assert settings == NvmlSettings()
    assert (settings.resource, settings.device_id_strategy) == ("nvidia.com/gpu", DeviceIdStrategy.UUID)
    assert (settings.pass_device_specs, settings.fail_on_init_error) == (False, True)
    assert (settings.driver_root, settings.device_root, settings.sysfs_root) == ("/", "/", "/sys")
    assert settings.event_wait_timeout_ms == 1000


def test_settings_from_flag_strings() -> None:
    """Options spelled as flags (dashes, string values) are read into typed fields."""
    settings = NvmlSettings.from_options(
        {"device-id-strategy": "INDEX", "pass-device-specs": "yes", "event-wait-timeout-ms": "250", "driver_root": "/x"}
    )
    assert settings.device_id_strategy is DeviceIdStrategy.INDEX
    assert settings.pass_device_specs is True
    assert settings.event_wait_timeout_ms == 250
    assert settings.driver_root == "/x"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"device_id_strategy": "serial"}, "device_id_strategy"),
        ({"pass_device_specs": "maybe"}, "pass_device_specs"),
        ({"fail_on_init_error": 2}, "fail_on_init_error"),
        ({"event_wait_timeout_ms": 60_000}, "event_wait_timeout_ms"),
        ({"event_wait_timeout_ms": True}, "event_wait_timeout_ms"),
        ({"rediscover_backoff_max_s": "soon"}, "rediscover_backoff_max_s"),
        ({"wait_error_threshold": 0}, "wait_error_threshold"),
        ({"resource": "gpu"}, "resource"),
        ({"driver_root": "run/nvidia/driver"}, "driver_root"),
        ({"sysfs": "/sys"}, "sysfs"),
    ],
)
def test_settings_errors_name_the_field(options: dict[str, Any], field: str) -> None:
    """A bad or unknown option is refused with a message that starts with its name."""
    with pytest.raises(ConfigError, match=f"^{field}: "):
        NvmlSettings.from_options(options)


def test_create_builds_a_backend_from_the_context() -> None:
    """The entry point's factory reads the options and the health policy, and starts nothing."""
    backend = create(BackendContext(options={"device_id_strategy": "index"}))
    assert isinstance(backend, Backend)
    assert isinstance(backend, NvmlBackend)
    assert backend.name == "nvml"
    assert backend.settings.device_id_strategy is DeviceIdStrategy.INDEX


async def test_real_pynvml_without_library_is_unavailable() -> None:
    """On a machine without libnvidia-ml.so.1, the real pynvml makes start raise BackendUnavailable with the fix."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML is installed here")
    backend = create(BackendContext())
    with pytest.raises(BackendUnavailable, match=r"libnvidia-ml\.so\.1 was not found"):
        await backend.start()
    await backend.aclose()


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND, r"libnvidia-ml\.so\.1 was not found"),
        (FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
        (FakeNvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (FakeNvml.NVML_ERROR_UNKNOWN, "nvmlInit failed"),
    ],
)
async def test_failing_init_is_backend_unavailable_with_the_fix(code: int, cause: str) -> None:
    """A failing nvmlInit becomes one BackendUnavailable naming the library, the driver root, the cause and fixes."""
    fake = FakeNvml(init_error=code)
    backend = NvmlBackend(NvmlSettings(), HealthPolicy(), fake)
    with pytest.raises(BackendUnavailable, match=cause) as raised:
        await backend.start()
    message = str(raised.value)
    for needle in ("libnvidia-ml.so.1", "driver_root '/'", "install the NVIDIA driver", "/run/nvidia/driver"):
        assert needle in message
    assert "runtime class" in message
    assert "container toolkit" in message
    assert (await backend.discover()).devices == ()
    await backend.aclose()
    assert fake.calls["nvmlShutdown"] == 0


async def test_library_missing_under_driver_root(tmp_path: Path) -> None:
    """With a driver root that holds no libnvidia-ml.so.1, start says where it looked, before calling nvmlInit."""
    fake = h200_node(1)
    backend = NvmlBackend(NvmlSettings(driver_root=str(tmp_path)), HealthPolicy(), fake, library_loader=preload_library)
    with pytest.raises(BackendUnavailable, match=f"under driver_root '{tmp_path}'.*usr/lib64"):
        await backend.start()
    assert fake.calls["nvmlInit"] == 0
    await backend.aclose()


async def test_uncountable_gpus_are_backend_unavailable() -> None:
    """If NVML starts but cannot count the GPUs, start raises BackendUnavailable and NVML is shut down on close."""
    fake = h200_node(1)
    fake.errors["nvmlDeviceGetCount"] = FakeNvml.NVML_ERROR_UNKNOWN
    backend = NvmlBackend(NvmlSettings(), HealthPolicy(), fake)
    with pytest.raises(BackendUnavailable, match="cannot count GPUs"):
        await backend.start()
    await backend.aclose()
    assert not fake.initialized


async def test_without_fail_on_init_error_serves_nothing_then_inventory() -> None:
    """With fail_on_init_error off, a failing init serves no GPUs, retries, and emits the inventory once it works."""
    fake = h200_node(2)
    fake.init_error = FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED
    settings = NvmlSettings(
        fail_on_init_error=False, retry_backoff_initial_s=0.01, rediscover_backoff_max_s=0.02, event_wait_timeout_ms=50
    )
    clock = VirtualClock()
    backend = NvmlBackend(settings, HealthPolicy(), fake, clock=clock)
    await backend.start()
    try:
        assert (await backend.discover()).devices == ()
        for tries, ceiling_s in ((1, 0.01), (2, 0.02), (3, 0.02)):
            async with asyncio.timeout(5.0):
                await clock.until_sleeping()
            # One nvmlInit per backoff, none while it waits; each backoff jittered within the upper half of its ceiling.
            assert fake.calls["nvmlInit"] == tries
            if tries == 3:
                fake.init_error = None
            assert ceiling_s / 2 <= await clock.advance_to_next() <= ceiling_s
        event = await next_event(backend)
        assert isinstance(event, InventoryChanged)
        assert [d.id for d in event.tree.devices] == [gpu.uuid for gpu in fake.gpus]
        assert await backend.discover() == event.tree
    finally:
        await backend.aclose()
    assert not fake.initialized
    assert fake.live_event_sets() == 0
