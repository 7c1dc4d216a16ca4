"""One resource served to the kubelet: its unix socket's lifecycle, and the parts that serve on it.

``service`` routes the RPCs (and maps errors to gRPC statuses), ``allocate`` answers Allocate and its kin,
``list_and_watch`` streams the device list, ``view`` precomputes what they answer from, and ``registrar`` keeps the
socket registered with the kubelet.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from grpclib.protocol import H2Protocol
from grpclib.server import Handler, Server
from h2.connection import H2Connection

from gpuplugin.core.backend import AllocationPolicyKind, Backend, PreferredAllocation
from gpuplugin.core.instance import SocketIdentity, remove_if_ours
from gpuplugin.core.model import Device, DeviceTree
from gpuplugin.kubelet.allocate import Allocator
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import PrecodedCodec
from gpuplugin.kubelet.list_and_watch import DeviceListFeed
from gpuplugin.kubelet.pluginwatcher import DEFAULT_PLUGINS_REGISTRY_DIR
from gpuplugin.kubelet.registrar import Registrar
from gpuplugin.kubelet.registration import RegistrationSettings
from gpuplugin.kubelet.service import DevicePluginService, plugin_options
from gpuplugin.kubelet.transport import CorkedH2Protocol
from gpuplugin.kubelet.view import ResourceView

log = structlog.get_logger("gpuplugin.kubelet.server")

_SOCKET_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_socket_counter = itertools.count()
#: Random per process; 8 hex digits keep the name short (sun_path has 108 bytes) and collisions out of reach.
_INSTANCE_TOKEN = secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How resource servers are named, registered and bounded."""

    kubelet_dir: Path = Path("/var/lib/kubelet/device-plugins")
    """The kubelet's device-plugins directory: its ``kubelet.sock`` and our sockets live there."""
    socket_prefix: str = "gpuplugin"
    allocate_cache_entries: int = 4096
    """Encoded Allocate responses kept per resource; a device set seen once costs one encode, later ones none."""
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    plugins_registry_dir: Path = DEFAULT_PLUGINS_REGISTRY_DIR
    """Where the kubelet's plugin watcher looks for sockets; used only when ``kubelet_dir`` holds ``DEPRECATION``."""


def socket_name(prefix: str, resource: str) -> str:
    """A fresh socket name per serve: a stale socket of an earlier run can never collide with it.

    The PID alone is the same (1) in every container, so a random token per process tells apart instances in
    different PID namespaces that share the kubelet's directory.
    """
    return f"{prefix}-{_SOCKET_SAFE.sub('_', resource)}-{os.getpid()}-{_INSTANCE_TOKEN}-{next(_socket_counter)}.sock"


#: Closed streams h2 remembers per connection, to answer a late frame on a finished stream correctly. h2's default,
#: 65,536, is about 8 MB on the kubelet's one long-lived connection once that many pods have started; a unary
#: RPC's stray frames arrive within a few streams of its end.
CLOSED_STREAMS_REMEMBERED = 1024


class _Server(Server):
    """grpclib's server, concurrent responses sharing writes (``transport``), bounding h2's memory of closed streams
    and closing the connections it accepted when it closes.

    grpclib's ``close()`` stops listening and cancels the requests running, but leaves connections open: a request
    arriving on one afterwards (a kubelet mid-burst at SIGTERM) starts a handler that nothing waits for, destroyed
    pending when the loop ends.
    """

    def __init__(self, handlers: Sequence[Any], codec: PrecodedCodec) -> None:
        super().__init__(handlers, codec=codec)
        # A class attribute of h2's, read when a connection is made: it applies to every connection from now on.
        H2Connection.MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED
        self._protocols: weakref.WeakSet[CorkedH2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory, but for the protocol class: tests/test_transport.py checks the internals it uses.
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        protocol = CorkedH2Protocol(handler, self._config, self._h2_config)
        self._protocols.add(protocol)
        return protocol

    @property
    def transport_writes(self) -> int:
        """Writes made to the sockets of the connections still open."""
        return sum(p.transport.writes for p in self._protocols if p.transport is not None)

    def close(self) -> None:
        super().close()
        for protocol in list(self._protocols):
            # Set in connection_made; a protocol not yet connected has none.
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()


class ResourceServer:
    """Serves one resource name to the kubelet and keeps it registered."""

    def __init__(
        self,
        resource: str,
        backend: Backend,
        settings: ServerSettings,
        *,
        on_rpc: Callable[[str, str, float, str], None] | None = None,
    ) -> None:
        self.resource = resource
        self._backend = backend
        self._settings = settings
        self._log = log.bind(resource=resource)
        self.feed = DeviceListFeed(resource)
        self.allocator = Allocator(resource, backend, settings.allocate_cache_entries, self.feed.current)
        self.service = DevicePluginService(self.feed, self.allocator, plugin_options(backend), on_rpc=on_rpc)
        self.registrar = Registrar(
            resource,
            settings.kubelet_dir,
            settings.registration,
            settings.plugins_registry_dir,
            lambda: self.service.options,
        )
        self._server: _Server | None = None
        self.socket_path: Path | None = None
        self._socket_identity: SocketIdentity | None = None
        """The inode of the socket we created: a file of that name that differs is not ours to remove."""

    @property
    def options(self) -> api.DevicePluginOptions:
        return self.service.options

    @property
    def view(self) -> ResourceView | None:
        return self.feed.view

    @property
    def open_streams(self) -> int:
        return self.feed.open_streams

    @property
    def missing_specs(self) -> Callable[[Iterable[str]], Sequence[str]] | None:
        """Which CDI device names have no spec on disk (the CDI writer's ``missing``); None: nothing to check."""
        return self.allocator.missing_specs

    @missing_specs.setter
    def missing_specs(self, missing: Callable[[Iterable[str]], Sequence[str]] | None) -> None:
        self.allocator.missing_specs = missing

    @property
    def transport_writes(self) -> int:
        """Writes made to the sockets of the kubelet's open connections (see ``transport``)."""
        return 0 if self._server is None else self._server.transport_writes

    @property
    def registrations(self) -> int:
        return self.registrar.registrations

    @property
    def registered_with(self) -> SocketIdentity | None:
        return self.registrar.registered_with

    @property
    def registered(self) -> bool:
        return self.registrar.registered

    async def start(self, devices: Sequence[Device], tree: DeviceTree) -> None:
        """Serve on a fresh socket, then register with the kubelet (retried in the background until it answers)."""
        if tree.rules_of(self.resource).allocation_policy is not None:
            # Whatever made these devices (time-slicing, say) chose a policy: advertise preferred allocation.
            self.service.advertise(
                api.DevicePluginOptions(
                    pre_start_required=self.options.pre_start_required, get_preferred_allocation_available=True
                )
            )
        await self.update(devices, tree)
        await self.reserve()

    def use_backend(self, backend: Backend) -> None:
        """Serve for a new backend (a reloaded config); register again if the options it implies changed."""
        self._backend = backend
        self.allocator.use_backend(backend)
        options = plugin_options(backend)
        options.get_preferred_allocation_available |= self.options.get_preferred_allocation_available
        if options != self.options:
            self.service.advertise(options)
            if self.socket_path is not None:
                self.register_again()

    def _policy_kind(self, tree: DeviceTree) -> AllocationPolicyKind:
        chosen = tree.rules_of(self.resource).allocation_policy
        if chosen is not None:
            return chosen
        if isinstance(self._backend, PreferredAllocation):
            return self._backend.allocation_policy(self.resource)
        return AllocationPolicyKind.TOPOLOGY

    async def update(self, devices: Sequence[Device], tree: DeviceTree) -> None:
        """Serve a new device list (inventory or health changed); every ListAndWatch stream gets it."""
        old = self.feed.view
        if (
            old is None
            or [d.spec for d in old.devices.values()] != [d.spec for d in devices]
            or list(old.devices) != [d.id for d in devices]
            or old.rules != tree.rules_of(self.resource)
        ):
            self.allocator.forget()
        await self.feed.publish(
            ResourceView.build(
                self.resource,
                devices,
                tree,
                self._policy_kind(tree),
                0 if old is None else old.version + 1,
                previous=old,
            )
        )

    async def reserve(self) -> None:
        """Serve on a new socket and register again; the old socket is closed only once the new one serves."""
        path = self._settings.kubelet_dir / socket_name(self._settings.socket_prefix, self.resource)
        server = _Server([self.service], codec=PrecodedCodec())
        await server.start(path=str(path))
        identity = await asyncio.to_thread(SocketIdentity.of, path)
        # No await from reading the old socket to recording the new: a reserve running meanwhile (a deleted socket
        # and a new kubelet.sock seen together) then closes and removes exactly the one it replaced.
        old_server, old_path, old_identity = self._server, self.socket_path, self._socket_identity
        self._server, self.socket_path, self._socket_identity = server, path, identity
        self._log.debug("serving", socket=str(path))
        self.registrar.register(path)
        if old_server is not None:
            old_server.close()
            await old_server.wait_closed()
        if old_path is not None:
            await asyncio.to_thread(remove_if_ours, old_path, old_identity)

    def register_again(self, kubelet: SocketIdentity | None = None) -> None:
        """Register now (the kubelet restarted); see ``Registrar.register_again``."""
        self.registrar.register_again(kubelet)

    def socket_missing(self) -> bool:
        """Our socket file is gone, or another file took its name. Blocking: call it in a thread."""
        return self.socket_path is not None and SocketIdentity.of(self.socket_path) != self._socket_identity

    async def stop(self) -> None:
        """Tell every stream the list is empty (allocatable drops to zero at once), stop serving, remove the socket."""
        await self.feed.stop()
        await self.registrar.aclose()
        if self._server is not None:
            # Let streams send their last (empty) message before their connections are closed.
            await asyncio.sleep(0)
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.socket_path is not None:
            # Only the file we created: another instance's socket of the same name stays.
            await asyncio.to_thread(remove_if_ours, self.socket_path, self._socket_identity)
        self._log.info("stopped")
