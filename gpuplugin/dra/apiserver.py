"""The API server side of the DRA driver, through lightkube: the node's ResourceSlices kept in step with the
served tree, and ResourceClaims read for their allocation results.

Imported only in DRA mode: lightkube and its HTTP client cost about 12 MiB of RSS that the device plugin does
not pay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import httpx2
import structlog
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.resources.core_v1 import Node
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

from gpuplugin.core.clock import REAL_CLOCK, Backoff, Clock
from gpuplugin.core.errors import ConfigError, shorten
from gpuplugin.core.model import DeviceTree
from gpuplugin.core.tasks import TaskSet
from gpuplugin.dra.claims import Allocation, ClaimRef, ClaimUnavailable, allocation_of
from gpuplugin.dra.driver import DriverSettings, GateMode
from gpuplugin.dra.slices import (
    NO_REASONS,
    Reasons,
    SliceContent,
    SliceShape,
    gates_kept,
    probe_slice,
    render_slices,
    slice_contents,
)

log = structlog.get_logger("gpuplugin.dra.apiserver")

FIELD_MANAGER = "gpuplugin-dra"
#: How a call to the API server fails: an error status, or no answer.
API_FAILURES = (ApiError, httpx2.HTTPError, OSError)
#: Seconds between retries of a failed publication (doubling, jittered): the API server back within a minute is
#: noticed within a minute, and one that stays away costs a request a minute.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 60.0
#: Seconds between two checks that the node's slices are still on the API server. The kubelet deletes every slice of
#: its node when it starts (and the plugin registers again after it): a check at each registration brings them back
#: at once, and this one in case the deletion lands after it. Each check is one LIST of the node's slices: every 30 s
#: from every node of a large cluster stays a small share of the API server's requests.
RECONCILE_INTERVAL_S = 30.0


def api_client(server: str | None = None) -> AsyncClient:
    """A client for ``server`` (a URL; for tests and kubectl proxy), else the in-cluster service account or the
    kubeconfig that ``KUBECONFIG`` names, as kubectl finds it. Reads files: call it from a worker thread. Raises
    ConfigError, in one line, when there is no way to reach an API server."""
    if server is None:
        try:
            config = KubeConfig.from_env()
        except LightkubeConfigError as exc:
            raise ConfigError(
                f"kube API server: no in-cluster service account and no kubeconfig ({exc}); "
                "set --kube-api-server or KUBECONFIG"
            ) from None
    else:
        # No credentials: a URL is a kubectl proxy or a test's server, which authenticate nobody.
        config = KubeConfig.from_dict(
            {
                "clusters": [{"name": "server", "cluster": {"server": server}}],
                "users": [{"name": "anonymous", "user": {}}],
                "contexts": [{"name": "server", "context": {"cluster": "server", "user": "anonymous"}}],
                "current-context": "server",
            }
        )
    return AsyncClient(config=config, field_manager=FIELD_MANAGER, trust_env=False)


def _failure(exc: BaseException) -> str:
    """One line: the status and message of an error answer, or why no answer came."""
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {exc.status.reason}: {exc.status.message}"
    if isinstance(exc, httpx2.HTTPStatusError):
        response = exc.response
        return f"{response.status_code} {response.reason_phrase} for {exc.request.method} {exc.request.url.path}"
    return shorten(f"{type(exc).__name__}: {exc}")


class ApiClaimSource:
    """Reads ResourceClaims from the API server; a ClaimSource."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def allocation(self, claim: ClaimRef, driver: str) -> Allocation:
        try:
            found = await self._client.get(ResourceClaim, claim.name, namespace=claim.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                raise ClaimUnavailable(f"claim {claim.namespace}/{claim.name} not found") from None
            raise ClaimUnavailable(f"cannot read claim {claim.namespace}/{claim.name}: {_failure(exc)}") from None
        except API_FAILURES as exc:
            raise ClaimUnavailable(f"cannot read claim {claim.namespace}/{claim.name}: {_failure(exc)}") from None
        return allocation_of(found.to_dict(), claim, driver)


class SlicePublisher:
    """Keeps the node's ResourceSlices equal to the last tree given; a TreeSink.

    Each change is a new pool generation, applied server-side slice by slice, then slices no longer needed are
    deleted. A failure is kept in ``problem`` and retried in the background until a publication succeeds. The shape
    (counters for partitions, taints for unhealthy devices) is settled at the first publication: a setting ``auto``
    asks the API server with a dry run whether it keeps the gated fields.
    """

    def __init__(
        self,
        settings: DriverSettings,
        client: AsyncClient,
        *,
        clock: Clock = REAL_CLOCK,
        reconcile_interval_s: float = RECONCILE_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self._client = client
        self._clock = clock
        self._reconcile_interval_s = reconcile_interval_s
        self._reconciling: asyncio.Task[None] | None = None
        self._names: set[str] = set()
        self._tree: DeviceTree | None = None
        self._reasons: Reasons = NO_REASONS
        self.shape: SliceShape | None = None
        """The shape the slices take; None until the first publication settled it."""
        self._published: list[SliceContent] | None = None
        self._generation: int | None = None
        self._owner: Mapping[str, str] | None = None
        self._lock = asyncio.Lock()
        self._tasks = TaskSet("dra-slices")
        self._retry: asyncio.Task[None] | None = None
        self.problem: str | None = None
        """Why the slices on the API server are not the served tree's, one line; None when they are."""
        self.publications = 0
        """Generations published."""
        self.checks = 0
        """Checks of the API server's slices against the last publication, done."""

    async def publish(self, tree: DeviceTree, reasons: Reasons = NO_REASONS) -> None:
        """Publish ``tree``; ``reasons`` says why each open fault is open, for the taints of unhealthy devices."""
        async with self._lock:
            self._tree = tree
            self._reasons = reasons
            await self._publish_logged()
        self._retry_if_needed()
        if self._reconciling is None:
            self._reconciling = self._tasks.supervise(self._reconcile_forever, "reconcile")

    async def reconcile(self) -> None:
        """Publish again if this node's slices on the API server are not the ones last published (the kubelet
        deleted them at its start, or someone else changed them)."""
        async with self._lock:
            if self._tree is None or self._published is None:
                return
            try:
                existing = await self._existing()
            except API_FAILURES as exc:
                log.warning("ResourceSlices not checked", error=_failure(exc))
                return
            finally:
                self.checks += 1
            if existing.keys() == self._names and set(existing.values()) <= {self._generation}:
                return
            log.info(
                "ResourceSlices missing or changed on the API server; publishing again", node=self.settings.node_name
            )
            self._published = None
            await self._publish_logged()
        self._retry_if_needed()

    def _retry_if_needed(self) -> None:
        if self.problem is not None and (self._retry is None or self._retry.done()):
            self._retry = self._tasks.spawn(self._retry_until_published(), "retry", expect_end=True)

    async def _reconcile_forever(self) -> None:
        while True:
            await self._clock.sleep(self._reconcile_interval_s)
            await self.reconcile()

    async def aclose(self) -> None:
        """Stop retrying. The slices stay: the kubelet removes them if the plugin does not come back."""
        await self._tasks.aclose()

    async def _publish_logged(self) -> None:
        try:
            await self._publish()
        except API_FAILURES as exc:
            self.problem = f"cannot publish ResourceSlices: {_failure(exc)}"
            log.warning("ResourceSlices not published", error=self.problem)
        else:
            self.problem = None

    async def _retry_until_published(self) -> None:
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        while self.problem is not None:
            await self._clock.sleep(backoff.next())
            async with self._lock:
                await self._publish_logged()
        log.info("ResourceSlices published again", node=self.settings.node_name)

    async def _publish(self) -> None:
        assert self._tree is not None
        if self.shape is None:
            self.shape = await self._cluster_shape()
        contents = slice_contents(self._tree, self.shape, self._reasons)
        if contents == self._published:
            return
        if self._owner is None:
            node = await self._client.get(Node, self.settings.node_name)
            uid = node.metadata.uid if node.metadata is not None else None
            # Owned by the Node, the slices go when it is deleted; without its UID they are left unowned.
            self._owner = {"name": self.settings.node_name, "uid": uid} if uid else {}
        existing = await self._existing()
        if self._generation is None:
            # A restarted plugin continues after what it published before: consumers keep the highest generation.
            self._generation = max(existing.values(), default=0)
        generation = self._generation + 1
        wanted = render_slices(contents, self.settings, generation, self._owner or None)
        for obj in wanted:
            resource = cast(ResourceSlice, ResourceSlice.from_dict(obj))
            await self._client.apply(resource, field_manager=FIELD_MANAGER, force=True)
        names = {obj["metadata"]["name"] for obj in wanted}
        for name in sorted(existing.keys() - names):
            await self._client.delete(ResourceSlice, name)
        self._generation = generation
        self._published = contents
        self._names = names
        self.publications += 1
        devices = sum(len(content.devices) for content in contents)
        log.info("ResourceSlices published", node=self.settings.node_name, generation=generation, devices=devices)

    async def _cluster_shape(self) -> SliceShape:
        """The shape the settings ask for; for ``auto``, what a dry run of ``probe_slice`` shows the API server
        keeps (a feature gate that is off drops its fields silently: publishing them anyway would lose the counters
        that keep a whole GPU and its partitions apart)."""
        settings = self.settings
        counters = settings.partitionable_devices is GateMode.ON
        taints = settings.device_taints is GateMode.ON
        if GateMode.AUTO in (settings.partitionable_devices, settings.device_taints):
            probe = cast(ResourceSlice, ResourceSlice.from_dict(probe_slice(settings)))
            answer = await self._client.apply(probe, field_manager=FIELD_MANAGER, force=True, dry_run=True)
            kept_counters, kept_taints = gates_kept(answer.to_dict())
            if settings.partitionable_devices is GateMode.AUTO:
                counters = kept_counters
                if not counters:
                    log.info(
                        "the API server drops shared counters (gate DRAPartitionableDevices off); "
                        "partitions are published as devices of their own"
                    )
            if settings.device_taints is GateMode.AUTO:
                taints = kept_taints
                if not taints:
                    log.info(
                        "the API server drops device taints (gate DRADeviceTaints off); "
                        "unhealthy devices leave the slice"
                    )
        return SliceShape(counters, taints, settings.taint_effect, settings.taint_key)

    async def _existing(self) -> dict[str, int]:
        """This node's slices of this driver on the API server: name → pool generation."""
        fields: dict[str, Any] = {"spec.nodeName": self.settings.node_name, "spec.driver": self.settings.driver_name}
        existing: dict[str, int] = {}
        async for found in self._client.list(ResourceSlice, fields=fields):
            if found.metadata is not None and found.metadata.name is not None:
                existing[found.metadata.name] = found.spec.pool.generation
        return existing
