"""The simulated kubelet's state, shared by its parts: the plugins connected, the devices they list, the pods
holding devices, and what happened (registrations, rejections, stream ends, restarts), with one condition that
every change notifies and an optional listener that hears each event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from grpclib.client import Channel

from gpuplugin.core.model import Health
from gpuplugin.core.tasks import TaskSet
from gpuplugin.kubelet.api import v1beta1

log = structlog.get_logger("gpuplugin.testing.node")

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT_FILE = "kubelet_internal_checkpoint"
DEPRECATION_FILE = "DEPRECATION"


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """How the simulated kubelet behaves where tests want it faster or stricter than the real one."""

    dial_timeout_s: float = 10.0
    """How long Register keeps dialling the plugin's socket; the kubelet's blocking dial gives up after 10 s."""
    dial_backoff_first_s: float = 0.01
    """Seconds, the ceiling of the first wait between two dials (jittered, doubling); far shorter than grpc-go's 1 s,
    so that a test does not wait on a socket that appeared a moment after Register."""
    dial_backoff_max_s: float = 1.0
    """Seconds, the ceiling of every wait between two dials."""
    options_timeout_s: float = 10.0
    """Deadline of GetDevicePluginOptions during Register; the kubelet sets none, but a test must not hang."""
    preferred_allocation_timeout_s: float | None = None
    """Deadline of GetPreferredAllocation; None, as in the kubelet, so a slow plugin shows as slow admission."""
    allocate_timeout_s: float | None = None
    """Deadline of Allocate; None, as in the kubelet (a hung Allocate blocks the node: kubernetes #117435)."""
    pre_start_timeout_s: float = 30.0
    """Deadline of PreStartContainer; the kubelet's KubeletPreStartContainerRPCTimeoutInSecs."""
    wipe_on_start: bool = True
    """Delete stale sockets on ``start()`` as the kubelet does at every start; off for tests that pre-place files."""
    plugins_registry_dir: Path | None = None
    """When set, play the plugin watcher too: write ``DEPRECATION`` and register the plugins whose sockets appear
    in this directory (``Register`` on ``kubelet.sock`` keeps working, as in the kubelet)."""
    registry_poll_s: float = 0.05
    """How often the plugin watcher looks at ``plugins_registry_dir`` (the kubelet uses fsnotify)."""
    get_info_timeout_s: float = 1.0
    """Deadline of GetInfo; the kubelet's plugin watcher gives it one second."""
    notify_timeout_s: float = 5.0
    """Deadline of NotifyRegistrationStatus, as in the kubelet's plugin watcher."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One accepted Register call."""

    index: int
    """Position among all accepted registrations (what ``wait_registered(after=...)`` counts)."""
    resource: str
    endpoint: str
    options: v1beta1.DevicePluginOptions
    """What GetDevicePluginOptions answered: the kubelet uses these, not the ones in the request."""
    request_options: v1beta1.DevicePluginOptions | None
    monotonic_s: float
    """``time.monotonic()`` when Register was answered."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """One Register call answered with an error."""

    resource: str
    endpoint: str
    version: str
    message: str
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A current endpoint's ListAndWatch stream ended; its resource went to allocatable 0."""

    resource: str
    endpoint: str
    error: str | None
    """None when the plugin closed the stream cleanly."""
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class Restart:
    """One simulated kubelet restart."""

    started_monotonic_s: float
    """When connections were dropped: the kubelet process died."""
    served_monotonic_s: float
    """When ``kubelet.sock`` was served again: the earliest a plugin can re-register."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device as the last ListAndWatch message described it."""

    health: str
    numa_nodes: tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        # The kubelet counts anything but the exact "Healthy" string as unhealthy.
        return self.health == Health.HEALTHY


@dataclass(frozen=True, slots=True)
class DevicesListed:
    """A ListAndWatch message from a current endpoint: the resource's device list from now on."""

    resource: str
    endpoint: str
    devices: tuple[tuple[str, DeviceState], ...]
    """Device ID and state, in the order the plugin listed them."""
    monotonic_s: float

    @property
    def healthy(self) -> int:
        return sum(d.healthy for _, d in self.devices)

    @property
    def unhealthy(self) -> int:
        return len(self.devices) - self.healthy


@dataclass(frozen=True, slots=True)
class Misbehaviour:
    """Something a plugin did that the kubelet tolerates (a bad preferred allocation, an over-long ID)."""

    message: str
    monotonic_s: float


#: What a listener hears, as it happens.
KubeletEvent = Registration | Rejection | DevicesListed | StreamEnd | Restart | Misbehaviour


class Endpoint:
    """One registered plugin socket: its channel, options and ListAndWatch task."""

    __slots__ = ("channel", "endpoint", "options", "resource", "stopped", "stream_open", "stub", "task")

    def __init__(self, resource: str, endpoint: str, channel: Channel, options: v1beta1.DevicePluginOptions) -> None:
        self.resource = resource
        self.endpoint = endpoint
        self.channel = channel
        self.stub = v1beta1.DevicePluginStub(channel)
        self.options = options
        self.task: asyncio.Task[None] | None = None
        self.stream_open = False
        self.stopped = False


# pod -> container -> resource -> device IDs: the same shape as the checkpoint file.
PodDevices = dict[str, dict[str, dict[str, tuple[str, ...]]]]


class NodeState:
    """Everything the simulated kubelet knows; its parts change it and call ``notify``."""

    def __init__(
        self,
        directory: Path,
        settings: SimulatorSettings,
        on_event: Callable[[KubeletEvent], None] | None = None,
    ) -> None:
        self.directory = directory
        self.settings = settings
        self.tasks = TaskSet("kubelet-simulator")
        self.changed = asyncio.Condition()
        # Serialises checkpoint writes (newest snapshot last) and keeps a restart's wipe off a half-written file.
        self.checkpoint_lock = asyncio.Lock()
        self.endpoints: dict[str, Endpoint] = {}
        self.devices: dict[str, dict[str, DeviceState]] = {}
        self.pods: PodDevices = {}
        self.registrations: list[Registration] = []
        self.rejections: list[Rejection] = []
        self.stream_ends: list[StreamEnd] = []
        self.restarts: list[Restart] = []
        self.warnings: list[str] = []
        self._on_event = on_event

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    @property
    def plugin_watcher(self) -> bool:
        """Whether this kubelet asks for plugin-watcher registration (it writes ``DEPRECATION``)."""
        return self.settings.plugins_registry_dir is not None

    def emit(self, event: KubeletEvent) -> None:
        """Tell the listener, if any, what just happened."""
        if self._on_event is not None:
            self._on_event(event)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("plugin misbehaved", detail=message)
        self.emit(Misbehaviour(message, time.monotonic()))

    def allocatable(self, resource: str) -> int:
        """Healthy devices, allocated or not: what the kubelet reports as the node's allocatable."""
        return sum(d.healthy for d in self.devices.get(resource, {}).values())

    def in_use(self, resource: str) -> set[str]:
        return {i for containers in self.pods.values() for r in containers.values() for i in r.get(resource, ())}

    def available(self, resource: str) -> list[str]:
        """Healthy devices not held by any pod: what the next admission may take."""
        in_use = self.in_use(resource)
        return [i for i, d in self.devices.get(resource, {}).items() if d.healthy and i not in in_use]
