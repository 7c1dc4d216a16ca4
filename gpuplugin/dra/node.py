"""The DRA driver of one node: a backend's tree, with health events folded in, served to the kubelet by the DRA
plugin and published to the API server as ResourceSlices, both following every change."""

from __future__ import annotations

import asyncio
import dataclasses
from types import MappingProxyType
from typing import Protocol

import structlog

from gpuplugin.core.backend import Backend, HealthChanged, InventoryChanged
from gpuplugin.core.clock import REAL_CLOCK, Clock
from gpuplugin.core.model import DeviceTree, Health
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.health import OpenFaults
from gpuplugin.dra.claims import ClaimSource
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.plugin import DraPlugin
from gpuplugin.dra.slices import FaultKey, Reasons, with_whole_gpus

log = structlog.get_logger("gpuplugin.dra.node")

#: After each registration with the kubelet, the node's slices are checked at once and then every second for this
#: many seconds. A starting kubelet deletes the node's slices in the background once it has found its Node object,
#: which can be seconds after the plugin registered with it again; the publisher's own 30 s check would leave the
#: node without slices until then.
CHECKS_AFTER_REGISTRATION_S = 15


class Publisher(Protocol):
    """Where every tree goes besides the kubelet (``SlicePublisher``: the API server's ResourceSlices)."""

    async def publish(self, tree: DeviceTree, reasons: Reasons) -> None:
        """Publish ``tree``; ``reasons`` says why each open fault is open."""

    async def reconcile(self) -> None:
        """Publish again if what the API server holds is not what was last published."""

    async def aclose(self) -> None: ...


class DraDriver:
    """Runs ``backend`` for DRA: ``tree`` is what it discovered with every fault still open marked Unhealthy, and the
    whole GPU of each GPU served as placed partitions (published where counters keep them apart)."""

    def __init__(
        self,
        backend: Backend,
        settings: DriverSettings,
        claims: ClaimSource,
        publisher: Publisher | None = None,
        *,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        self.backend = backend
        self._clock = clock
        self.settings = settings
        self.publisher = publisher
        self.plugin = DraPlugin(settings, lambda: self.tree, claims, backend=backend)
        self.plugin.registration.on_registered = self._kubelet_registered
        self.discovered = DeviceTree()
        self.tree = DeviceTree()
        self._faults = OpenFaults()
        self._reasons: dict[FaultKey, str] = {}
        self._tasks = TaskSet("dra")
        self._lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        self.registrations = 0
        """Times the kubelet reported the plugin registered (a count for metrics)."""
        self._checking: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the backend, publish its devices, serve the plugin, then follow the backend's events."""
        await self.backend.start()
        try:
            await self.apply(await self.backend.discover())
            await self.plugin.start()
        except BaseException:
            await self.backend.aclose()
            raise
        self._follower = self._tasks.supervise(self._follow_backend, "backend events")

    def _kubelet_registered(self) -> None:
        self.registrations += 1
        if self.publisher is not None:
            if self._checking is not None:
                self._checking.cancel()
            self._checking = self._tasks.spawn(self._check_slices(self.publisher), "check slices", expect_end=True)

    async def _check_slices(self, publisher: Publisher) -> None:
        await publisher.reconcile()
        for _ in range(CHECKS_AFTER_REGISTRATION_S):
            await self._clock.sleep(1.0)
            await publisher.reconcile()

    async def aclose(self) -> None:
        # The registration socket is still served while the tasks end: a report from the kubelet then must start
        # no slice check (the closing task set refuses new tasks, and the kubelet would get an error back).
        self.plugin.registration.on_registered = None
        await self._tasks.aclose()
        await self.plugin.aclose()
        if self.publisher is not None:
            await self.publisher.aclose()
        await self.backend.aclose()

    async def replace_backend(self, backend: Backend) -> None:
        """Serve ``backend`` instead (a reloaded config): the old one is closed first (both may want the same files
        and sockets), the new one's devices applied and published; its health starts afresh, as after a restart.
        Raises what the new backend's start raises, the old one already closed."""
        if self._follower is not None:
            self._follower.cancel()
        await self.backend.aclose()
        self.backend = backend
        self.plugin.preparer.use_backend(backend)
        self._faults.clear()
        await backend.start()
        await self.apply(await backend.discover())
        self._follower = self._tasks.supervise(self._follow_backend, "backend events")

    async def rediscover(self) -> None:
        await self.apply(await self.backend.discover())

    async def apply(self, discovered: DeviceTree) -> None:
        async with self._lock:
            self.discovered = discovered
            self.tree = with_whole_gpus(dataclasses.replace(discovered, devices=self._faults.fold(discovered.devices)))
            # The kubelet first: a slow API server must not hold back what the node itself reports.
            await self.plugin.tree_changed()
            if self.publisher is not None:
                await self.publisher.publish(self.tree, MappingProxyType(dict(self._reasons)))

    async def on_health(self, event: HealthChanged) -> None:
        discovered = self._faults.record(event, self.discovered)
        if discovered is None:
            return
        self.discovered = discovered
        if event.health is Health.HEALTHY:
            self._reasons.pop((event.gpu, event.instance), None)
        else:
            self._reasons[(event.gpu, event.instance)] = event.reason
        log.info("health changed", gpu=event.gpu, instance=event.instance, health=str(event.health), xid=event.xid)
        await self.apply(self.discovered)

    async def _follow_backend(self) -> None:
        async for event in self.backend.events():
            if isinstance(event, InventoryChanged):
                await self.apply(event.tree)
            else:
                await self.on_health(event)
