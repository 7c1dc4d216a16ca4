"""The DRA driver of one node: a backend's tree, with health events folded in, served to the kubelet by the DRA
plugin and published to the API server as ResourceSlices, both following every change."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol

import structlog

from gpuplugin.core.backend import Backend, HealthChanged, InventoryChanged
from gpuplugin.core.model import DeviceTree
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.health import OpenFaults
from gpuplugin.dra.claims import ClaimSource
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.plugin import DraPlugin

log = structlog.get_logger("gpuplugin.dra.node")


class Publisher(Protocol):
    """Where every tree goes besides the kubelet (``SlicePublisher``: the API server's ResourceSlices)."""

    async def publish(self, tree: DeviceTree) -> None: ...

    async def reconcile(self) -> None:
        """Publish again if what the API server holds is not what was last published."""

    async def aclose(self) -> None: ...


class DraDriver:
    """Runs ``backend`` for DRA: ``tree`` is what it discovered with every fault still open marked Unhealthy."""

    def __init__(
        self,
        backend: Backend,
        settings: DriverSettings,
        claims: ClaimSource,
        publisher: Publisher | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.publisher = publisher
        self.plugin = DraPlugin(settings, lambda: self.tree, claims, backend=backend)
        self.plugin.registration.on_registered = self._kubelet_registered
        self.discovered = DeviceTree()
        self.tree = DeviceTree()
        self._faults = OpenFaults()
        self._tasks = TaskSet("dra")
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the backend, publish its devices, serve the plugin, then follow the backend's events."""
        await self.backend.start()
        try:
            await self.apply(await self.backend.discover())
            await self.plugin.start()
        except BaseException:
            await self.backend.aclose()
            raise
        self._tasks.supervise(self._follow_backend, "backend events")

    def _kubelet_registered(self) -> None:
        if self.publisher is not None:
            self._tasks.spawn(self.publisher.reconcile(), "reconcile slices", expect_end=True)

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self.plugin.aclose()
        if self.publisher is not None:
            await self.publisher.aclose()
        await self.backend.aclose()

    async def rediscover(self) -> None:
        await self.apply(await self.backend.discover())

    async def apply(self, discovered: DeviceTree) -> None:
        async with self._lock:
            self.discovered = discovered
            self.tree = dataclasses.replace(discovered, devices=self._faults.fold(discovered.devices))
            # The kubelet first: a slow API server must not hold back what the node itself reports.
            await self.plugin.tree_changed()
            if self.publisher is not None:
                await self.publisher.publish(self.tree)

    async def on_health(self, event: HealthChanged) -> None:
        discovered = self._faults.record(event, self.discovered)
        if discovered is None:
            return
        self.discovered = discovered
        log.info("health changed", gpu=event.gpu, instance=event.instance, health=str(event.health), xid=event.xid)
        await self.apply(self.discovered)

    async def _follow_backend(self) -> None:
        async for event in self.backend.events():
            if isinstance(event, InventoryChanged):
                await self.apply(event.tree)
            else:
                await self.on_health(event)
