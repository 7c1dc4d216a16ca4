"""The partitioned backend: a parent backend's GPUs served as MIG partitions, its events passed through."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import structlog

from gpuplugin.backends.partitioned.placement import LayoutError
from gpuplugin.backends.partitioned.profiles import (
    BUILT_IN_TABLES,
    InstanceProfileInfo,
    ProfileError,
    ProfileTable,
    table_from_infos,
)
from gpuplugin.backends.partitioned.settings import PartitionedSettings, Strategy
from gpuplugin.backends.partitioned.slicing import StrategyError, profile_counts, slice_tree
from gpuplugin.backends.registry import BackendContext, UnknownBackend, load_factory
from gpuplugin.core.backend import (
    AllocationPolicyKind,
    Backend,
    BackendEvent,
    InventoryChanged,
    PreferredAllocation,
)
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import Device, DeviceTree
from gpuplugin.devices.mps import ControlDaemons, with_daemon_health

log = structlog.get_logger("gpuplugin.partitioned")


@runtime_checkable
class InstanceProfileSource(Protocol):
    """A parent that reports each GPU's GPU-instance profiles (the NVML backend with ``report_mig_devices``)."""

    def gpu_instance_profiles(self) -> Mapping[str, Sequence[InstanceProfileInfo]]: ...


@runtime_checkable
class PartitionListener(Protocol):
    """A parent that checks what names a partition against the partitions served (the mock's fault injection)."""

    def partitions_served(self, partitions: Mapping[str, Collection[tuple[int, int]]]) -> None: ...


def parent_context(settings: PartitionedSettings, ctx: BackendContext) -> BackendContext:
    """The parent's context: its own options, our health policy and state directory."""
    options: dict[str, Any] = dict(settings.parent_options)
    if settings.parent == "nvml" and settings.strategy is not Strategy.NONE:
        # Real MIG devices and each GPU's profiles come from NVML only when asked for.
        options.setdefault("report_mig_devices", True)
    return BackendContext(options=options, health_policy=ctx.health_policy, state_dir=ctx.state_dir)


def build_parent(settings: PartitionedSettings, ctx: BackendContext) -> Backend:
    """The parent backend, built by its registered factory."""
    try:
        factory = load_factory(settings.parent)
    except UnknownBackend as error:
        raise ConfigError(f"partitioned.parent: {error}") from None
    return factory(parent_context(settings, ctx))


class PartitionedBackend:
    """Serves a parent's GPUs as partitions: simulated ones by layout, real MIG devices where the parent has them.

    Health events pass through unchanged: the core fans a GPU's event out to all its partitions and an event
    naming (GPU instance, compute instance) to that partition alone. An inventory change is sliced again.
    MPS partitions come with their GPU's control daemon, supervised here; while it does not answer, the GPU's
    MPS partitions are served Unhealthy.
    """

    name = "partitioned"

    def __init__(self, settings: PartitionedSettings, parent: Backend) -> None:
        self.settings = settings
        self.parent = parent
        """The backend whose GPUs are sliced; tests reach the mock's fault injection through it."""
        self._tree = DeviceTree()
        self._closed = False
        self.daemons = ControlDaemons(settings.mps, "partitioned")
        """The MPS control daemons of the GPUs with MPS partitions."""

    def allocation_policy(self, resource: str) -> AllocationPolicyKind:
        """Partition resources: the configured policy; the parent's whole GPUs: the parent's choice."""
        rule = self._tree.rules_of(resource).allocation_policy
        if rule is not None:
            return rule
        if isinstance(self.parent, PreferredAllocation):
            return self.parent.allocation_policy(resource)
        return AllocationPolicyKind.TOPOLOGY

    async def start(self) -> None:
        """Start the parent and slice what it discovers; a layout that does not fit stops the start."""
        await self.parent.start()
        try:
            self._tree = self.slice(await self.parent.discover())
            await self.daemons.ensure(self._tree)
        except BaseException:
            await self.daemons.aclose()
            await self.parent.aclose()
            raise
        log.info(
            "partitioned backend started",
            parent=self.settings.parent,
            strategy=str(self.settings.strategy),
            gpus=len(self._tree.gpus()),
            partitions=dict(profile_counts(self._tree)),
            resources=list(self._tree.resources),
            mps=self.settings.uses_mps,
        )

    async def discover(self) -> DeviceTree:
        """The parent's tree, sliced again (so a rediscovery sees the parent's current GPUs)."""
        self._tree = self.slice(await self.parent.discover())
        await self.daemons.ensure(self._tree)
        return self.daemons.fold(self._tree)

    def events(self) -> AsyncIterator[BackendEvent]:
        """The parent's events: health as it is, inventory sliced again, and a new tree when a daemon stops or
        starts answering; until cancelled."""
        if not self.settings.uses_mps:
            return self._sliced_events()
        return with_daemon_health(self._sliced_events(), self.daemons, lambda: self.daemons.fold(self._tree))

    async def _sliced_events(self) -> AsyncGenerator[BackendEvent, None]:
        stream = self.parent.events()
        try:
            async for event in stream:
                if not isinstance(event, InventoryChanged):
                    yield event
                    continue
                try:
                    tree = self.slice(event.tree)
                except (LayoutError, StrategyError) as error:
                    # Serving the last good partitions beats serving none; the operator fixes the layout.
                    log.error("new inventory cannot be partitioned; serving the previous one", error=str(error))
                    continue
                self._tree = tree
                await self.daemons.ensure(tree)
                log.info("inventory changed", partitions=dict(profile_counts(tree)))
                yield InventoryChanged(self.daemons.fold(tree))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        """Close the parent; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.daemons.aclose()
        await self.parent.aclose()

    def slice(self, parent: DeviceTree) -> DeviceTree:
        """The tree to serve for a parent tree. Raises LayoutError or StrategyError naming what is wrong."""
        tree = slice_tree(parent, self.settings, self._table_of)
        if isinstance(self.parent, PartitionListener):
            served: dict[str, set[tuple[int, int]]] = {}
            for device in tree.devices:
                if device.instance is not None:
                    served.setdefault(device.gpu, set()).add(device.instance)
            self.parent.partitions_served(served)
        return tree

    def _table_of(self, device: Device) -> ProfileTable:
        built_in = BUILT_IN_TABLES.get(str(self.settings.profiles))
        if built_in is not None:
            return built_in
        if not isinstance(self.parent, InstanceProfileSource):
            raise ProfileError(f"parent {self.settings.parent!r} reports no GPU-instance profiles")
        infos = self.parent.gpu_instance_profiles().get(device.gpu, ())
        memory = device.attributes.get("memory_mib", "")
        if not memory.isdecimal():
            raise ProfileError("its memory size is unknown, so its profiles cannot be named")
        return table_from_infos(infos, int(memory))
