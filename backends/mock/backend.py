"""The mock backend: fake GPUs whose faults a test or a CI script injects at run time."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from gpuplugin.backends.mock.control import (
    DEFAULT_LOST_REASON,
    ControlRequest,
    ControlRequestError,
    ControlServer,
    ControlSocketBusy,
    LoseRequest,
    PlugRequest,
    RecoverRequest,
    StatusRequest,
    TimeslicesRequest,
    UnplugRequest,
    XidRequest,
)
from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings, load_settings
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import (
    AllocationPolicyKind,
    BackendEvent,
    BackendUnavailable,
    HealthChanged,
    InventoryChanged,
    TimeSliceFailed,
    check_timeslice_interval,
)
from gpuplugin.core.clock import REAL_CLOCK, Clock
from gpuplugin.core.model import DeviceTree, Health
from gpuplugin.devices.health import HealthTracker, XidAction

log = structlog.get_logger("gpuplugin.mock")

_FaultKey = tuple[int, tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault a GPU (or one partition of it) is Unhealthy for, as the health tracker holds it."""

    reason: str
    xid: int | None = None
    instance: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """One mock GPU as the control ``status`` reports it."""

    index: int
    uuid: str
    present: bool
    """False while unplugged."""
    lost: bool
    """True from ``lose`` until ``recover``: its probe fails."""
    health: Health
    """Of the whole GPU; faults of single partitions do not change it."""
    faults: tuple[Fault, ...]


class MockBackend:
    """Serves fake GPUs; faults arrive through its methods or its control socket and go through a HealthTracker."""

    name = "mock"

    def __init__(self, ctx: BackendContext, *, settings: MockSettings | None = None, clock: Clock = REAL_CLOCK) -> None:
        """``settings`` given: used as they are; otherwise ``start`` loads them from ``ctx.options``. ``clock``:
        what health quiet periods wait on."""
        self._ctx = ctx
        self._settings: MockSettings | None = None
        self._inventory: Inventory | None = None
        self._events: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self._tracker = HealthTracker(policy=ctx.health_policy, emit=self._on_health, probe=self._probe, clock=clock)
        self._present: set[int] = set()
        self._lost: set[int] = set()
        self._index_of: dict[str, int] = {}
        self._server: ControlServer | None = None
        self.xid_counts: Counter[tuple[int, XidAction]] = Counter()
        """XIDs raised, by (XID, action), for the metrics."""
        self.fault_counts: Counter[str] = Counter()
        self._partitions: dict[int, frozenset[tuple[int, int]]] = {}
        """Served partitions (GPU instance, compute instance) by GPU index, as a partitioned backend over this one
        reports them; a GPU without any is served whole."""
        self._timeslices: dict[int, int] = {}
        """Time-slice intervals set by DRA claims, by GPU index; a GPU not here runs at Default (0)."""
        self.timeslice_sets = 0
        """Calls of ``set_timeslice`` that changed nothing or something: what a test counts to see a GPU left alone."""
        self._state = "new"
        if settings is not None:
            self._use(settings)

    def allocation_policy(self, resource: str) -> AllocationPolicyKind:
        """Whole fake GPUs with a real-looking topology: the core's topology-aware policy."""
        return AllocationPolicyKind.TOPOLOGY

    @property
    def settings(self) -> MockSettings:
        if self._settings is None:
            raise RuntimeError("the mock backend has no settings before start()")
        return self._settings

    async def start(self) -> None:
        """Load settings (the ``config`` YAML file too) and listen on the control socket."""
        if self._state != "new":
            raise RuntimeError(f"the mock backend cannot start when {self._state}")
        self._state = "started"
        if self._settings is None:
            self._use(await load_settings(self._ctx.options, state_dir=self._ctx.state_dir))
        settings = self.settings
        server = ControlServer(settings.control_socket, self.handle)
        try:
            await server.start()
        except ControlSocketBusy as e:
            raise BackendUnavailable(
                f"mock: {e}; one mock backend per control socket (another gpuplugin with this state directory?)"
            ) from None
        except OSError as e:
            raise BackendUnavailable(
                f"mock: cannot listen on control socket {settings.control_socket}: {e.strerror or e}; "
                "set mock.control_socket or the state directory to a writable place"
            ) from None
        self._server = server
        log.info("mock backend started", gpus=settings.gpus, model=settings.model, socket=str(server.path))

    def _use(self, settings: MockSettings) -> None:
        self._settings = settings
        self._inventory = Inventory.build(settings)
        self._present = set(range(settings.gpus))
        self._index_of = {d.id: i for i, d in enumerate(self._inventory.devices)}

    async def discover(self) -> DeviceTree:
        """The present GPUs; those with a GPU-wide fault are Unhealthy."""
        return self._tree()

    async def events(self) -> AsyncIterator[BackendEvent]:
        """Health and inventory changes, in the order they happened, until cancelled."""
        while True:
            yield await self._events.get()

    async def aclose(self) -> None:
        """Close the control server (removing its socket) and the health tracker; safe to call twice."""
        if self._state == "closed":
            return
        self._state = "closed"
        server, self._server = self._server, None
        if server is not None:
            await server.aclose()
        await self._tracker.aclose()

    def xid(self, gpu: int, xid: int, instance: tuple[int, int] | None = None) -> XidAction:
        """Raise an XID on a present GPU (or one partition of it); the health policy decides what it does."""
        uuid = self._uuid(gpu, present=True)
        action = self._tracker.xid(uuid, xid, instance)
        self.xid_counts[(xid, action)] += 1
        return action

    def lose(self, gpu: int, reason: str = DEFAULT_LOST_REASON) -> None:
        """The GPU falls off the bus: Unhealthy, and its probe fails, until ``recover``."""
        uuid = self._uuid(gpu, present=True)
        self._lost.add(gpu)
        self.fault_counts["gpu-lost"] += 1
        self._tracker.lost(uuid, reason)

    def recover(self, gpu: int, instance: tuple[int, int] | None = None) -> None:
        """An operator reset the GPU (or a partition): Healthy now; the whole GPU is no longer lost."""
        uuid = self._uuid(gpu)
        if instance is None:
            self._lost.discard(gpu)
        self._tracker.recovered(uuid, instance)

    def unplug(self, gpu: int) -> bool:
        """Take a GPU out of the inventory; False if it was out already (no event then)."""
        self._uuid(gpu)
        if gpu not in self._present:
            return False
        self._present.discard(gpu)
        self._events.put_nowait(InventoryChanged(self._tree()))
        return True

    def plug(self, gpu: int) -> bool:
        """Return an unplugged GPU, with the faults it had; False if it was present already (no event then)."""
        self._uuid(gpu)
        if gpu in self._present:
            return False
        self._present.add(gpu)
        self._events.put_nowait(InventoryChanged(self._tree()))
        return True

    def status(self) -> tuple[GpuStatus, ...]:
        statuses = []
        held = self._faults()
        for index, device in enumerate(self._require_inventory().devices):
            faults = tuple(fault for (i, _), fault in held.items() if i == index)
            whole = (index, None) in held
            statuses.append(
                GpuStatus(
                    index=index,
                    uuid=device.id,
                    present=index in self._present,
                    lost=index in self._lost,
                    health=Health.UNHEALTHY if whole else Health.HEALTHY,
                    faults=faults,
                )
            )
        return tuple(statuses)

    async def set_timeslice(self, gpu: str, interval: int) -> None:
        """Record the interval of a present GPU (by UUID); TimeSliceFailed for another or a lost one, as the real
        command fails on a GPU that does not answer."""
        index = self._index_of.get(gpu)
        if index is None or index not in self._present:
            raise TimeSliceFailed(f"GPU {gpu}: no such GPU on this node")
        if index in self._lost:
            raise TimeSliceFailed(f"GPU {gpu}: the GPU does not answer (it fell off the bus)")
        check_timeslice_interval(gpu, interval)
        self.timeslice_sets += 1
        if interval:
            self._timeslices[index] = interval
        else:
            self._timeslices.pop(index, None)
        log.info("mock time-slice interval", gpu=gpu, interval=interval)

    async def timeslice(self, gpu: str) -> int | None:
        index = self._index_of.get(gpu)
        if index is None:
            raise TimeSliceFailed(f"GPU {gpu}: no such GPU on this node")
        return self._timeslices.get(index, 0)

    def timeslices(self) -> dict[str, int]:
        """Every GPU's interval by UUID, as the control ``timeslices`` reports it."""
        return {d.id: self._timeslices.get(i, 0) for i, d in enumerate(self._require_inventory().devices)}

    def partitions_served(self, partitions: Mapping[str, Collection[tuple[int, int]]]) -> None:
        """The partitions now served on each GPU (by UUID), from the partitioned backend slicing this one: a control
        request may name only those."""
        self._partitions = {
            self._index_of[gpu]: frozenset(instances)
            for gpu, instances in partitions.items()
            if gpu in self._index_of and instances
        }

    def handle(self, request: ControlRequest) -> dict[str, Any]:
        """Apply one control request; the answer's fields, without ``ok``."""
        # CI scripts poll status; only faults are worth a line at info.
        (log.debug if isinstance(request, StatusRequest) else log.info)("mock control", request=request)
        match request:
            case XidRequest(gpu, xid, instance):
                self._check_instance(gpu, instance)
                action = self.xid(gpu, xid, instance)
                return {**self._named(gpu), "xid": xid, "instance": instance, "action": str(action)}
            case LoseRequest(gpu, reason):
                self.lose(gpu, reason)
                return {**self._named(gpu), "lost": True}
            case RecoverRequest(gpu, instance):
                self._check_instance(gpu, instance)
                self.recover(gpu, instance)
                return {**self._named(gpu), "instance": instance}
            case UnplugRequest(gpu):
                return {**self._named(gpu), "present": False, "changed": self.unplug(gpu)}
            case PlugRequest(gpu):
                return {**self._named(gpu), "present": True, "changed": self.plug(gpu)}
            case StatusRequest():
                return {"gpus": [asdict(s) for s in self.status()]}
            case TimeslicesRequest():
                return {"timeslices": self.timeslices()}

    def _check_instance(self, gpu: int, instance: tuple[int, int] | None) -> None:
        """A request's partition must be one served on that GPU: on a whole GPU it would change nothing."""
        if instance is None:
            return
        self._uuid(gpu)
        served = self._partitions.get(gpu)
        if served is None:
            raise ControlRequestError(
                f"instance: GPU {gpu} is not partitioned (it is served whole); leave out the instance, or serve it "
                "through the partitioned backend"
            )
        if instance not in served:
            listed = " ".join(f"{gi},{ci}" for gi, ci in sorted(served))
            raise ControlRequestError(
                f"instance: GPU {gpu} has no partition {instance[0]},{instance[1]}; it has {listed}"
            )

    def _named(self, gpu: int) -> dict[str, Any]:
        return {"gpu": gpu, "uuid": self._uuid(gpu)}

    def _uuid(self, gpu: int, *, present: bool = False) -> str:
        devices = self._require_inventory().devices
        if not 0 <= gpu < len(devices):
            raise ControlRequestError(f"gpu: index {gpu} out of range 0..{len(devices) - 1}")
        if present and gpu not in self._present:
            raise ControlRequestError(f"gpu: GPU {gpu} is unplugged; plug it first")
        return devices[gpu].id

    def _require_inventory(self) -> Inventory:
        if self._inventory is None:
            raise RuntimeError("the mock backend has no GPUs before start()")
        return self._inventory

    def _tree(self) -> DeviceTree:
        unhealthy = {i for i, instance in self._faults() if instance is None}
        return self._require_inventory().tree(self._present, unhealthy)

    def _faults(self) -> dict[_FaultKey, Fault]:
        """The tracker's faults by (GPU index, instance): the one record of them, escalations included."""
        return {
            (self._index_of[gpu], instance): Fault(reason=reason, xid=xid, instance=instance)
            for (gpu, instance), (reason, xid) in self._tracker.faults().items()
            if gpu in self._index_of
        }

    def _on_health(self, event: HealthChanged) -> None:
        self._events.put_nowait(event)

    async def _probe(self, gpu: str) -> bool:
        """A mock GPU answers unless it was lost."""
        return self._index_of.get(gpu) not in self._lost
