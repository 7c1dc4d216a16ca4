"""The manager: holds the current device tree, serves one resource server per resource name, folds health in.

It diffs every new tree against the served one and starts, updates or stops servers; it fans a physical GPU's
health events out to every replica and partition living on it, so every backend gets that for free.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from gpuplugin.core.backend import Backend, HealthChanged, InventoryChanged
from gpuplugin.core.instance import InstanceLock, SocketIdentity
from gpuplugin.core.model import DeviceTree
from gpuplugin.core.tasks import SupervisionSettings, TaskSet
from gpuplugin.devices.health import OpenFaults, reaches
from gpuplugin.kubelet.server import ResourceServer, ServerSettings
from gpuplugin.kubelet.watcher import KUBELET_SOCKET, SocketWatcher, WatcherSettings

log = structlog.get_logger("gpuplugin.daemon.manager")

ServerFactory = Callable[[str, Backend, ServerSettings], ResourceServer]
TreeTransform = Callable[[DeviceTree], DeviceTree]
"""Rewrites what a backend discovered before it is served (time-slicing replicas, device-list strategies)."""


class TreeSink(Protocol):
    """Something that follows every served tree (the CDI spec writer) and cleans up on close."""

    async def publish(self, tree: DeviceTree) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    server: ServerSettings = field(default_factory=ServerSettings)
    watcher: WatcherSettings = field(default_factory=WatcherSettings)
    supervision: SupervisionSettings = field(default_factory=SupervisionSettings)
    """How the daemon's long-lived tasks are restarted, and when one that keeps failing ends the process."""


class Manager:
    """Runs a backend and the resource servers for what it discovers."""

    def __init__(
        self,
        backend: Backend,
        settings: ManagerSettings = ManagerSettings(),
        *,
        server_factory: ServerFactory = ResourceServer,
        transforms: Sequence[TreeTransform] = (),
        sinks: Sequence[TreeSink] = (),
    ) -> None:
        self.backend = backend
        self.settings = settings
        self._server_factory = server_factory
        self.transforms = tuple(transforms)
        self._sinks = tuple(sinks)
        self.servers: dict[str, ResourceServer] = {}
        self.discovered = DeviceTree()
        """What the backend reported last, before the transforms."""
        self.tree = DeviceTree()
        """What is served: the discovered tree after the transforms."""
        self._faults = OpenFaults()
        self._tasks = TaskSet("manager")
        self._follower: asyncio.Task[None] | None = None
        self.kubelet_dir_missing = False
        """The kubelet's directory does not exist (not created yet, or removed): nothing can be served."""
        self._lock = asyncio.Lock()
        self.instance_lock: InstanceLock | None = None
        """The node's one-instance lock, when a daemon takes one before starting this manager (for /readyz)."""
        self.health_changes: Counter[tuple[str, int | None]] = Counter()
        """Health events seen, by (health, XID)."""

    async def start(self) -> None:
        """Start the backend, serve what it discovers, and follow its events and the kubelet's restarts."""
        await self.backend.start()
        await self.apply(await self.backend.discover())
        self._follower = self._tasks.supervise(self._follow_backend, "backend events")
        watcher = SocketWatcher(
            self.settings.server.kubelet_dir,
            self._kubelet_socket_created,
            self._socket_deleted,
            self.settings.watcher,
            owned=lambda: [s.socket_path.name for s in self.servers.values() if s.socket_path is not None],
            on_watching=self._serve_unserved,
            on_missing=self._kubelet_dir_gone,
        )
        self._tasks.supervise(watcher.run, "socket watcher")

    async def rediscover(self) -> None:
        """Ask the backend for its devices again and serve the result (SIGHUP)."""
        await self.apply(await self.backend.discover())

    async def reconfigure(
        self,
        *,
        transforms: Sequence[TreeTransform] | None = None,
        sinks: Sequence[TreeSink] | None = None,
        backend: Backend | None = None,
    ) -> None:
        """Apply a reloaded config. Resources whose devices did not change keep their server and their streams.

        A new backend replaces the old one, which is closed first (both may want the same files and sockets);
        its health state starts afresh, as after a restart. Raises what the new backend's start raises, with the
        old one already closed: the caller restarts one from the old settings.
        """
        if sinks is not None:
            old_sinks, self._sinks = self._sinks, tuple(sinks)
            for sink in old_sinks:
                await sink.aclose()
        if transforms is not None:
            self.transforms = tuple(transforms)
        if backend is None:
            await self.apply(self.discovered)
            return
        if self._follower is not None:
            self._follower.cancel()
        await self.backend.aclose()
        self.backend = backend
        self._faults.clear()
        await backend.start()
        tree = await backend.discover()
        for server in self.servers.values():
            server.use_backend(backend)
        await self.apply(tree)
        self._follower = self._tasks.supervise(self._follow_backend, "backend events")

    async def aclose(self) -> None:
        """Stop following events, tell the kubelet every resource is gone, remove our sockets, close the backend."""
        await self._tasks.aclose()
        async with self._lock:
            await asyncio.gather(*(server.stop() for server in self.servers.values()))
            self.servers.clear()
            for sink in self._sinks:
                await sink.aclose()
        await self.backend.aclose()

    @property
    def ready(self) -> bool:
        """Every resource is served, registered, and has a ListAndWatch stream open."""
        return (
            bool(self.servers)
            and not self.kubelet_dir_missing
            and not self.sink_problems()
            and all(s.registered and s.open_streams > 0 for s in self.servers.values())
        )

    def sink_problems(self) -> list[str]:
        """What the sinks could not put in place (a CDI spec not written), one line each; empty when all is."""
        return [problem for sink in self._sinks if isinstance(problem := getattr(sink, "problem", None), str)]

    def missing_specs(self, names: Iterable[str]) -> list[str]:
        """Those of the CDI device names ``names`` that no sink has a spec on disk for."""
        wanted = list(names)
        for sink in self._sinks:
            missing = getattr(sink, "missing", None)
            if missing is not None:
                return list(missing(wanted))
        return []

    async def apply(self, discovered: DeviceTree) -> None:
        """Serve ``discovered`` through the transforms: new resources start, changed ones update, vanished ones stop."""
        async with self._lock:
            self.discovered = discovered
            tree = discovered
            for transform in self.transforms:
                tree = transform(tree)
            links_changed = tree.links != self.tree.links or tree.rules != self.tree.rules
            self.tree = tree
            # Sinks first: a CDI spec is on disk before Allocate can name its device.
            for sink in self._sinks:
                await sink.publish(tree)
            grouped = tree.by_resource()
            for name in [n for n in self.servers if n not in grouped]:
                log.info("resource removed", resource=name)
                await self.servers.pop(name).stop()
            for name, devices in grouped.items():
                served = self._faults.fold(devices)
                server = self.servers.get(name)
                if server is None:
                    log.info("resource added", resource=name, devices=len(served))
                    server = self._server_factory(name, self.backend, self.settings.server)
                    server.missing_specs = self.missing_specs
                    self.servers[name] = server
                    try:
                        await server.start(served, tree)
                    except FileNotFoundError:
                        if not await self._kubelet_dir_gone_now():
                            raise
                        # Served (with its devices already set) once the socket watcher sees the directory again.
                elif links_changed or server.view is None or tuple(server.view.devices.values()) != served:
                    await server.update(served, tree)

    async def on_health(self, event: HealthChanged) -> None:
        """Fold a health event in: every device on that GPU (or that one partition) changes with it."""
        discovered = self._faults.record(event, self.discovered)
        if discovered is None:
            return
        self.discovered = discovered
        self.health_changes[(str(event.health), event.xid)] += 1
        affected = [d.id for d in self.tree.devices if reaches(d, event)]
        log.info(
            "health changed",
            gpu=event.gpu,
            instance=event.instance,
            health=str(event.health),
            xid=event.xid,
            reason=event.reason,
            devices=affected,
        )
        await self.apply(self.discovered)

    async def _follow_backend(self) -> None:
        """Apply the backend's events. Supervised: if the stream fails or ends, the last tree keeps serving and the
        stream is followed again after a backoff."""
        async for event in self.backend.events():
            if isinstance(event, InventoryChanged):
                log.info("inventory changed", devices=len(event.tree.devices))
                await self.apply(event.tree)
            else:
                await self.on_health(event)

    async def _kubelet_socket_created(self) -> None:
        log.info("kubelet socket created; registering again")
        kubelet = await asyncio.to_thread(SocketIdentity.of, self.settings.server.kubelet_dir / KUBELET_SOCKET)
        for server in list(self.servers.values()):
            if await asyncio.to_thread(_unserved, server):
                await self._reserve(server)
            else:
                server.register_again(kubelet)

    async def _socket_deleted(self, name: str) -> None:
        for server in list(self.servers.values()):
            if server.socket_path is not None and server.socket_path.name == name:
                log.info("our socket was deleted; serving again", resource=server.resource, socket=name)
                await self._reserve(server)

    async def _serve_unserved(self) -> None:
        """The socket watcher watches the directory (again): serve every resource whose socket is missing (the
        directory is new, or the watcher restarted after missing events), and hurry registrations still retrying."""
        self.kubelet_dir_missing = False
        for server in list(self.servers.values()):
            if await asyncio.to_thread(_unserved, server):
                await self._reserve(server)
            elif not server.registered:
                server.register_again()

    def _kubelet_dir_gone(self) -> None:
        self.kubelet_dir_missing = True

    async def _kubelet_dir_gone_now(self) -> bool:
        """Whether the kubelet directory is missing (checked now); if so, remembered until the watcher sees it."""
        if await asyncio.to_thread(self.settings.server.kubelet_dir.is_dir):
            return False
        self.kubelet_dir_missing = True
        return True

    async def _reserve(self, server: ResourceServer) -> None:
        """Serve ``server`` on a new socket; where the directory has just gone, leave it to the socket watcher."""
        try:
            await server.reserve()
        except FileNotFoundError:
            if not await self._kubelet_dir_gone_now():
                raise
            log.debug("kubelet directory gone; serving again once it is back", resource=server.resource)


def _unserved(server: ResourceServer) -> bool:
    """Whether ``server`` has no socket in the directory (never served there, or deleted); blocks."""
    return server.socket_path is None or not server.socket_path.exists()
