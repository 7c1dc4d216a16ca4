"""One resource served to the kubelet: the DevicePlugin service on its own unix socket, and its registration.

The RPC paths touch no backend and do no I/O: a ``ResourceView`` holds everything they need, precomputed when
the inventory or health changes, and Allocate answers from a cache of encoded responses per device set.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.connection import H2Connection

from gpuplugin.core.backend import AllocationPolicyKind, Backend, CustomAllocate, PreferredAllocation, PreStart
from gpuplugin.core.errors import (
    CdiSpecMissing,
    InvalidRequest,
    NotServing,
    RequestError,
    UnhealthyDevices,
    UnknownDevices,
    grpc_status,
    status_code,
)
from gpuplugin.core.instance import SocketIdentity, remove_if_ours
from gpuplugin.core.model import (
    MAX_DEVICE_ID_LENGTH,
    ContainerSpec,
    Device,
    DeviceTree,
    Health,
    ResourceRules,
    SpecConflict,
    merge_specs,
)
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.allocation import AllocationPolicy, build_policy
from gpuplugin.devices.strategies import CDI_NAME_ATTRIBUTE
from gpuplugin.kubelet import wire
from gpuplugin.kubelet.api import pluginregistration
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import PrecodedCodec, encode_preferred_response, repeated_field
from gpuplugin.kubelet.pluginwatcher import DEFAULT_PLUGINS_REGISTRY_DIR, WatcherSocket, plugin_info
from gpuplugin.kubelet.registration import RegistrationSettings, plugin_watcher_wanted, register_until_done

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


@dataclass(frozen=True, slots=True)
class ResourceView:
    """A resource's devices at one moment, with what the RPCs need precomputed."""

    resource: str
    devices: Mapping[str, Device]
    """By ID, in tree order, health as served (discovered health with health events folded in)."""
    unhealthy: frozenset[str]
    list_message: bytes
    """The encoded ListAndWatchResponse."""
    policy: AllocationPolicy
    policy_key: tuple[Any, ...]
    """What the policy was built from: the same key means the same policy (health alone does not matter)."""
    rules: ResourceRules
    version: int
    cdi_names: Mapping[str, str] = field(default_factory=dict)
    """The CDI device name of each device that has one (a CDI strategy is on), by ID."""

    @classmethod
    def build(
        cls,
        resource: str,
        devices: Sequence[Device],
        tree: DeviceTree,
        policy_kind: AllocationPolicyKind,
        version: int,
        previous: ResourceView | None = None,
    ) -> ResourceView:
        """Precompute a view; the allocation policy is reused from ``previous`` when only health changed."""
        policy_key = (policy_kind, tree.links, tuple((d.id, d.gpu, d.numa_node, d.instance) for d in devices))
        policy = (
            previous.policy
            if previous is not None and previous.policy_key == policy_key
            else build_policy(policy_kind, devices, tree)
        )
        listed = api.ListAndWatchResponse(
            devices=[
                api.Device(
                    id=d.id,
                    health=str(d.health),
                    topology=None if d.numa_node is None else api.TopologyInfo(nodes=[api.NumaNode(id=d.numa_node)]),
                )
                for d in devices
            ]
        )
        return cls(
            resource=resource,
            devices={d.id: d for d in devices},
            unhealthy=frozenset(d.id for d in devices if d.health is not Health.HEALTHY),
            list_message=bytes(listed),
            policy=policy,
            policy_key=policy_key,
            rules=tree.rules_of(resource),
            version=version,
            cdi_names={d.id: name for d in devices if (name := d.attributes.get(CDI_NAME_ATTRIBUTE)) is not None},
        )


def spec_to_proto(spec: ContainerSpec) -> api.ContainerAllocateResponse:
    return api.ContainerAllocateResponse(
        envs={**spec.env, **spec.list_env},
        mounts=[
            api.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in spec.mounts
        ],
        devices=[
            api.DeviceSpec(container_path=n.container_path, host_path=n.host_path, permissions=n.permissions)
            for n in spec.device_nodes
        ],
        annotations={**spec.annotations, **spec.list_annotations},
        cdi_devices=[api.CdiDevice(name=name) for name in spec.cdi_devices],
    )


#: Far above any real node (64 GPUs with 64 replicas each), far below what would make a request costly to check.
MAX_IDS_PER_LIST = 4096
MAX_CONTAINERS = 256


def check_bounds(containers: int, id_lists: Sequence[Sequence[str]]) -> None:
    """Refuse oversized requests and IDs the kubelet could never have sent, before any other work."""
    if containers > MAX_CONTAINERS:
        raise InvalidRequest(f"the request has {containers} container requests; at most {MAX_CONTAINERS}")
    for ids in id_lists:
        if len(ids) > MAX_IDS_PER_LIST:
            raise InvalidRequest(f"a container request names {len(ids)} devices; at most {MAX_IDS_PER_LIST}")
        for device_id in ids:
            if len(device_id) > MAX_DEVICE_ID_LENGTH:
                raise InvalidRequest(
                    f"device ID {device_id[:40]!r}… has {len(device_id)} characters; IDs have at most "
                    f"{MAX_DEVICE_ID_LENGTH}"
                )


def _options(backend: Backend) -> api.DevicePluginOptions:
    """What the kubelet is told to call, from the capabilities the backend has."""
    return api.DevicePluginOptions(
        pre_start_required=isinstance(backend, PreStart),
        get_preferred_allocation_available=isinstance(backend, PreferredAllocation),
    )


async def receive(stream: Stream[Any, Any], method: str) -> Any:
    """The request; INVALID_ARGUMENT when its bytes are no valid encoding (grpclib alone would answer UNKNOWN)."""
    try:
        return await stream.recv_message()
    except wire.WireError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {method} request: {exc}") from None


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
    """grpclib's server, bounding h2's memory of closed streams and closing the connections it accepted when it
    closes.

    grpclib's ``close()`` stops listening and cancels the requests running, but leaves connections open: a request
    arriving on one afterwards (a kubelet mid-burst at SIGTERM) starts a handler that nothing waits for, destroyed
    pending when the loop ends.
    """

    def __init__(self, handlers: Sequence[Any], codec: PrecodedCodec) -> None:
        super().__init__(handlers, codec=codec)
        # A class attribute of h2's, read when a connection is made: it applies to every connection from now on.
        H2Connection.MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

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
        self._on_rpc = on_rpc
        self._log = log.bind(resource=resource)
        self.options = _options(backend)
        self._options_message = bytes(self.options)
        self._custom = backend if isinstance(backend, CustomAllocate) else None
        self._view: ResourceView | None = None
        self._changed = asyncio.Condition()
        self._stopping = False
        self._cache: dict[tuple[str, ...], bytes] = {}
        self._server: Server | None = None
        self.socket_path: Path | None = None
        self._socket_identity: SocketIdentity | None = None
        """The inode of the socket we created: a file of that name that differs is not ours to remove."""
        self._tasks = TaskSet(f"server {resource}")
        self._registration: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._watcher: WatcherSocket | None = None
        self._watcher_registered = asyncio.Event()
        self._unreachable_logged = False
        self.missing_specs: Callable[[Iterable[str]], Sequence[str]] | None = None
        """Which CDI device names have no spec on disk (the CDI writer's ``missing``); None: nothing to check."""
        self.registrations = 0
        self.registered_with: SocketIdentity | None = None
        """The kubelet the last accepted Register went to (see ``Registered.kubelet``)."""
        self.open_streams = 0

    @property
    def view(self) -> ResourceView | None:
        return self._view

    @property
    def registered(self) -> bool:
        return self.registrations > 0 and self._registration is not None and self._registration.done()

    async def start(self, devices: Sequence[Device], tree: DeviceTree) -> None:
        """Serve on a fresh socket, then register with the kubelet (retried in the background until it answers)."""
        if tree.rules_of(self.resource).allocation_policy is not None:
            # Whatever made these devices (time-slicing, say) chose a policy: advertise preferred allocation.
            self.options = api.DevicePluginOptions(
                pre_start_required=self.options.pre_start_required, get_preferred_allocation_available=True
            )
            self._options_message = bytes(self.options)
        await self.update(devices, tree)
        await self.reserve()

    def use_backend(self, backend: Backend) -> None:
        """Serve for a new backend (a reloaded config); register again if the options it implies changed."""
        self._backend = backend
        self._custom = backend if isinstance(backend, CustomAllocate) else None
        # Cached responses may hold the old backend's container specs (CustomAllocate).
        self._cache = {}
        options = _options(backend)
        options.get_preferred_allocation_available |= self.options.get_preferred_allocation_available
        if options != self.options:
            self.options, self._options_message = options, bytes(options)
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
        old = self._view
        if (
            old is None
            or [d.spec for d in old.devices.values()] != [d.spec for d in devices]
            or list(old.devices) != [d.id for d in devices]
            or old.rules != tree.rules_of(self.resource)
        ):
            self._cache = {}
        async with self._changed:
            self._view = ResourceView.build(
                self.resource,
                devices,
                tree,
                self._policy_kind(tree),
                0 if old is None else old.version + 1,
                previous=old,
            )
            self._changed.notify_all()

    async def reserve(self) -> None:
        """Serve on a new socket and register again; the old socket is closed only once the new one serves."""
        path = self._settings.kubelet_dir / socket_name(self._settings.socket_prefix, self.resource)
        server = _Server([self], codec=PrecodedCodec())
        await server.start(path=str(path))
        identity = await asyncio.to_thread(SocketIdentity.of, path)
        # No await from reading the old socket to recording the new: a reserve running meanwhile (a deleted socket
        # and a new kubelet.sock seen together) then closes and removes exactly the one it replaced.
        old_server, old_path, old_identity = self._server, self.socket_path, self._socket_identity
        self._server, self.socket_path, self._socket_identity = server, path, identity
        self._log.debug("serving", socket=str(path))
        self._start_registration()
        if old_server is not None:
            old_server.close()
            await old_server.wait_closed()
        if old_path is not None:
            await asyncio.to_thread(remove_if_ours, old_path, old_identity)

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
        self._start_registration()

    def _start_registration(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
        assert self.socket_path is not None
        self._wake.clear()
        path = self.socket_path
        # The kubelet asked for its plugin watcher (upstream's stub skips Register then).
        register = self._register_with_watcher if plugin_watcher_wanted(self._settings.kubelet_dir) else self._register
        # Supervised: a refused registration (or any failure) is tried again with backoff, and counted.
        self._registration = self._tasks.supervise(lambda: register(path), "register", expect_end=True)

    async def _register(self, path: Path) -> None:
        await self._close_watcher()
        registered = await register_until_done(
            self._settings.kubelet_dir / "kubelet.sock",
            endpoint=path.name,
            resource=self.resource,
            options=self.options,
            settings=self._settings.registration,
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
            self._settings.plugins_registry_dir / path.name, plugin_info(self.resource, path), self._watcher_status
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
                socket=str(self._settings.kubelet_dir / "kubelet.sock"),
                error=error,
            )

    def socket_missing(self) -> bool:
        """Our socket file is gone, or another file took its name. Blocking: call it in a thread."""
        return self.socket_path is not None and SocketIdentity.of(self.socket_path) != self._socket_identity

    async def stop(self) -> None:
        """Tell every stream the list is empty (allocatable drops to zero at once), stop serving, remove the socket."""
        async with self._changed:
            self._stopping = True
            self._changed.notify_all()
        await self._tasks.aclose()
        await self._close_watcher()
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

    # The RPCs. grpclib calls the handlers from __mapping__; each goes through grpc_status exactly once.

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/v1beta1.DevicePlugin/GetDevicePluginOptions": Handler(
                self._unary("GetDevicePluginOptions", lambda _: self._options_message),
                Cardinality.UNARY_UNARY,
                wire.Empty,
                api.DevicePluginOptions,
            ),
            "/v1beta1.DevicePlugin/ListAndWatch": Handler(
                self._list_and_watch, Cardinality.UNARY_STREAM, wire.Empty, api.ListAndWatchResponse
            ),
            "/v1beta1.DevicePlugin/GetPreferredAllocation": Handler(
                self._unary("GetPreferredAllocation", self.preferred_allocation),
                Cardinality.UNARY_UNARY,
                wire.PreferredAllocationRequest,
                api.PreferredAllocationResponse,
            ),
            "/v1beta1.DevicePlugin/Allocate": Handler(
                self._unary("Allocate", self.allocate),
                Cardinality.UNARY_UNARY,
                wire.AllocateRequest,
                api.AllocateResponse,
            ),
            "/v1beta1.DevicePlugin/PreStartContainer": Handler(
                self._unary("PreStartContainer", self.pre_start_container),
                Cardinality.UNARY_UNARY,
                wire.PreStartContainerRequest,
                api.PreStartContainerResponse,
            ),
        }

    def _unary(
        self, method: str, answer: Callable[[Any], bytes | Awaitable[bytes]]
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        """A grpclib handler: receive, answer (errors mapped once, in grpc_status), send, observe."""

        async def handle(stream: Stream[Any, Any]) -> None:
            started = time.perf_counter()
            code = "OK"
            try:
                request = await receive(stream, method)
                with grpc_status(method):
                    response = answer(request)
                    if not isinstance(response, bytes):
                        response = await response
                await stream.send_message(response)
            except BaseException as exc:
                code = status_code(exc)
                raise
            finally:
                self._observe(method, started, code)

        return handle

    def _observe(self, method: str, started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        self._log.debug("rpc", method=method, latency_ms=round(elapsed * 1000, 3), code=code)
        if self._on_rpc is not None:
            self._on_rpc(self.resource, method, elapsed, code)

    def _current(self) -> ResourceView:
        view = self._view
        if view is None or self._stopping:
            raise NotServing(f"{self.resource} is not being served now")
        return view

    def allocate(self, request: wire.AllocateRequest) -> bytes:
        """Answer Allocate from precomputed specs: the encoded AllocateResponse."""
        view = self._current()
        if not request.container_requests:
            raise InvalidRequest("Allocate request has no container requests")
        check_bounds(len(request.container_requests), [c.devices_ids for c in request.container_requests])
        containers = [self._container_response(view, tuple(c.devices_ids)) for c in request.container_requests]
        return repeated_field(1, containers)

    def _container_response(self, view: ResourceView, ids: tuple[str, ...]) -> bytes:
        cached = self._cache.get(ids)
        if cached is None:
            cached = self._encode_container(view, ids)
        if view.unhealthy and not view.unhealthy.isdisjoint(ids):
            raise UnhealthyDevices(self.resource, view.unhealthy.intersection(ids))
        if view.cdi_names and self.missing_specs is not None:
            # A CDI name without its spec on disk fails the container at creation: refuse it here, clearly.
            missing = self.missing_specs(view.cdi_names[i] for i in ids if i in view.cdi_names)
            if missing:
                raise CdiSpecMissing(self.resource, missing)
        return cached

    def _encode_container(self, view: ResourceView, ids: tuple[str, ...]) -> bytes:
        if not ids:
            raise InvalidRequest("a container request names no devices")
        if len(set(ids)) != len(ids):
            raise InvalidRequest(
                f"a container request names a device twice: {sorted({i for i in ids if ids.count(i) > 1})}"
            )
        unknown = [i for i in ids if i not in view.devices]
        if unknown:
            raise UnknownDevices(self.resource, unknown)
        limit = view.rules.max_devices_per_container
        if limit is not None and len(ids) > limit:
            raise InvalidRequest(
                f"{self.resource} allows at most {limit} device(s) per container, the request names {len(ids)}"
            )
        spec = self._custom.container_spec(self.resource, ids) if self._custom is not None else None
        if spec is None:
            try:
                spec = merge_specs(view.devices[i].spec for i in ids)
            except SpecConflict as exc:
                raise RequestError(str(exc)) from None
        encoded = bytes(spec_to_proto(spec))
        if len(self._cache) >= self._settings.allocate_cache_entries:
            self._cache.clear()
        self._cache[ids] = encoded
        return encoded

    def preferred_allocation(self, request: wire.PreferredAllocationRequest) -> bytes:
        """Answer GetPreferredAllocation with the resource's policy, precomputed for the current inventory."""
        view = self._current()
        if not request.container_requests:
            raise InvalidRequest("GetPreferredAllocation request has no container requests")
        check_bounds(
            len(request.container_requests),
            [ids for c in request.container_requests for ids in (c.available_deviceIDs, c.must_include_deviceIDs)],
        )
        responses: list[list[bytes]] = []
        for container in request.container_requests:
            unknown = [
                i for i in (*container.available_deviceIDs, *container.must_include_deviceIDs) if i not in view.devices
            ]
            if unknown:
                raise UnknownDevices(self.resource, unknown)
            chosen = view.policy.choose(
                container.available_deviceIDs, container.must_include_deviceIDs, container.allocation_size
            )
            responses.append([i.encode() for i in chosen])
        return encode_preferred_response(responses)

    async def pre_start_container(self, request: wire.PreStartContainerRequest) -> bytes:
        """Let a PreStart backend prepare the devices; the kubelet gives this 30 s."""
        view = self._current()
        check_bounds(1, [request.devices_ids])
        unknown = [i for i in request.devices_ids if i not in view.devices]
        if unknown:
            raise UnknownDevices(self.resource, unknown)
        if isinstance(self._backend, PreStart):
            await self._backend.pre_start_container(self.resource, list(request.devices_ids))
        return b""

    def _has_news(self, sent: int) -> bool:
        return self._stopping or (self._view is not None and self._view.version != sent)

    async def _list_and_watch(self, stream: Stream[Any, Any]) -> None:
        # The template is grpclib's health Watch: send the current state, wait for a change, send again.
        await stream.recv_message()
        self.open_streams += 1
        self._log.info("ListAndWatch stream opened", streams=self.open_streams)
        sent = -1
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(functools.partial(self._has_news, sent))
                    if self._stopping:
                        message = b""
                    else:
                        assert self._view is not None
                        message, sent = self._view.list_message, self._view.version
                await stream.send_message(message)
                if self._stopping:
                    return
        finally:
            self.open_streams -= 1
            self._log.info("ListAndWatch stream closed", streams=self.open_streams)
