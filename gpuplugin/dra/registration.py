"""Registration of the DRA plugin through the kubelet's plugin watcher (``plugins_registry``).

The kubelet finds our registration socket, asks ``GetInfo`` for the plugin type ``DRAPlugin``, the driver name,
the DRA socket (``endpoint``) and the gRPC services we serve, picks the newest it knows, and reports the outcome
with ``NotifyRegistrationStatus``. The socket and its service are the device plugin's own (``WatcherSocket``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.health import HEALTH_SERVICE
from gpuplugin.dra.service import SUPPORTED_SERVICES
from gpuplugin.kubelet.api import pluginregistration as api
from gpuplugin.kubelet.pluginwatcher import WatcherSocket

log = structlog.get_logger("gpuplugin.dra.registration")

DRA_PLUGIN_TYPE = "DRAPlugin"
"""``PluginInfo.type`` of a DRA kubelet plugin (upstream ``pluginregistration/v1`` constant ``DRAPlugin``)."""


def plugin_info(settings: DriverSettings) -> api.PluginInfo:
    return api.PluginInfo(
        type=DRA_PLUGIN_TYPE,
        name=settings.driver_name,
        endpoint=str(settings.socket_path),
        supported_versions=[*SUPPORTED_SERVICES, HEALTH_SERVICE],
    )


class Registration:
    """The registration socket, and what the kubelet last said about it."""

    def __init__(self, settings: DriverSettings) -> None:
        self._settings = settings
        self._socket: WatcherSocket | None = None
        self.registered = asyncio.Event()
        """Set once the kubelet reports the plugin registered; cleared when it reports a failure."""
        self.error: str | None = None
        self.on_registered: Callable[[], None] | None = None
        """Called each time the kubelet reports the plugin registered: a kubelet that has just started has
        deleted the node's ResourceSlices."""

    async def start(self) -> None:
        self._socket = await WatcherSocket.serve(
            self._settings.registration_path, plugin_info(self._settings), self._on_status
        )

    def _on_status(self, status: api.RegistrationStatus) -> None:
        if status.plugin_registered:
            self.error = None
            self.registered.set()
            log.info("kubelet registered the DRA plugin", driver=self._settings.driver_name)
            if self.on_registered is not None:
                self.on_registered()
        else:
            self.error = status.error
            self.registered.clear()
            log.error("kubelet refused the DRA plugin", driver=self._settings.driver_name, error=status.error)

    async def close(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            await socket.close()
