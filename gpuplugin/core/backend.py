"""The backend interface: how the core learns which devices exist and how healthy they are.

A backend is a small object with a life cycle (``start``/``aclose``), a ``discover`` that returns the whole
device tree, and ``events``, a stream of inventory and health changes. Everything else a backend may offer is an
optional capability, a protocol of its own; the resource servers advertise ``DevicePluginOptions`` from the
capabilities a backend has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gpuplugin.core.model import AllocationPolicyKind, ContainerSpec, DeviceTree, Health

__all__ = [
    "AllocationPolicyKind",
    "Backend",
    "BackendEvent",
    "BackendUnavailable",
    "CustomAllocate",
    "HealthChanged",
    "InventoryChanged",
    "PreStart",
    "PreferredAllocation",
    "TIMESLICE_INTERVALS",
    "TimeSliceControl",
    "TimeSliceFailed",
    "check_timeslice_interval",
]


@dataclass(frozen=True, slots=True)
class InventoryChanged:
    """The set of devices changed (a GPU appeared or vanished, a layout changed): here is the new tree."""

    tree: DeviceTree


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """A physical GPU, or one partition on it, turned unhealthy or recovered.

    The core fans it out: with ``instance`` None it reaches every device living on ``gpu`` (the GPU itself, its
    replicas and its partitions); with ``instance`` set it reaches only the partition with that instance pair.
    """

    gpu: str
    health: Health
    reason: str
    """Why, in words an operator can act on (``XID 79: GPU has fallen off the bus``)."""
    xid: int | None = None
    instance: tuple[int, int] | None = None


BackendEvent = InventoryChanged | HealthChanged


@runtime_checkable
class Backend(Protocol):
    """A source of devices. Blocking work (NVML, sysfs) happens in threads, never on the event loop."""

    name: str

    async def start(self) -> None:
        """Acquire what the backend needs (a library, a control socket). Raises BackendUnavailable."""

    async def discover(self) -> DeviceTree:
        """Return every device the backend serves now."""

    def events(self) -> AsyncIterator[BackendEvent]:
        """Yield inventory and health changes until cancelled."""

    async def aclose(self) -> None:
        """Release everything ``start`` acquired; safe to call twice."""


@runtime_checkable
class PreferredAllocation(Protocol):
    """A backend that wants GetPreferredAllocation advertised, and with which policy per resource."""

    def allocation_policy(self, resource: str) -> AllocationPolicyKind: ...


@runtime_checkable
class CustomAllocate(Protocol):
    """A backend that builds the container spec of a device set itself.

    Called on the Allocate path: it must not block, do I/O or await. Returning None falls back to the default
    merge of the devices' own specs.
    """

    def container_spec(self, resource: str, device_ids: Sequence[str]) -> ContainerSpec | None: ...


@runtime_checkable
class PreStart(Protocol):
    """A backend that prepares devices before each container starts (the kubelet gives it 30 s)."""

    async def pre_start_container(self, resource: str, device_ids: Sequence[str]) -> None: ...


@runtime_checkable
class TimeSliceControl(Protocol):
    """A backend that sets how long each process on a GPU runs before the next one (the GPU's compute time slice).

    Intervals are NVIDIA's: 0 Default, 1 Short, 2 Medium, 3 Long (``nvidia-smi compute-policy --set-timeslice``).
    A backend without this capability serves time-sliced claims at whatever interval the GPU has.
    """

    async def set_timeslice(self, gpu: str, interval: int) -> None:
        """Set the interval of the GPU with this UUID; raises TimeSliceFailed with one line saying why."""

    async def timeslice(self, gpu: str) -> int | None:
        """The interval the GPU reports now (None: it reports none we can read); raises TimeSliceFailed."""


class TimeSliceFailed(Exception):
    """A GPU's time-slice interval could not be set or read; the message names the GPU and the cause."""


TIMESLICE_INTERVALS = ("Default", "Short", "Medium", "Long")
"""NVIDIA's names of the time-slice intervals, by number."""


def check_timeslice_interval(gpu: str, interval: int) -> None:
    """Raise TimeSliceFailed unless ``interval`` is one of NVIDIA's numbers."""
    if not 0 <= interval < len(TIMESLICE_INTERVALS):
        raise TimeSliceFailed(f"GPU {gpu}: time-slice interval {interval} is not 0 to {len(TIMESLICE_INTERVALS) - 1}")


class BackendUnavailable(Exception):
    """The backend cannot reach its devices (a library is missing, a driver does not answer).

    Retrying helps only once the cause named in the message is fixed; the message says what to do.
    """
