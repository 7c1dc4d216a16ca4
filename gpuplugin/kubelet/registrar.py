"""Keeping one served socket registered with the kubelet: by ``Register`` (retried in ``registration``) or, when
the kubelet asks for it, through its plugin watcher; again at once when the kubelet restarts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from gpuplugin.core.instance import SocketIdentity
from gpuplugin.core.tasks import TaskSet
from gpuplugin.kubelet.api import pluginregistration
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.pluginwatcher import WatcherSocket, plugin_info
from gpuplugin.kubelet.registration import RegistrationSettings, plugin_watcher_wanted, register_until_done

log = structlog.get_logger("gpuplugin.kubelet.registrar")


class Registrar:
    """Registers one resource's current socket, supervised: a failure is retried with backoff, and counted."""

    def __init__(
        self,
        resource: str,
        kubelet_dir: Path,
        settings: RegistrationSettings,
        plugins_registry_dir: Path,
        options: Callable[[], api.DevicePluginOptions],
    ) -> None:
        self.resource = resource
        self._kubelet_dir = kubelet_dir
        self._settings = settings
        self._plugins_registry_dir = plugins_registry_dir
        self._options = options
        self._log = log.bind(resource=resource)
        self._tasks = TaskSet(f"server {resource}")
        self._registration: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._watcher: WatcherSocket | None = None
        self._watcher_registered = asyncio.Event()
        self._unreachable_logged = False
        self.socket_path: Path | None = None
        self.registrations = 0
        self.registered_with: SocketIdentity | None = None
        """The kubelet the last accepted Register went to (see ``Registered.kubelet``)."""

    @property
    def registered(self) -> bool:
        return self.registrations > 0 and self._registration is not None and self._registration.done()

    def register(self, path: Path) -> None:
        """Register ``path`` from now on, dropping a registration of an earlier socket still in flight."""
        self.socket_path = path
        if self._registration is not None:
            self._registration.cancel()
        self._wake.clear()
        # The kubelet asked for its plugin watcher (upstream's stub skips Register then).
        register = self._register_with_watcher if plugin_watcher_wanted(self._kubelet_dir) else self._register
        # Supervised: a refused registration (or any failure) is tried again with backoff, and counted.
        self._registration = self._tasks.supervise(lambda: register(path), "register", expect_end=True)

    def register_again(self, kubelet: SocketIdentity | None = None) -> None:
        """Register now (the kubelet restarted): a registration still retrying retries at once, else a new one.

        ``kubelet``: the ``kubelet.sock`` that appeared. A registration already made with that very kubelet (our
        socket was deleted, served again and registered before its creation was noticed) is not made again: the
        kubelet would replace the endpoint with itself and end the stream it had just opened.
        """
        if self._registration is not None and not self._registration.done():
            self._wake.set()
            return
        if kubelet is not None and kubelet == self.registered_with:
            self._log.debug("already registered with this kubelet", endpoint=self.socket_path and self.socket_path.name)
            return
        assert self.socket_path is not None
        self.register(self.socket_path)

    async def aclose(self) -> None:
        """Stop registering and close the plugin-watcher socket."""
        await self._tasks.aclose()
        await self._close_watcher()

    async def _register(self, path: Path) -> None:
        await self._close_watcher()
        registered = await register_until_done(
            self._kubelet_dir / "kubelet.sock",
            endpoint=path.name,
            resource=self.resource,
            options=self._options(),
            settings=self._settings,
            wake=self._wake,
            on_unreachable=self._kubelet_unreachable,
        )
        self._unreachable_logged = False
        self.registered_with = registered.kubelet
        self.registrations += 1
        self._log.info("registered", endpoint=path.name, attempts=registered.attempts, registrations=self.registrations)

    async def _register_with_watcher(self, path: Path) -> None:
        """Serve a fresh plugin-watcher socket for ``path``; done once the kubelet notifies a registration."""
        await self._close_watcher()
        self._watcher_registered.clear()
        self._watcher = await WatcherSocket.serve(
            self._plugins_registry_dir / path.name, plugin_info(self.resource, path), self._watcher_status
        )
        self._log.info("waiting for the kubelet's plugin watcher", socket=str(self._watcher.path), endpoint=str(path))
        await self._watcher_registered.wait()

    def _watcher_status(self, status: pluginregistration.RegistrationStatus) -> None:
        """NotifyRegistrationStatus: a success counts as a registration, a failure is logged."""
        if not status.plugin_registered:
            self._log.error("plugin watcher registration failed", error=status.error)
            return
        self._unreachable_logged = False
        self.registrations += 1
        self._watcher_registered.set()
        endpoint = None if self.socket_path is None else str(self.socket_path)
        self._log.info("registered", via="plugin watcher", endpoint=endpoint, registrations=self.registrations)

    async def _close_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher.close()

    def _kubelet_unreachable(self, error: str) -> None:
        # One line per outage, however many times we serve again and retry during it.
        if not self._unreachable_logged:
            self._unreachable_logged = True
            self._log.warning(
                "kubelet not reachable; retrying with backoff",
                socket=str(self._kubelet_dir / "kubelet.sock"),
                error=error,
            )
