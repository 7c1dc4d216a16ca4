"""The NVML backend's settings: one frozen Struct, read from the backend's section of the config or from flags."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from gpuplugin.core.config import AbsolutePath, decode, word
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import ContainerSpec, Device

#: Longest event wait allowed: the health thread checks its stop flag between waits, so this bounds shutdown.
MAX_EVENT_WAIT_TIMEOUT_MS = 10_000
#: Longest backoff (seconds) between NVML retries: an hour; longer leaves a repaired node idle for no reason.
MAX_BACKOFF_S = 3600.0
#: Longest wait (seconds) for one ``nvidia-smi`` command: it answers in well under a second on a healthy node.
MAX_NVIDIA_SMI_TIMEOUT_S = 300.0
#: Most consecutive failed event waits tolerated before every GPU is marked Unhealthy.
MAX_WAIT_ERROR_THRESHOLD = 1000


class DeviceIdStrategy(enum.StrEnum):
    """How a GPU is named to the kubelet and in ``NVIDIA_VISIBLE_DEVICES``."""

    UUID = "uuid"
    """``GPU-…``: stable across reboots and driver reloads (NVIDIA's default)."""
    INDEX = "index"
    """``0``, ``1``, …: NVML's enumeration order, which can change when a GPU disappears."""


class NvmlSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
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
    driver_root: AbsolutePath = "/"
    """Where the driver's files live; ``/run/nvidia/driver`` for the GPU operator's containerised driver."""
    device_root: AbsolutePath = "/"
    """The root under which the host's ``/dev`` lives (host paths of device nodes are found under it)."""
    fail_on_init_error: bool = True
    """Raise when NVML cannot start (True), or serve nothing and retry in the background (False)."""
    retry_backoff_initial_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_BACKOFF_S)] = 1.0
    """Seconds (above 0, at most ``rediscover_backoff_max_s``) before the first retry of a failed init,
    rediscovery or event wait; doubles on each failure."""
    rediscover_backoff_max_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_BACKOFF_S)] = 60.0
    """Ceiling in seconds of that backoff (at most ``MAX_BACKOFF_S``, an hour): a minute keeps a broken node's logs
    readable."""
    event_wait_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_EVENT_WAIT_TIMEOUT_MS)] = 1000
    """Milliseconds (1 to 10,000) one NVML event wait blocks; it bounds how long shutdown waits for the thread
    (NVIDIA: 5 s)."""
    wait_error_threshold: Annotated[int, msgspec.Meta(ge=1, le=MAX_WAIT_ERROR_THRESHOLD)] = 3
    """Consecutive failed event waits (1 to ``MAX_WAIT_ERROR_THRESHOLD``) after which every GPU is marked Unhealthy
    (until a wait succeeds again)."""
    sysfs_root: AbsolutePath = "/sys"
    """Where sysfs is mounted; NUMA nodes are read from ``<sysfs_root>/bus/pci/devices/<bus id>/numa_node``."""
    nvidia_smi: str = "nvidia-smi"
    """The ``nvidia-smi`` program (a path, or a name looked up on PATH) that sets and reads GPUs' time-slice
    intervals for DRA claims (``chroot /driver-root nvidia-smi`` is not needed: give the driver root's path)."""
    nvidia_smi_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_NVIDIA_SMI_TIMEOUT_S)] = 30.0
    """Seconds (above 0, at most 300) one ``nvidia-smi`` command may take before its claim fails."""
    report_mig_devices: bool = False
    """Serve the MIG devices of MIG-enabled GPUs (under ``resource``, each with its GPU and compute instance) and
    read every GPU's GPU-instance profiles, instead of skipping MIG-enabled GPUs. The partitioned backend turns
    this on and names the resources; off by default because MIG devices under one name suit few nodes."""

    def __post_init__(self) -> None:
        """Checks across fields, and the model's rule for resource names; they hold however the settings are made."""
        try:
            # The model owns the rule for resource names; a throwaway device applies it.
            Device(id="probe", resource=self.resource, gpu="probe", spec=ContainerSpec())
        except ValueError as error:
            raise ConfigError(f"resource: {error}") from None
        if not self.retry_backoff_initial_s <= self.rediscover_backoff_max_s:
            raise ConfigError(
                f"retry_backoff_initial_s: {self.retry_backoff_initial_s:g} must be at most"
                f" rediscover_backoff_max_s ({self.rediscover_backoff_max_s:g})"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NvmlSettings:
        """Read settings from a config section or flags; keys may use ``-`` or ``_``, values may be text."""
        values = {str(key).replace("-", "_"): value for key, value in options.items()}
        values = {key: word(value) if key in _WORDS else value for key, value in values.items()}
        return decode(values, cls, lax=True)


#: Fields whose text flags may spell in any case (``INDEX``, ``yes``).
_WORDS = frozenset({"device_id_strategy", "pass_device_specs", "fail_on_init_error", "report_mig_devices"})
