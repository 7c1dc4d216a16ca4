"""Device health for the kubelet's ``DRAResourceHealth`` service (v1alpha1, behind the 1.34 kubelet's
ResourceHealthStatus gate): a stream per kubelet connection, the full list of the driver's devices first and again
whenever one's health changes, so the kubelet can show it in the pod status of pods using the device."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream

from gpuplugin.core.model import DeviceTree, Health
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.service import MalformedMessage
from gpuplugin.kubelet.api import v1alpha1 as api

HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"
"""How ``PluginInfo.supported_versions`` names it."""
_STATUS = {Health.HEALTHY: api.HealthStatus.HEALTHY, Health.UNHEALTHY: api.HealthStatus.UNHEALTHY}

Snapshot = tuple[tuple[str, Health], ...]


class HealthFeed:
    """The health of every device of the tree ``tree()`` returns, and a way to wait for it to change."""

    def __init__(self, tree: Callable[[], DeviceTree]) -> None:
        self._tree = tree
        self._version = 0
        self._closed = False
        self._changed = asyncio.Condition()

    def snapshot(self) -> Snapshot:
        return tuple((name, device.health) for name, device in device_names(self._tree()).items())

    async def tree_changed(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def close(self) -> None:
        """End every stream that follows the feed."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _news(self, seen: int) -> Callable[[], bool]:
        return lambda: self._closed or self._version != seen

    async def follow(self) -> AsyncIterator[Snapshot]:
        """The snapshot now, then each one that differs from the last, until the feed closes."""
        sent: Snapshot | None = None
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(self._news(seen))
                if self._closed:
                    return
                seen = self._version
            current = self.snapshot()
            if current != sent:
                sent = current
                yield current


class HealthService:
    """``v1alpha1.DRAResourceHealth``; grpclib calls the handler from ``__mapping__``."""

    def __init__(self, settings: DriverSettings, feed: HealthFeed) -> None:
        self._settings = settings
        self._feed = feed

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/{HEALTH_SERVICE}/NodeWatchResources": Handler(
                self._watch, Cardinality.UNARY_STREAM, api.NodeWatchResourcesRequest, api.NodeWatchResourcesResponse
            )
        }

    async def _watch(self, stream: Stream[Any, Any]) -> None:
        try:
            await stream.recv_message()
        except MalformedMessage as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed NodeWatchResources request: {exc}") from None
        async for snapshot in self._feed.follow():
            await stream.send_message(self.response(snapshot, int(time.time())))

    def response(self, snapshot: Snapshot, now_s: int) -> api.NodeWatchResourcesResponse:
        return api.NodeWatchResourcesResponse(
            devices=[
                api.DeviceHealth(
                    device=api.DeviceIdentifier(pool_name=self._settings.pool, device_name=name),
                    health=_STATUS.get(health, api.HealthStatus.UNKNOWN),
                    last_updated_time=now_s,
                )
                for name, health in snapshot
            ]
        )
