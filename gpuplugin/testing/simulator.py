"""A kubelet device manager that runs in-process: a real unix-socket gRPC peer for tests, the demo and benchmarks.

It mirrors upstream ``pkg/kubelet/cm/devicemanager`` where a plugin can tell the difference: Register validates,
dials and asks for the options before it answers; one ListAndWatch stream per resource is held open and its end
zeroes allocatable; admission takes free healthy devices, asks GetPreferredAllocation as a hint, calls Allocate
one container at a time and writes a checkpoint; a restart wipes the socket directory.

With ``plugins_registry_dir`` set it also plays the kubelet's plugin watcher, as a kubelet does that writes
``DEPRECATION`` into the device-plugins directory: a socket created in the registry directory is asked
``GetInfo``, the device plugin at its ``endpoint`` is dialled and registered exactly as ``Register`` would, and the
outcome is reported with ``NotifyRegistrationStatus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Self, TypeVar

import grpclib
import grpclib.exceptions
import structlog
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.server import Server

from gpuplugin.core.model import MAX_DEVICE_ID_LENGTH, Health, is_extended_resource_name
from gpuplugin.core.tasks import TaskSet
from gpuplugin.kubelet.api import pluginregistration, v1beta1

log = structlog.get_logger("gpuplugin.testing.simulator")

SUPPORTED_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT_FILE = "kubelet_internal_checkpoint"
DEPRECATION_FILE = "DEPRECATION"
DEVICE_PLUGIN_TYPE = "DevicePlugin"
_LIST_AND_WATCH = "/v1beta1.DevicePlugin/ListAndWatch"

_T = TypeVar("_T")
#: How a call to a plugin fails: its error status, its deadline, or its connection.
_RPC_FAILURES = (grpclib.GRPCError, TimeoutError, OSError, grpclib.exceptions.StreamTerminatedError)


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """How the simulated kubelet behaves where tests want it faster or stricter than the real one."""

    dial_timeout_s: float = 10.0
    """How long Register keeps dialling the plugin's socket; the kubelet's blocking dial gives up after 10 s."""
    options_timeout_s: float = 10.0
    """Deadline of GetDevicePluginOptions during Register; the kubelet sets none, but a test must not hang."""
    preferred_allocation_timeout_s: float | None = None
    """Deadline of GetPreferredAllocation; None, as in the kubelet, so a slow plugin shows as slow admission."""
    allocate_timeout_s: float | None = None
    """Deadline of Allocate; None, as in the kubelet (a hung Allocate blocks the node: kubernetes #117435)."""
    pre_start_timeout_s: float = 30.0
    """Deadline of PreStartContainer; the kubelet's KubeletPreStartContainerRPCTimeoutInSecs."""
    wipe_on_start: bool = True
    """Delete stale sockets on ``start()`` as the kubelet does at every start; off for tests that pre-place files."""
    plugins_registry_dir: Path | None = None
    """When set, play the plugin watcher too: write ``DEPRECATION`` and register the plugins whose sockets appear
    in this directory (``Register`` on ``kubelet.sock`` keeps working, as in the kubelet)."""
    registry_poll_s: float = 0.05
    """How often the plugin watcher looks at ``plugins_registry_dir`` (the kubelet uses fsnotify)."""
    get_info_timeout_s: float = 1.0
    """Deadline of GetInfo; the kubelet's plugin watcher gives it one second."""
    notify_timeout_s: float = 5.0
    """Deadline of NotifyRegistrationStatus, as in the kubelet's plugin watcher."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One accepted Register call."""

    index: int
    """Position among all accepted registrations (what ``wait_registered(after=...)`` counts)."""
    resource: str
    endpoint: str
    options: v1beta1.DevicePluginOptions
    """What GetDevicePluginOptions answered: the kubelet uses these, not the ones in the request."""
    request_options: v1beta1.DevicePluginOptions | None
    monotonic_s: float
    """``time.monotonic()`` when Register was answered."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """One Register call answered with an error."""

    resource: str
    endpoint: str
    version: str
    message: str
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A current endpoint's ListAndWatch stream ended; its resource went to allocatable 0."""

    resource: str
    endpoint: str
    error: str | None
    """None when the plugin closed the stream cleanly."""
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class Restart:
    """One simulated kubelet restart."""

    started_monotonic_s: float
    """When connections were dropped: the kubelet process died."""
    served_monotonic_s: float
    """When ``kubelet.sock`` was served again: the earliest a plugin can re-register."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device as the last ListAndWatch message described it."""

    health: str
    numa_nodes: tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        # The kubelet counts anything but the exact "Healthy" string as unhealthy.
        return self.health == Health.HEALTHY


@dataclass(frozen=True, slots=True)
class ResourceAllocation:
    """What one container got of one resource, and how long the plugin took."""

    resource: str
    device_ids: tuple[str, ...]
    response: v1beta1.ContainerAllocateResponse
    preferred: tuple[str, ...] | None
    """GetPreferredAllocation's answer as given, or None when it was not called."""
    preferred_allocation_s: float | None
    allocate_s: float
    pre_start_s: float | None = None


@dataclass(frozen=True, slots=True)
class ContainerAdmission:
    """One container's allocations, keyed by resource name."""

    name: str
    allocations: Mapping[str, ResourceAllocation] = field(default_factory=lambda: MappingProxyType({}))

    def device_ids(self, resource: str) -> tuple[str, ...]:
        allocation = self.allocations.get(resource)
        return () if allocation is None else allocation.device_ids


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted pod: its containers in order (named ``container-<n>``)."""

    pod: str
    containers: tuple[ContainerAdmission, ...]

    def device_ids(self, resource: str) -> tuple[str, ...]:
        return tuple(i for c in self.containers for i in c.device_ids(resource))


class AdmissionError(Exception):
    """The pod failed admission (the kubelet's UnexpectedAdmissionError); the kubelet never retries, and retrying
    helps only after devices are freed, heal, or the plugin registers again."""

    def __init__(self, pod: str, resource: str, message: str, *, status: Status | None = None) -> None:
        super().__init__(f"pod {pod!r}, resource {resource!r}: {message}" + (f" ({status.name})" if status else ""))
        self.pod = pod
        self.resource = resource
        self.message = message
        self.status = status
        """The plugin's gRPC status when an RPC failed; None when the kubelet itself refused."""


class _Endpoint:
    """One registered plugin socket: its channel, options and ListAndWatch task."""

    __slots__ = ("channel", "endpoint", "options", "resource", "stopped", "stream_open", "stub", "task")

    def __init__(self, resource: str, endpoint: str, channel: Channel, options: v1beta1.DevicePluginOptions) -> None:
        self.resource = resource
        self.endpoint = endpoint
        self.channel = channel
        self.stub = v1beta1.DevicePluginStub(channel)
        self.options = options
        self.task: asyncio.Task[None] | None = None
        self.stream_open = False
        self.stopped = False


class _WatchedSocket:
    """A socket the plugin watcher found, and its registration while that is in flight."""

    __slots__ = ("identity", "task")

    def __init__(self, identity: tuple[int, int], task: asyncio.Task[None]) -> None:
        self.identity = identity
        self.task = task


class _RegistrationService(v1beta1.RegistrationBase):
    def __init__(self, handler: Callable[[v1beta1.RegisterRequest], Awaitable[None]]) -> None:
        self._handler = handler

    async def register(self, message: v1beta1.RegisterRequest) -> v1beta1.Empty:
        await self._handler(message)
        return v1beta1.Empty()


# pod -> container -> resource -> device IDs: the same shape as the checkpoint file.
_PodDevices = dict[str, dict[str, dict[str, tuple[str, ...]]]]


class KubeletSimulator:
    """Serves ``v1beta1.Registration`` on ``directory / "kubelet.sock"`` and plays the kubelet's device manager."""

    def __init__(self, directory: Path, settings: SimulatorSettings | None = None) -> None:
        self.directory = Path(directory)
        self.settings = settings or SimulatorSettings()
        self._server: Server | None = None
        self._tasks = TaskSet("kubelet-simulator")
        self._changed = asyncio.Condition()
        # The kubelet admits pods one at a time; a slow plugin call delays every later pod.
        self._admission_lock = asyncio.Lock()
        # Serialises checkpoint writes (newest snapshot last) and keeps a restart's wipe off a half-written file.
        self._checkpoint_lock = asyncio.Lock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._devices: dict[str, dict[str, DeviceState]] = {}
        self._pods: _PodDevices = {}
        self._registrations: list[Registration] = []
        self._rejections: list[Rejection] = []
        self._stream_ends: list[StreamEnd] = []
        self._restarts: list[Restart] = []
        self._warnings: list[str] = []
        self._registry_watch: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def socket_path(self) -> Path:
        return self.directory / KUBELET_SOCKET

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    @property
    def plugin_watcher(self) -> bool:
        """Whether this kubelet asks for plugin-watcher registration (it writes ``DEPRECATION``)."""
        return self.settings.plugins_registry_dir is not None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the directory, wipe stale sockets (unless configured not to) and serve ``kubelet.sock``."""
        if self._server is not None:
            raise RuntimeError("kubelet simulator already started")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        if self.settings.wipe_on_start:
            async with self._checkpoint_lock:
                await asyncio.to_thread(self._wipe_directory)
        await asyncio.to_thread(self._write_deprecation)
        await self._serve()
        self._start_plugin_watcher()

    async def aclose(self) -> None:
        """Drop every plugin connection and stream, stop serving and remove ``kubelet.sock``."""
        if self._closed:
            return
        self._closed = True
        # Server first: a Register still in flight is cancelled before it can install an endpoint.
        await self._stop_server()
        await self._stop_plugin_watcher()
        await self._drop_endpoints()
        await self._tasks.aclose()
        # Go's unix listener unlinks its socket on close; a plugin watching the directory sees the kubelet go.
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.socket_path.unlink)
        await self._notify()

    async def restart(self) -> Restart:
        """Simulate a kubelet restart; pods keep their devices, device lists stay empty until plugins re-register."""
        started = time.monotonic()
        await self._stop_server()
        await self._stop_plugin_watcher()
        await self._drop_endpoints()
        self._devices.clear()
        async with self._checkpoint_lock:
            await asyncio.to_thread(self._wipe_directory)
        await self._serve()
        # A new plugin watcher registers every socket it finds, those of plugins that have not noticed too.
        self._start_plugin_watcher()
        restart = Restart(started_monotonic_s=started, served_monotonic_s=time.monotonic())
        self._restarts.append(restart)
        log.info("kubelet restarted", directory=str(self.directory))
        await self._notify()
        return restart

    # State a test can read.

    @property
    def registrations(self) -> list[Registration]:
        return list(self._registrations)

    @property
    def rejections(self) -> list[Rejection]:
        return list(self._rejections)

    @property
    def stream_ends(self) -> list[StreamEnd]:
        return list(self._stream_ends)

    @property
    def restarts(self) -> list[Restart]:
        return list(self._restarts)

    @property
    def warnings(self) -> list[str]:
        """Plugin misbehaviour the kubelet tolerates (a bad preferred allocation, an over-long ID)."""
        return list(self._warnings)

    def resources(self) -> list[str]:
        return sorted(self._devices)

    def devices(self, resource: str) -> dict[str, str]:
        """Device ID to health string, as last reported (all Unhealthy once the stream has ended)."""
        return {i: d.health for i, d in self._devices.get(resource, {}).items()}

    def device_states(self, resource: str) -> dict[str, DeviceState]:
        return dict(self._devices.get(resource, {}))

    def capacity(self, resource: str) -> int:
        return len(self._devices.get(resource, {}))

    def allocatable(self, resource: str) -> int:
        """Healthy devices, allocated or not: what the kubelet reports as the node's allocatable."""
        return sum(d.healthy for d in self._devices.get(resource, {}).values())

    def in_use(self, resource: str) -> set[str]:
        return {i for containers in self._pods.values() for r in containers.values() for i in r.get(resource, ())}

    def free(self, resource: str) -> int:
        """Healthy devices not held by any pod: what the next admission may take."""
        return len(self._available(resource))

    def pod_devices(self, pod: str) -> dict[str, dict[str, tuple[str, ...]]]:
        return {c: dict(r) for c, r in self._pods.get(pod, {}).items()}

    def pods(self) -> list[str]:
        return sorted(self._pods)

    def stream_open(self, resource: str) -> bool:
        endpoint = self._endpoints.get(resource)
        return endpoint is not None and endpoint.stream_open

    def options(self, resource: str) -> v1beta1.DevicePluginOptions | None:
        endpoint = self._endpoints.get(resource)
        return None if endpoint is None else endpoint.options

    def endpoint_path(self, resource: str) -> Path:
        """The current endpoint's socket, for another client to dial (the benchmark's Go client)."""
        return self.directory / self._connected(resource).endpoint

    def stub(self, resource: str) -> v1beta1.DevicePluginStub:
        """A client on the current endpoint's connection, for tests that call RPCs directly."""
        return self._connected(resource).stub

    def _connected(self, resource: str) -> _Endpoint:
        endpoint = self._endpoints.get(resource)
        if endpoint is None or endpoint.stopped:
            raise LookupError(f"no connected device plugin for {resource}")
        return endpoint

    # A mandatory timeout on purpose (ASYNC109): a test that waits on the simulator must fail, never hang.
    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` holds, re-checked on every state change; TimeoutError after ``timeout`` s."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_registered(self, resource: str, *, after: int = 0, timeout: float) -> Registration:  # noqa: ASYNC109
        """The first registration of ``resource`` whose index is at least ``after`` (pass ``len(registrations)``)."""

        def found() -> Registration | None:
            return next((r for r in self._registrations[after:] if r.resource == resource), None)

        await self.wait_for(lambda: found() is not None, timeout)
        registration = found()
        assert registration is not None
        return registration

    # Registration.

    async def _serve(self) -> None:
        server = Server([_RegistrationService(self._register)])
        # A stale socket file would make bind fail with EADDRINUSE; the kubelet removes it first too.
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.socket_path.unlink)
        await server.start(path=str(self.socket_path))
        self._server = server
        log.info("serving registration", socket=str(self.socket_path))

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _register(self, request: v1beta1.RegisterRequest) -> None:
        resource, endpoint_name = request.resource_name, request.endpoint
        log.info("registration request", resource=resource, endpoint=endpoint_name, version=request.version)
        # Same messages as upstream; a plain Go error reaches the plugin as status UNKNOWN.
        if request.version != SUPPORTED_VERSION:
            raise await self._reject(
                request,
                f"requested API version {request.version!r} is not supported by kubelet. "
                f"Supported versions are [{SUPPORTED_VERSION!r}]",
            )
        if not is_extended_resource_name(resource):
            raise await self._reject(request, f"the ResourceName {resource!r} is invalid")

        channel = Channel(path=str(self.directory / endpoint_name))
        try:
            options = await self._connect(request, channel)
        except BaseException:
            channel.close()
            raise

        endpoint = _Endpoint(resource, endpoint_name, channel, options)
        old = self._endpoints.get(resource)
        self._endpoints[resource] = endpoint
        if old is not None:
            # The newest registration wins; the older endpoint's stream is closed without marking anything unhealthy.
            log.info("replacing endpoint", resource=resource, old=old.endpoint, new=endpoint_name)
            await self._stop_endpoint(old)
        if request.options is not None and bytes(request.options) != bytes(options):
            self._warn(f"{resource}: Register options {request.options} differ from GetDevicePluginOptions {options}")
        endpoint.task = self._tasks.spawn(self._watch(endpoint), f"list-and-watch:{resource}", expect_end=True)
        registration = Registration(
            index=len(self._registrations),
            resource=resource,
            endpoint=endpoint_name,
            options=options,
            request_options=request.options,
            monotonic_s=time.monotonic(),
        )
        self._registrations.append(registration)
        log.info("registered", resource=resource, endpoint=endpoint_name, options=options.to_dict())
        await self._notify()

    async def _connect(self, request: v1beta1.RegisterRequest, channel: Channel) -> v1beta1.DevicePluginOptions:
        try:
            await self._dial(channel)
        except ConnectionError as exc:
            raise await self._reject(request, f"failed to dial device plugin: {exc}") from exc
        try:
            # Before answering Register, as the kubelet's PluginConnected does.
            return await v1beta1.DevicePluginStub(channel).get_device_plugin_options(
                v1beta1.Empty(), timeout=self.settings.options_timeout_s
            )
        except _RPC_FAILURES as exc:
            raise await self._reject(request, f"failed to get device plugin options: {exc!r}") from exc

    async def _reject(self, request: v1beta1.RegisterRequest, message: str) -> grpclib.GRPCError:
        """Record a refused registration and build the error Register answers with."""
        self._rejections.append(
            Rejection(request.resource_name, request.endpoint, request.version, message, time.monotonic())
        )
        log.info("registration rejected", resource=request.resource_name, reason=message)
        await self._notify()
        return grpclib.GRPCError(Status.UNKNOWN, message)

    async def _dial(self, channel: Channel) -> None:
        """Connect like grpc-go's blocking dial: retry with backoff until the socket answers or time runs out."""
        delay_s = 0.01
        last: OSError | None = None
        try:
            async with asyncio.timeout(self.settings.dial_timeout_s):
                while True:
                    try:
                        await channel.__connect__()
                        return
                    except OSError as exc:
                        last = exc
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 1.0)
        except TimeoutError:
            raise ConnectionError(f"context deadline exceeded dialling {channel}: {last!r}") from last

    async def _watch(self, endpoint: _Endpoint) -> None:
        """Hold the endpoint's ListAndWatch stream open and fold every message into the device list."""
        error: str | None = None
        try:
            async with endpoint.channel.request(
                _LIST_AND_WATCH, Cardinality.UNARY_STREAM, v1beta1.Empty, v1beta1.ListAndWatchResponse
            ) as stream:
                await stream.send_message(v1beta1.Empty(), end=True)
                endpoint.stream_open = True
                await self._notify()
                async for message in stream:
                    if self._endpoints.get(endpoint.resource) is endpoint:
                        self._update_devices(endpoint.resource, message)
                        await self._notify()
        except grpclib.GRPCError as exc:
            error = f"{exc.status.name}: {exc.message}"
        except Exception as exc:
            # Any failure ends the stream for the kubelet too (a Recv error); the plugin must register again.
            error = repr(exc)
        finally:
            endpoint.stream_open = False
            endpoint.channel.close()
        if self._endpoints.get(endpoint.resource) is endpoint and not endpoint.stopped:
            endpoint.stopped = True
            # markResourceUnhealthy: capacity keeps the devices, allocatable drops to 0.
            devices = self._devices.get(endpoint.resource, {})
            self._devices[endpoint.resource] = {
                i: DeviceState(Health.UNHEALTHY, d.numa_nodes) for i, d in devices.items()
            }
            self._stream_ends.append(StreamEnd(endpoint.resource, endpoint.endpoint, error, time.monotonic()))
            log.warning("ListAndWatch ended", resource=endpoint.resource, endpoint=endpoint.endpoint, error=error)
            await self._notify()

    def _update_devices(self, resource: str, message: v1beta1.ListAndWatchResponse) -> None:
        devices: dict[str, DeviceState] = {}
        for device in message.devices:
            if len(device.id) > MAX_DEVICE_ID_LENGTH:
                self._warn(f"{resource}: device ID longer than {MAX_DEVICE_ID_LENGTH} characters: {device.id!r}")
            nodes = tuple(n.id for n in device.topology.nodes) if device.topology is not None else ()
            devices[device.id] = DeviceState(device.health, nodes)
        self._devices[resource] = devices
        log.debug("devices updated", resource=resource, total=len(devices), healthy=self.allocatable(resource))

    async def _stop_endpoint(self, endpoint: _Endpoint) -> None:
        endpoint.stopped = True
        if endpoint.task is not None:
            endpoint.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await endpoint.task
        endpoint.channel.close()

    async def _drop_endpoints(self) -> None:
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        for endpoint in endpoints:
            await self._stop_endpoint(endpoint)

    def _wipe_directory(self) -> None:
        """The kubelet's start-up cleanup: every non-directory entry but the checkpoint goes, sockets included.

        ``DEPRECATION`` stays when this kubelet wants it: the kubelet writes it again at once, and a plugin that
        serves again in between must not take it for a kubelet that wants ``Register``.
        """
        for entry in os.scandir(self.directory):
            if entry.name == CHECKPOINT_FILE or entry.is_dir(follow_symlinks=True):
                continue
            if entry.name == DEPRECATION_FILE and self.plugin_watcher:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)

    # The plugin watcher (pkg/kubelet/pluginmanager), for device plugins only.

    def _write_deprecation(self) -> None:
        registry = self.settings.plugins_registry_dir
        if registry is not None:
            registry.mkdir(parents=True, exist_ok=True)
            (self.directory / DEPRECATION_FILE).touch()

    def _start_plugin_watcher(self) -> None:
        registry = self.settings.plugins_registry_dir
        if registry is not None:
            self._registry_watch = self._tasks.spawn(self._watch_registry(registry), "plugin-watcher")

    async def _stop_plugin_watcher(self) -> None:
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
                        task = self._tasks.spawn(
                            self._register_watched(registry / name), f"plugin-watcher:{name}", expect_end=True
                        )
                        watched[name] = _WatchedSocket(identity, task)
                await asyncio.sleep(self.settings.registry_poll_s)
        finally:
            for socket in watched.values():
                socket.task.cancel()

    async def _register_watched(self, socket: Path) -> None:
        """The plugin watcher's RegisterPlugin: GetInfo, register as ``Register`` does, NotifyRegistrationStatus."""
        channel = Channel(path=str(socket))
        try:
            stub = pluginregistration.RegistrationStub(channel)
            try:
                await self._dial(channel)
                info = await stub.get_info(pluginregistration.InfoRequest(), timeout=self.settings.get_info_timeout_s)
            except _RPC_FAILURES as exc:
                log.warning("plugin watcher: GetInfo failed", socket=str(socket), error=repr(exc))
                return
            error = await self._register_plugin(socket, info)
            status = pluginregistration.RegistrationStatus(plugin_registered=error is None, error=error or "")
            try:
                await stub.notify_registration_status(status, timeout=self.settings.notify_timeout_s)
            except _RPC_FAILURES as exc:
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
                raise await self._reject(request, f"no handler registered for plugin type: {info.type}")
            await self._register(request)
        except grpclib.GRPCError as exc:
            return f"RegisterPlugin error -- {exc.message}"
        return None

    # Admission.

    async def admit(self, pod: str, containers: Sequence[Mapping[str, int]]) -> Admission:
        """Admit ``pod`` whose containers ask for ``{resource: count}``; raises AdmissionError, freeing the pod."""
        async with self._admission_lock:
            if pod in self._pods:
                raise ValueError(f"pod {pod!r} is already admitted")
            self._pods[pod] = {}
            try:
                admitted = await self._admit(pod, containers)
            except BaseException:
                self._pods.pop(pod, None)
                await self._notify()
                await self._write_checkpoint()
                raise
            await self._notify()
            return admitted

    async def remove_pod(self, pod: str) -> None:
        """Free the pod's devices and update the checkpoint; a pod that is not there is ignored, as upstream."""
        if self._pods.pop(pod, None) is None:
            return
        log.info("pod removed", pod=pod)
        await self._notify()
        await self._write_checkpoint()

    async def _admit(self, pod: str, containers: Sequence[Mapping[str, int]]) -> Admission:
        admitted: list[dict[str, ResourceAllocation]] = []
        for n, requests in enumerate(containers):
            name = f"container-{n}"
            allocations: dict[str, ResourceAllocation] = {}
            for resource, count in requests.items():
                if count < 0:
                    raise ValueError(f"negative request {count} for {resource}")
                if count:
                    allocations[resource] = await self._allocate(pod, name, resource, count)
            admitted.append(allocations)
            # Upstream writes the checkpoint after each container's allocation.
            await self._write_checkpoint()
        # PreStartContainer comes later, when each container starts; its failure fails the pod here.
        for allocations in admitted:
            for resource, allocation in list(allocations.items()):
                allocations[resource] = await self._pre_start(pod, resource, allocation)
        result = Admission(
            pod,
            tuple(ContainerAdmission(f"container-{n}", MappingProxyType(a)) for n, a in enumerate(admitted)),
        )
        log.info("pod admitted", pod=pod, containers=len(result.containers))
        return result

    def _available(self, resource: str) -> list[str]:
        in_use = self.in_use(resource)
        return [i for i, d in self._devices.get(resource, {}).items() if d.healthy and i not in in_use]

    async def _allocate(self, pod: str, container: str, resource: str, count: int) -> ResourceAllocation:
        endpoint = self._endpoints.get(resource)
        if endpoint is None or resource not in self._devices:
            raise AdmissionError(pod, resource, f"cannot allocate unregistered device {resource}")
        available = self._available(resource)
        if len(available) < count:
            raise AdmissionError(
                pod,
                resource,
                f"requested number of devices unavailable for {resource}. Requested: {count}, "
                f"Available: {len(available)}",
            )

        preferred: tuple[str, ...] | None = None
        preferred_s: float | None = None
        chosen = available[:count]
        if endpoint.options.get_preferred_allocation_available:
            request = v1beta1.PreferredAllocationRequest(
                container_requests=[
                    v1beta1.ContainerPreferredAllocationRequest(
                        available_deviceIDs=list(available), must_include_deviceIDs=[], allocation_size=count
                    )
                ]
            )
            began = time.perf_counter()
            answer = await self._call(
                pod,
                resource,
                "GetPreferredAllocation",
                endpoint.stub.get_preferred_allocation(request, timeout=self.settings.preferred_allocation_timeout_s),
            )
            preferred_s = time.perf_counter() - began
            preferred = tuple(answer.container_responses[0].device_i_ds) if answer.container_responses else ()
            chosen = self._take_preferred(resource, preferred, available, count)

        # Taken before Allocate, as upstream marks them allocated before the call.
        self._pods[pod].setdefault(container, {})[resource] = tuple(chosen)
        began = time.perf_counter()
        response = await self._call(
            pod,
            resource,
            "Allocate",
            endpoint.stub.allocate(
                v1beta1.AllocateRequest(container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=chosen)]),
                timeout=self.settings.allocate_timeout_s,
            ),
        )
        allocate_s = time.perf_counter() - began
        if not response.container_responses:
            raise AdmissionError(pod, resource, f"no containers return in allocation response {response}")
        log.debug("allocated", pod=pod, container=container, resource=resource, devices=chosen, allocate_s=allocate_s)
        return ResourceAllocation(
            resource=resource,
            device_ids=tuple(chosen),
            response=response.container_responses[0],
            preferred=preferred,
            preferred_allocation_s=preferred_s,
            allocate_s=allocate_s,
        )

    def _take_preferred(self, resource: str, preferred: tuple[str, ...], available: list[str], count: int) -> list[str]:
        """Upstream treats the answer as a hint: valid preferred IDs first, then the rest of ``available``."""
        if len(preferred) != count or len(set(preferred)) != count or not set(preferred) <= set(available):
            self._warn(
                f"{resource}: GetPreferredAllocation answered {list(preferred)} for size {count} "
                f"from {available}; falling back"
            )
        chosen = list(dict.fromkeys(i for i in preferred if i in set(available)))[:count]
        chosen += [i for i in available if i not in chosen][: count - len(chosen)]
        return chosen

    async def _pre_start(self, pod: str, resource: str, allocation: ResourceAllocation) -> ResourceAllocation:
        endpoint = self._endpoints.get(resource)
        if endpoint is None or not endpoint.options.pre_start_required:
            return allocation
        began = time.perf_counter()
        await self._call(
            pod,
            resource,
            "PreStartContainer",
            endpoint.stub.pre_start_container(
                v1beta1.PreStartContainerRequest(devices_ids=list(allocation.device_ids)),
                timeout=self.settings.pre_start_timeout_s,
            ),
        )
        return dataclasses.replace(allocation, pre_start_s=time.perf_counter() - began)

    async def _call(self, pod: str, resource: str, method: str, call: Awaitable[_T]) -> _T:
        """One RPC to the plugin; any failure becomes an AdmissionError naming the method and the plugin's status."""
        try:
            return await call
        except grpclib.GRPCError as exc:
            raise AdmissionError(pod, resource, f"{method}: {exc.message}", status=exc.status) from exc
        except TimeoutError as exc:
            raise AdmissionError(
                pod, resource, f"{method}: deadline exceeded", status=Status.DEADLINE_EXCEEDED
            ) from exc
        except (OSError, grpclib.exceptions.StreamTerminatedError, grpclib.exceptions.ProtocolError) as exc:
            raise AdmissionError(pod, resource, f"{method}: {exc!r}", status=Status.UNAVAILABLE) from exc

    async def _write_checkpoint(self) -> None:
        async with self._checkpoint_lock:
            # Snapshot on the loop, write in a thread: the loop never blocks on the disk.
            data = json.dumps(
                {
                    p: {c: {r: list(ids) for r, ids in rs.items()} for c, rs in cs.items()}
                    for p, cs in self._pods.items()
                },
                indent=2,
                sort_keys=True,
            )
            await asyncio.to_thread(_replace_file, self.checkpoint_path, data)

    # Notification.

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _warn(self, message: str) -> None:
        self._warnings.append(message)
        log.warning("plugin misbehaved", detail=message)


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


def _replace_file(path: Path, data: str) -> None:
    """Write then rename, so a reader (or a crash) never sees half a checkpoint."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
