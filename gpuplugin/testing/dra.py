"""The kubelet's DRA manager, played over real unix sockets: its plugin watcher finds a DRA plugin's registration
socket in ``plugins_registry``, asks ``GetInfo``, picks the newest DRAPlugin service both sides know, reports with
``NotifyRegistrationStatus``, then calls NodePrepareResources and NodeUnprepareResources as a pod comes and goes.

``ClaimTable`` plays the API server's part: the claims the scheduler allocated, read by the plugin under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality

from gpuplugin.dra.claims import AllocatedDevice, Allocation, ClaimRef, ClaimUnavailable, opaque_configs
from gpuplugin.kubelet.api import pluginregistration, v1alpha1
from gpuplugin.kubelet.api.k8s.io.kubelet.pkg.apis.dra import v1, v1beta1
from gpuplugin.testing.plugin_watcher import _sockets_in
from gpuplugin.testing.registration_server import RPC_FAILURES

log = structlog.get_logger("gpuplugin.testing.dra")

DRA_PLUGIN_TYPE = "DRAPlugin"
#: What a 1.34 kubelet speaks, newest first (``servicesSupportedByKubelet``).
KUBELET_SERVICES: tuple[tuple[str, ModuleType], ...] = (("v1.DRAPlugin", v1), ("v1beta1.DRAPlugin", v1beta1))
#: The optional resource-health service a 1.34 kubelet (ResourceHealthStatus gate on) opens a stream to.
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"
#: The kubelet's own deadline on a DRA call (``defaultClientCallTimeout``).
CALL_TIMEOUT_S = 45.0


@dataclass
class ClaimTable:
    """Allocated claims by UID, as the scheduler wrote them into their status; a ClaimSource."""

    claims: dict[str, tuple[ClaimRef, str, tuple[AllocatedDevice, ...], Any]] = field(default_factory=dict)
    reads: int = 0

    def allocate(
        self,
        driver: str,
        pool: str,
        devices: Mapping[str, Sequence[str]],
        *,
        namespace: str = "default",
        config: Any = None,
    ) -> ClaimRef:
        """A new claim given ``devices`` (request name → device names) of ``driver``'s ``pool``, and ``config``
        as the allocation result's ``config`` list (opaque configs of any driver)."""
        uid = str(uuid.uuid4())
        claim = ClaimRef(namespace, f"claim-{uid[:8]}", uid)
        results = tuple(AllocatedDevice(request, pool, name) for request, names in devices.items() for name in names)
        self.claims[uid] = (claim, driver, results, config)
        return claim

    async def allocation(self, claim: ClaimRef, driver: str) -> Allocation:
        self.reads += 1
        known = self.claims.get(claim.uid)
        if known is None or known[0] != claim:
            raise ClaimUnavailable(f"claim {claim.namespace}/{claim.name} not found")
        if known[1] != driver:
            return Allocation(())
        return Allocation(known[2], opaque_configs(known[3], claim, driver))


class PodNotStarted(Exception):
    """A claim of the pod was not prepared; the message is the plugin's error, as the pod's events show it."""


@dataclass
class RegisteredPlugin:
    """A DRA plugin the watcher registered: its driver name, socket and the service version chosen."""

    driver: str
    endpoint: str
    service: str
    api: ModuleType
    services: tuple[str, ...]
    """Every service the plugin listed, the optional resource-health one included."""


@dataclass(frozen=True, slots=True)
class Deregistered:
    """A registered plugin's registration socket went away."""

    driver: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A plugin offered a registration the kubelet refused; the message is what NotifyRegistrationStatus said."""

    socket: str
    message: str


DraEvent = RegisteredPlugin | Deregistered | Rejected


class DraKubelet:
    """The plugin watcher for DRA plugins and the DRA manager's client; an async context manager. ``on_event`` is
    called on the loop with each registration, deregistration and rejection, as they happen."""

    def __init__(
        self, registry_dir: Path, *, poll_s: float = 0.01, on_event: Callable[[DraEvent], None] | None = None
    ) -> None:
        self.registry_dir = registry_dir
        self._poll_s = poll_s
        self._on_event = on_event or (lambda _event: None)
        self.plugins: dict[str, RegisteredPlugin] = {}
        self.rejections: list[str] = []
        """The errors NotifyRegistrationStatus reported, in order."""
        self._changed = asyncio.Condition()
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DraKubelet:
        self._watch = asyncio.create_task(self._watch_registry(), name="dra-kubelet:plugin-watcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_registered(self, driver: str, timeout_s: float = 5.0) -> RegisteredPlugin:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: driver in self.plugins)
        return self.plugins[driver]

    async def wait_gone(self, driver: str, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: driver not in self.plugins)

    async def prepare(self, driver: str, claims: Sequence[ClaimRef]) -> Any:
        """NodePrepareResources through the chosen service; the response message of its version."""
        plugin = self.plugins[driver]
        request = plugin.api.NodePrepareResourcesRequest(claims=[_claim(plugin.api, c) for c in claims])
        return await self._call(plugin, "node_prepare_resources", request)

    async def start_pod(
        self, driver: str, containers: Mapping[str, Sequence[tuple[ClaimRef, str]]]
    ) -> dict[str, list[str]]:
        """What the kubelet does as a pod starts: one NodePrepareResources for the distinct claims its containers
        name (a claim two containers name is prepared once), then each container's CDI device IDs, those of the
        requests it names (``""``: every request of the claim), as it hands them to the runtime.

        ``containers``: container name → (claim, request) it names. Raises PodNotStarted with a claim's error.
        """
        claims = list(dict.fromkeys(claim for named in containers.values() for claim, _ in named))
        response = await self.prepare(driver, claims)
        for claim in claims:
            error = response.claims[claim.uid].error
            if error:
                raise PodNotStarted(f"claim {claim.namespace}/{claim.name}: {error}")
        cdi_ids: dict[str, list[str]] = {}
        for container, named in containers.items():
            ids = cdi_ids.setdefault(container, [])
            for claim, request in named:
                for device in response.claims[claim.uid].devices:
                    if not request or request in device.request_names:
                        ids.extend(i for i in device.cdi_device_ids if i not in ids)
        return cdi_ids

    async def unprepare(self, driver: str, claims: Sequence[ClaimRef]) -> Any:
        plugin = self.plugins[driver]
        request = plugin.api.NodeUnprepareResourcesRequest(claims=[_claim(plugin.api, c) for c in claims])
        return await self._call(plugin, "node_unprepare_resources", request)

    @asynccontextmanager
    async def health_stream(self, driver: str) -> AsyncIterator[Stream[Any, Any]]:
        """The plugin's NodeWatchResources stream, as the kubelet opens it when the plugin lists the service;
        ``await stream.recv_message()`` reads each device list."""
        plugin = self.plugins[driver]
        if HEALTH_SERVICE not in plugin.services:
            raise LookupError(f"{driver} does not list {HEALTH_SERVICE}")
        channel = Channel(path=plugin.endpoint)
        try:
            async with channel.request(
                f"/{HEALTH_SERVICE}/NodeWatchResources",
                Cardinality.UNARY_STREAM,
                v1alpha1.NodeWatchResourcesRequest,
                v1alpha1.NodeWatchResourcesResponse,
            ) as stream:
                await stream.send_message(v1alpha1.NodeWatchResourcesRequest(), end=True)
                try:
                    yield stream
                finally:
                    await stream.cancel()
        finally:
            channel.close()

    async def _call(self, plugin: RegisteredPlugin, method: str, request: Any) -> Any:
        channel = Channel(path=plugin.endpoint)
        try:
            return await getattr(plugin.api.DraPluginStub(channel), method)(request, timeout=CALL_TIMEOUT_S)
        finally:
            channel.close()

    async def _watch_registry(self) -> None:
        """Register each socket created in the registry; a socket removed deregisters its plugin."""
        seen: dict[str, tuple[int, int]] = {}
        owners: dict[str, str] = {}
        while True:
            sockets = await asyncio.to_thread(_sockets_in, self.registry_dir)
            for name in [n for n in seen if sockets.get(n) != seen[n]]:
                del seen[name]
                driver = owners.pop(name, None)
                if driver is not None:
                    await self._update(lambda d=driver: self.plugins.pop(d, None))
                    log.info("DRA plugin deregistered", driver=driver)
                    self._on_event(Deregistered(driver))
            for name, identity in sockets.items():
                if name not in seen:
                    seen[name] = identity
                    plugin = await self._register(self.registry_dir / name)
                    if plugin is not None:
                        owners[name] = plugin.driver
                        await self._update(lambda p=plugin: self.plugins.__setitem__(p.driver, p))
                        self._on_event(plugin)
            await asyncio.sleep(self._poll_s)

    async def _update(self, change: Any) -> None:
        async with self._changed:
            change()
            self._changed.notify_all()

    async def _register(self, socket: Path) -> RegisteredPlugin | None:
        """GetInfo, validation, NotifyRegistrationStatus: the plugin registered, or None."""
        channel = Channel(path=str(socket))
        try:
            stub = pluginregistration.RegistrationStub(channel)
            try:
                info = await stub.get_info(pluginregistration.InfoRequest(), timeout=5.0)
            except RPC_FAILURES as exc:
                log.warning("DRA plugin watcher: GetInfo failed", socket=str(socket), error=repr(exc))
                return None
            plugin, error = _validate(info)
            if error:
                self.rejections.append(error)
                self._on_event(Rejected(str(socket), error))
            status = pluginregistration.RegistrationStatus(plugin_registered=plugin is not None, error=error)
            with contextlib.suppress(*RPC_FAILURES):
                await stub.notify_registration_status(status, timeout=5.0)
            return plugin
        finally:
            channel.close()


def _validate(info: pluginregistration.PluginInfo) -> tuple[RegisteredPlugin | None, str]:
    if info.type != DRA_PLUGIN_TYPE:
        return None, f"no handler registered for plugin type: {info.type}"
    if not info.supported_versions:
        return None, "empty list of supported gRPC services (aka supported versions)"
    for service, api in KUBELET_SERVICES:
        if service in info.supported_versions:
            return RegisteredPlugin(info.name, info.endpoint, service, api, tuple(info.supported_versions)), ""
    return None, f"none of the supported services {list(info.supported_versions)} is known"


def _claim(api: ModuleType, claim: ClaimRef) -> Any:
    return api.Claim(namespace=claim.namespace, uid=claim.uid, name=claim.name)
