"""The NVML backend's settings: one frozen dataclass, read from the backend's section of the config."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import ContainerSpec, Device

#: Longest event wait allowed: the health thread checks its stop flag between waits, so this bounds shutdown.
MAX_EVENT_WAIT_TIMEOUT_MS = 10_000
#: Longest backoff (seconds) between NVML retries: an hour; longer leaves a repaired node idle for no reason.
MAX_BACKOFF_S = 3600.0
#: Most consecutive failed event waits tolerated before every GPU is marked Unhealthy.
MAX_WAIT_ERROR_THRESHOLD = 1000


class DeviceIdStrategy(enum.StrEnum):
    """How a GPU is named to the kubelet and in ``NVIDIA_VISIBLE_DEVICES``."""

    UUID = "uuid"
    """``GPU-…``: stable across reboots and driver reloads (NVIDIA's default)."""
    INDEX = "index"
    """``0``, ``1``, …: NVML's enumeration order, which can change when a GPU disappears."""


@dataclass(frozen=True, slots=True)
class NvmlSettings:
    """How the NVML backend finds GPUs, names them and watches their health.

    When NVML cannot be initialised (no driver, no library, no permission), ``fail_on_init_error`` decides:
    True (the default, as NVIDIA's ``--fail-on-init-error``) makes ``start`` raise ``BackendUnavailable`` with
    the cause and the fix, so a misconfigured node shows a crash-looping pod instead of a silent one. False
    suits mixed clusters where the DaemonSet also lands on nodes without GPUs: the backend then serves no
    devices, logs the cause once, and retries ``nvmlInit`` in the background with exponential backoff (from
    ``retry_backoff_initial_s`` up to ``rediscover_backoff_max_s``); when it succeeds it discovers the GPUs and
    emits ``InventoryChanged``.
    """

    resource: str = "nvidia.com/gpu"
    """The extended resource whole GPUs are served as."""
    device_id_strategy: DeviceIdStrategy = DeviceIdStrategy.UUID
    """``uuid`` or ``index``: the device IDs the kubelet sees and ``NVIDIA_VISIBLE_DEVICES`` carries."""
    pass_device_specs: bool = False
    """Also hand the runtime the ``/dev/nvidia*`` nodes (for runtimes without the NVIDIA hook; off as upstream)."""
    driver_root: str = "/"
    """Where the driver's files live; ``/run/nvidia/driver`` for the GPU operator's containerised driver."""
    device_root: str = "/"
    """The root under which the host's ``/dev`` lives (host paths of device nodes are found under it)."""
    fail_on_init_error: bool = True
    """Raise when NVML cannot start (True), or serve nothing and retry in the background (False)."""
    retry_backoff_initial_s: float = 1.0
    """Seconds (above 0, at most ``rediscover_backoff_max_s``) before the first retry of a failed init,
    rediscovery or event wait; doubles on each failure."""
    rediscover_backoff_max_s: float = 60.0
    """Ceiling in seconds of that backoff (at most ``MAX_BACKOFF_S``, an hour): a minute keeps a broken node's logs
    readable."""
    event_wait_timeout_ms: int = 1000
    """Milliseconds (1 to 10,000) one NVML event wait blocks; it bounds how long shutdown waits for the thread
    (NVIDIA: 5 s)."""
    wait_error_threshold: int = 3
    """Consecutive failed event waits (1 to ``MAX_WAIT_ERROR_THRESHOLD``) after which every GPU is marked Unhealthy
    (until a wait succeeds again)."""
    sysfs_root: str = "/sys"
    """Where sysfs is mounted; NUMA nodes are read from ``<sysfs_root>/bus/pci/devices/<bus id>/numa_node``."""
    report_mig_devices: bool = False
    """Serve the MIG devices of MIG-enabled GPUs (under ``resource``, each with its GPU and compute instance) and
    read every GPU's GPU-instance profiles, instead of skipping MIG-enabled GPUs. The partitioned backend turns
    this on and names the resources; off by default because MIG devices under one name suit few nodes."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device_id_strategy", DeviceIdStrategy(self.device_id_strategy))
        except ValueError:
            raise ConfigError(f"device_id_strategy: {self.device_id_strategy!r} is not one of uuid, index") from None
        try:
            # The model owns the rule for resource names; a throwaway device applies it.
            Device(id="probe", resource=self.resource, gpu="probe", spec=ContainerSpec())
        except ValueError as error:
            raise ConfigError(f"resource: {error}") from None
        if not 1 <= self.event_wait_timeout_ms <= MAX_EVENT_WAIT_TIMEOUT_MS:
            raise ConfigError(
                f"event_wait_timeout_ms: {self.event_wait_timeout_ms} is outside 1..{MAX_EVENT_WAIT_TIMEOUT_MS}"
                " (it bounds how long shutdown waits for the health thread)"
            )
        if not 1 <= self.wait_error_threshold <= MAX_WAIT_ERROR_THRESHOLD:
            raise ConfigError(
                f"wait_error_threshold: {self.wait_error_threshold} is outside 1..{MAX_WAIT_ERROR_THRESHOLD}"
            )
        if not self.rediscover_backoff_max_s <= MAX_BACKOFF_S:
            raise ConfigError(
                f"rediscover_backoff_max_s: {self.rediscover_backoff_max_s:g} is above {MAX_BACKOFF_S:g} (an hour)"
            )
        if not 0 < self.retry_backoff_initial_s <= self.rediscover_backoff_max_s:
            raise ConfigError(
                f"retry_backoff_initial_s: {self.retry_backoff_initial_s:g} must be above 0 and at most"
                f" rediscover_backoff_max_s ({self.rediscover_backoff_max_s:g})"
            )
        for name in ("driver_root", "device_root", "sysfs_root"):
            if not str(getattr(self, name)).startswith("/"):
                raise ConfigError(f"{name}: {getattr(self, name)!r} must be an absolute path")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NvmlSettings:
        """Read settings from a config section or flags; keys may use ``-`` or ``_``, values may be strings."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in options.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{key}: unknown NVML setting; known: {', '.join(sorted(known))}")
            values[name] = _convert(name, raw)
        return cls(**values)


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_BOOL_FIELDS = frozenset({"pass_device_specs", "fail_on_init_error", "report_mig_devices"})
_INT_FIELDS = frozenset({"event_wait_timeout_ms", "wait_error_threshold"})
_FLOAT_FIELDS = frozenset({"retry_backoff_initial_s", "rediscover_backoff_max_s"})


def _convert(name: str, raw: Any) -> Any:
    if name in _BOOL_FIELDS:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _BOOLS:
            return _BOOLS[raw.strip().lower()]
        raise ConfigError(f"{name}: {raw!r} is not a boolean (true or false)")
    if name in _INT_FIELDS:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: {raw!r} is not a whole number")
    if name in _FLOAT_FIELDS:
        value: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                value = None
        if value is None or not math.isfinite(value):
            raise ConfigError(f"{name}: {raw!r} is not a number of seconds")
        return value
    if name == "device_id_strategy":
        try:
            return DeviceIdStrategy(str(raw).strip().lower())
        except ValueError:
            raise ConfigError(f"device_id_strategy: {raw!r} is not one of uuid, index") from None
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: {raw!r} is not a string")
    return raw
