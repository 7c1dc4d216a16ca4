"""The kubelet's plugin watcher (``pkg/kubelet/pluginmanager``), for device plugins only.

Played when ``plugins_registry_dir`` is set, as by a kubelet that writes ``DEPRECATION`` into the device-plugins
directory: a socket created in the registry directory is asked ``GetInfo``, the device plugin at its ``endpoint``
is dialled and registered exactly as ``Register`` would, and the outcome is reported with
``NotifyRegistrationStatus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

import grpclib
import structlog
from grpclib.client import Channel

from gpuplugin.kubelet.api import pluginregistration, v1beta1
from gpuplugin.testing.node import DEPRECATION_FILE, NodeState
from gpuplugin.testing.registration_server import RPC_FAILURES, SUPPORTED_VERSION, RegistrationServer

log = structlog.get_logger("gpuplugin.testing.plugin_watcher")

DEVICE_PLUGIN_TYPE = "DevicePlugin"


class _WatchedSocket:
    """A socket the plugin watcher found, and its registration while that is in flight."""

    __slots__ = ("identity", "task")

    def __init__(self, identity: tuple[int, int], task: asyncio.Task[None]) -> None:
        self.identity = identity
        self.task = task


class PluginWatcher:
    """Watches the registry directory and registers each plugin socket created there."""

    def __init__(self, state: NodeState, registration: RegistrationServer) -> None:
        self._state = state
        self._settings = state.settings
        self._registration = registration
        self._registry_watch: asyncio.Task[None] | None = None

    def write_deprecation(self) -> None:
        registry = self._settings.plugins_registry_dir
        if registry is not None:
            registry.mkdir(parents=True, exist_ok=True)
            (self._state.directory / DEPRECATION_FILE).touch()

    def start(self) -> None:
        registry = self._settings.plugins_registry_dir
        if registry is not None:
            self._registry_watch = self._state.tasks.spawn(self._watch_registry(registry), "plugin-watcher")

    async def stop(self) -> None:
        task, self._registry_watch = self._registry_watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_registry(self, registry: Path) -> None:
        """Register each socket created in ``registry``; a socket removed stops its registration still in flight."""
        watched: dict[str, _WatchedSocket] = {}
        try:
            while True:
                sockets = await asyncio.to_thread(_sockets_in, registry)
                for name, socket in list(watched.items()):
                    if sockets.get(name) != socket.identity:
                        del watched[name]
                        socket.task.cancel()
                for name, identity in sockets.items():
                    if name not in watched:
                        task = self._state.tasks.spawn(
                            self._register_watched(registry / name), f"plugin-watcher:{name}", expect_end=True
                        )
                        watched[name] = _WatchedSocket(identity, task)
                await asyncio.sleep(self._settings.registry_poll_s)
        finally:
            for socket in watched.values():
                socket.task.cancel()

    async def _register_watched(self, socket: Path) -> None:
        """The plugin watcher's RegisterPlugin: GetInfo, register as ``Register`` does, NotifyRegistrationStatus."""
        channel = Channel(path=str(socket))
        try:
            stub = pluginregistration.RegistrationStub(channel)
            try:
                await self._registration.dial(channel)
                info = await stub.get_info(pluginregistration.InfoRequest(), timeout=self._settings.get_info_timeout_s)
            except RPC_FAILURES as exc:
                log.warning("plugin watcher: GetInfo failed", socket=str(socket), error=repr(exc))
                return
            error = await self._register_plugin(socket, info)
            status = pluginregistration.RegistrationStatus(plugin_registered=error is None, error=error or "")
            try:
                await stub.notify_registration_status(status, timeout=self._settings.notify_timeout_s)
            except RPC_FAILURES as exc:
                log.warning("plugin watcher: NotifyRegistrationStatus failed", socket=str(socket), error=repr(exc))
        finally:
            channel.close()

    async def _register_plugin(self, socket: Path, info: pluginregistration.PluginInfo) -> str | None:
        """Validate and connect the plugin ``info`` describes; the error NotifyRegistrationStatus reports, if any."""
        log.info("plugin watcher found a plugin", socket=str(socket), type=info.type, name=info.name)
        request = v1beta1.RegisterRequest(
            version=SUPPORTED_VERSION
            if SUPPORTED_VERSION in info.supported_versions
            else ",".join(info.supported_versions),
            # An empty endpoint means the registration socket itself; an absolute one stays as it is.
            endpoint=info.endpoint or str(socket),
            resource_name=info.name,
        )
        try:
            if info.type != DEVICE_PLUGIN_TYPE:
                raise await self._registration.reject(request, f"no handler registered for plugin type: {info.type}")
            await self._registration.register(request)
        except grpclib.GRPCError as exc:
            return f"RegisterPlugin error -- {exc.message}"
        return None


def _sockets_in(directory: Path) -> dict[str, tuple[int, int]]:
    """The sockets in ``directory`` by name, with their inode and ctime: a socket created again is a new one."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    sockets: dict[str, tuple[int, int]] = {}
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISSOCK(info.st_mode):
                sockets[entry.name] = (info.st_ino, info.st_ctime_ns)
    return sockets
