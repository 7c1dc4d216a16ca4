"""Slicing a parent's tree: whole GPUs into simulated partitions by layout, real MIG devices named by profile, and
both served under the strategy's resource names. Pure: the same tree and settings give the same partitions."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import structlog

from gpuplugin.backends.partitioned.placement import LayoutError, Placement, fill, place
from gpuplugin.backends.partitioned.profiles import ProfileError, ProfileTable, profile_name
from gpuplugin.backends.partitioned.settings import PartitionedSettings, Strategy
from gpuplugin.core.model import ContainerSpec, Device, DeviceNode, DeviceTree, ResourceRules, frozen_mapping
from gpuplugin.devices.mps import MPS_GPU_ATTRIBUTE, ControlDaemonSettings, MpsShare, mps_spec, thread_percentage
from gpuplugin.devices.strategies import VISIBLE_DEVICES

log = structlog.get_logger("gpuplugin.partitioned")

#: Fixed namespace of simulated MIG UUIDs; changing it changes every simulated partition's ID.
_MIG_NAMESPACE = uuid.UUID("1c3c5f4e-7d0a-5b8e-9f62-4a1d2e3b7c90")
#: Host node of simulated capability devices: /dev/null exists everywhere, so a pod starts on any node.
SIMULATED_CAPS_HOST_PATH = "/dev/null"

TableOf = Callable[[Device], ProfileTable]
"""The profile table of one whole GPU of the parent tree; raises ProfileError when it has none."""


class StrategyError(ValueError):
    """The partitions cannot be served under the strategy (``single`` with several profiles); the message names
    what was found. Retrying does not help; changing the layouts or the strategy does."""


@dataclass(frozen=True, slots=True)
class _Partition:
    device: Device
    profile: str
    gpu_label: str


def partition_id(parent_uuid: str, gpu_instance: int, compute_instance: int) -> str:
    """A simulated partition's ID in the MIG UUID form, the same for the same parent and instance on every start."""
    return f"MIG-{uuid.uuid5(_MIG_NAMESPACE, f'{parent_uuid}/{gpu_instance}/{compute_instance}')}"


def mps_partition_id(parent_uuid: str, gpu_instance: int) -> str:
    """An MPS partition's ID: its GPU's UUID and its number, so no made-up MIG UUID ever reaches a runtime."""
    return f"{parent_uuid}::mps{gpu_instance}"


def cap_minors(gpu_minor: int, gpu_instance: int, compute_instance: int) -> tuple[int, int]:
    """Capability minors as the driver's ``mig-minors`` table numbers them: 1 and 2 are config and monitor, then per
    GPU 15 GPU instances of one access minor and 8 compute-instance minors each."""
    gi_minor = 3 + gpu_minor * 15 * 9 + gpu_instance * 9
    return gi_minor, gi_minor + 1 + compute_instance


def domain_of(resource: str) -> str:
    return resource.partition("/")[0]


def mig_resource(domain: str, profile: str) -> str:
    """``<domain>/mig-<profile>``, a ``+`` in the profile becoming ``.`` as the kubelet allows no ``+``."""
    return f"{domain}/mig-{profile.replace('+', '.')}"


def _index(device: Device, position: int) -> int:
    raw = device.attributes.get("index", device.attributes.get("parent_index"))
    return int(raw) if raw is not None and raw.isdecimal() else position


def _uuid(device: Device) -> str:
    return device.attributes.get("uuid", device.gpu)


def simulated_spec(parent: ContainerSpec, device_id: str, caps: tuple[int, int]) -> ContainerSpec:
    """The parent's spec naming the partition instead of the GPU, plus the capability nodes a MIG device needs."""
    # CDI names and joined annotations name the whole GPU; a partition must not carry them.
    nodes = tuple(DeviceNode(SIMULATED_CAPS_HOST_PATH, f"/dev/nvidia-caps/nvidia-cap{minor}", "rw") for minor in caps)
    return ContainerSpec(
        env=parent.env,
        list_env=frozen_mapping({**parent.list_env, VISIBLE_DEVICES: device_id}),
        device_nodes=(*parent.device_nodes, *nodes),
        mounts=parent.mounts,
        annotations=parent.annotations,
    )


def _simulated(
    device: Device,
    index: int,
    placements: tuple[Placement, ...],
    table: ProfileTable,
    mps: ControlDaemonSettings | None,
) -> list[Device]:
    """The partitions of one whole GPU: MPS partitions with ``mps``, else simulated MIG devices."""
    parent_uuid = _uuid(device)
    minor_text = device.attributes.get("minor", "")
    minor = int(minor_text) if minor_text.isdecimal() else index
    partitions = []
    for number, placement in enumerate(placements):
        # GPU instances numbered from 1 in slice order; one compute instance spanning each (ID 0), as mig-parted makes.
        gi, ci = number + 1, 0
        profile = placement.profile
        device_id = partition_id(parent_uuid, gi, ci) if mps is None else mps_partition_id(parent_uuid, gi)
        attributes = {
            "profile": profile.name,
            "parent_uuid": parent_uuid,
            "parent_index": str(index),
            "start_slice": str(placement.start),
            "compute_slices": str(profile.compute_slices),
            "memory_slices": str(profile.memory_slices),
            "memory_mib": str(profile.memory_mib),
            "gpu_instance_id": str(gi),
            "compute_instance_id": str(ci),
        }
        if mps is None:
            attributes["simulated"] = "true"
            spec = simulated_spec(device.spec, device_id, cap_minors(minor, gi, ci))
        else:
            share = MpsShare(profile.memory_mib, thread_percentage(profile.compute_slices, table.compute_slices))
            attributes.update(
                {"isolation": "mps", MPS_GPU_ATTRIBUTE: parent_uuid, "thread_percentage": str(share.thread_percentage)}
            )
            spec = mps_spec(device.spec, parent_uuid, share, mps)
        if "model" in device.attributes:
            attributes["model"] = device.attributes["model"]
        partitions.append(
            Device(
                id=device_id,
                resource=device.resource,
                gpu=device.gpu,
                spec=spec,
                numa_node=device.numa_node,
                health=device.health,
                instance=(gi, ci),
                attributes=frozen_mapping(attributes),
            )
        )
    return partitions


def real_profile(device: Device) -> str:
    """The profile of a MIG device the parent reported, from its slices and memory as NVIDIA names it."""
    attributes = device.attributes
    memory = int(attributes["memory_mib"])
    total_text = attributes.get("parent_memory_mib", "")
    # Without the GPU's memory, whole GiB rounded up is the best name left.
    total = int(total_text) if total_text.isdecimal() else None
    gi_slices = int(attributes["gpu_instance_slices"])
    ci_slices = int(attributes.get("compute_instance_slices", gi_slices))
    if total is None:
        return f"{gi_slices}g.{-(-memory // 1024)}gb"
    return profile_name(gi_slices, memory, total, compute_instance_slices=ci_slices)


def _real(device: Device, position: int) -> Device:
    profile = real_profile(device)
    attributes = dict(device.attributes)
    attributes.setdefault("parent_index", str(_index(device, position)))
    attributes["profile"] = profile
    return replace(device, attributes=frozen_mapping(attributes))


def _placements(
    device: Device, index: int, settings: PartitionedSettings, table_of: TableOf
) -> tuple[tuple[Placement, ...], ProfileTable] | None:
    layout, source = settings.layout_of(index, _uuid(device))
    if layout.whole:
        return None
    label = f"{index} ({_uuid(device)})"
    try:
        table = table_of(device)
        if layout.fill is not None:
            return fill(label, table.get(layout.fill), table, source=source), table
        return place(label, [table.get(name) for name in layout.profiles], table, source=source), table
    except ProfileError as error:
        raise LayoutError(f"partitioned.{source}.gpu {label}: {error}") from None


def slice_tree(parent: DeviceTree, settings: PartitionedSettings, table_of: TableOf) -> DeviceTree:
    """The tree to serve: the parent's tree under ``none``; otherwise partitions under the strategy's names.

    Raises LayoutError for a layout that does not fit, StrategyError for partitions ``single`` cannot serve.
    """
    if settings.strategy is Strategy.NONE:
        return parent
    partitions: list[_Partition] = []
    whole: list[Device] = []
    seen: set[int | str] = set()
    for position, device in enumerate(parent.devices):
        index = _index(device, position)
        seen.update((index, _uuid(device), device.attributes.get("parent_uuid", "")))
        if device.instance is not None:
            real = _real(device, position)
            partitions.append(_Partition(real, real.attributes["profile"], str(index)))
            continue
        placed = _placements(device, index, settings, table_of)
        if placed is None:
            whole.append(device)
            continue
        mps = settings.mps if settings.uses_mps else None
        partitions += [
            _Partition(p, p.attributes["profile"], str(index)) for p in _simulated(device, index, *placed, mps)
        ]
    unknown = [key for key in settings.layouts if key not in seen]
    if unknown:
        log.warning("layouts name gpus the parent does not serve", gpus=[str(k) for k in unknown])
    served = _name(partitions, whole, settings)
    rules = dict(parent.rules)
    for device in served:
        if device.instance is not None:
            # One MPS client has one share; a second partition would need a second client, so one per container.
            per_container = 1 if MPS_GPU_ATTRIBUTE in device.attributes else None
            if rules.get(device.resource, ResourceRules()).max_devices_per_container == 1:
                per_container = 1
            rules[device.resource] = ResourceRules(
                allocation_policy=settings.allocation_policy, max_devices_per_container=per_container
            )
    return DeviceTree(devices=tuple(served), links=parent.links, rules=MappingProxyType(rules))


def _name(partitions: list[_Partition], whole: list[Device], settings: PartitionedSettings) -> list[Device]:
    if settings.strategy is Strategy.SINGLE:
        profiles: dict[str, list[str]] = {}
        for partition in partitions:
            gpus = profiles.setdefault(partition.profile, [])
            if partition.gpu_label not in gpus:
                gpus.append(partition.gpu_label)
        if len(profiles) > 1:
            found = "; ".join(f"{profile} on gpu {', '.join(gpus)}" for profile, gpus in profiles.items())
            raise StrategyError(
                f"partitioned.strategy single: every partition on the node must be one profile, found {found}; "
                "use strategy mixed or one profile everywhere"
            )
        if partitions and whole:
            raise StrategyError(
                "partitioned.strategy single: every GPU must be partitioned, but gpu "
                f"{', '.join(d.attributes.get('index', d.id) for d in whole)} is served whole (layout none)"
            )
        return [p.device for p in partitions] + whole
    served = list(whole)
    for partition in partitions:
        resource = mig_resource(domain_of(partition.device.resource), partition.profile)
        served.append(replace(partition.device, resource=resource))
    return served


def profile_counts(tree: DeviceTree) -> Mapping[str, int]:
    """How many partitions of each profile a served tree has, for the log."""
    counts: dict[str, int] = {}
    for device in tree.devices:
        if "profile" in device.attributes:
            counts[device.attributes["profile"]] = counts.get(device.attributes["profile"], 0) + 1
    return counts
