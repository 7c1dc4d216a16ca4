"""Registration through the kubelet's plugin watcher, for kubelets that ask for it with a ``DEPRECATION`` file.

Such a kubelet watches ``/var/lib/kubelet/plugins_registry`` for sockets; on each new one it calls ``GetInfo``,
dials the device plugin at the ``endpoint`` the answer names (an absolute socket path), asks for its options,
opens ListAndWatch, and reports the outcome with ``NotifyRegistrationStatus``. This module serves that
``pluginregistration.Registration`` service on one socket; the device plugin itself keeps its own socket in the
device-plugins directory (upstream ``pkg/kubelet/cm/devicemanager/plugin/v1beta1/stub.go`` does the same dance).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import structlog
from grpclib.server import Server

from gpuplugin.kubelet.api import pluginregistration as api
from gpuplugin.kubelet.registration import API_VERSION

log = structlog.get_logger("gpuplugin.kubelet.pluginwatcher")

DEFAULT_PLUGINS_REGISTRY_DIR = Path("/var/lib/kubelet/plugins_registry")
DEVICE_PLUGIN_TYPE = "DevicePlugin"
"""``PluginInfo.type`` of a device plugin (upstream ``pluginregistration/v1`` constant ``DevicePlugin``)."""


def plugin_info(resource: str, endpoint: Path) -> api.PluginInfo:
    """What ``GetInfo`` answers: the resource served by the device-plugin socket at ``endpoint``."""
    return api.PluginInfo(
        type=DEVICE_PLUGIN_TYPE, name=resource, endpoint=str(endpoint), supported_versions=[API_VERSION]
    )


class RegistrationService(api.RegistrationBase):
    """Answers the plugin watcher: ``GetInfo`` with fixed info, ``NotifyRegistrationStatus`` to ``on_status``."""

    def __init__(self, info: api.PluginInfo, on_status: Callable[[api.RegistrationStatus], None]) -> None:
        self._info = info
        self._on_status = on_status

    async def get_info(self, message: api.InfoRequest) -> api.PluginInfo:
        log.debug("GetInfo", name=self._info.name, endpoint=self._info.endpoint)
        return self._info

    async def notify_registration_status(self, message: api.RegistrationStatus) -> api.RegistrationStatusResponse:
        self._on_status(message)
        return api.RegistrationStatusResponse()


class WatcherSocket:
    """The Registration service served on one socket in the plugins registry directory."""

    def __init__(self, path: Path, server: Server) -> None:
        self.path = path
        self._server = server

    @classmethod
    async def serve(
        cls, path: Path, info: api.PluginInfo, on_status: Callable[[api.RegistrationStatus], None]
    ) -> WatcherSocket:
        """Serve at ``path`` (replacing a stale socket there); the plugin watcher notices it by its creation."""
        # The kubelet creates the directory at start; a plugin that starts first must not fail for want of it.
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        server = Server([RegistrationService(info, on_status)])
        try:
            await server.start(path=str(path))
        except BaseException:
            # Cancelled or failed half-way: leave neither a listening server nor a socket file behind.
            with contextlib.suppress(RuntimeError):
                server.close()
            _remove(path)
            raise
        log.debug("serving plugin-watcher registration", socket=str(path), name=info.name, endpoint=info.endpoint)
        return cls(path, server)

    async def close(self) -> None:
        """Stop serving and remove the socket: the plugin watcher deregisters the plugin when it goes."""
        self._server.close()
        try:
            await self._server.wait_closed()
        finally:
            _remove(self.path)


def _remove(path: Path) -> None:
    # One unlink, cheap enough for the event loop, and safe to run while a cancellation unwinds (no await).
    path.unlink(missing_ok=True)
