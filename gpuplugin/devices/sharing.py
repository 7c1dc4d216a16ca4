"""Time-slicing: every GPU of a resource served as N replicas, with NVIDIA's ``sharing.timeSlicing`` settings.

Replicas keep their GPU's ``gpu`` and spec, so Allocate names each physical GPU once and a health event on a GPU
reaches all of its replicas. Beyond NVIDIA: per-GPU replica counts (NVIDIA issue 1786), a free ``rename`` per
resource (issue 1121) and a choice of allocation policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Generic, Literal, TypeVar

from msgspec import Meta

from gpuplugin.core.config import Section, Text, decode
from gpuplugin.core.errors import ConfigError, DevicesRefuseConfig
from gpuplugin.core.limits import KUBELET_MAX_MESSAGE_BYTES, MAX_DEVICES_PER_RESOURCE, MAX_LIST_MESSAGE_BYTES
from gpuplugin.core.model import (
    MAX_DEVICE_ID_LENGTH,
    AllocationPolicyKind,
    Device,
    DeviceTree,
    ResourceRules,
    frozen_mapping,
    is_extended_resource_name,
)

#: What ``renameByDefault`` appends to a resource name, as NVIDIA does.
SHARED_SUFFIX = ".shared"
#: Separates a device ID from its replica number, as NVIDIA does (``GPU-…::3``).
REPLICA_SEPARATOR = "::"
#: The attribute a replica carries its number in.
REPLICA_ATTRIBUTE = "replica"
#: Replicas of one GPU at most: what one resource may serve in all (see gpuplugin.core.limits). The replicas of all
#: the GPUs of a resource together are held to the same bound when the GPUs are known, before any is built.
MAX_REPLICAS = MAX_DEVICES_PER_RESOURCE
#: Entries of a ``devices`` list or ``perGpu`` mapping at most: far above any node's GPUs (8 or 16), and low
#: enough that matching them against every GPU stays cheap.
MAX_LISTED_GPUS = 1024

GpuRef = int | str
"""A GPU named in the config: its index (an int, or a string of digits) or its UUID."""

# The sections as written.

ResourceName = Annotated[str, Meta(description="an extended resource name (domain/name)")]
Replicas = Annotated[int, Meta(ge=2, le=MAX_REPLICAS, description="what one resource's ListAndWatch message holds")]
GpuReplicas = Annotated[int, Meta(ge=1, le=MAX_REPLICAS, description="1: that GPU is not shared")]
GpuIndex = Annotated[int, Meta(ge=0, description="a GPU's index, or its UUID")]
GpuRefValue = GpuIndex | Text
#: The policies that make sense for replicas; topology scoring is about links between distinct GPUs.
ReplicaPolicy = Literal["distributed", "packed"]


class ResourceSection(Section):
    """One entry of ``resources``: NVIDIA's ``name``, ``replicas``, ``rename``, ``devices``, and our ``perGpu``."""

    name: ResourceName
    replicas: Replicas
    rename: ResourceName | None = None
    devices: (
        Annotated[Literal["all"], Meta(description="or a list of GPU indices and UUIDs")]
        | Annotated[list[GpuRefValue], Meta(max_length=MAX_LISTED_GPUS)]
        | None
    ) = None
    per_gpu: (
        Annotated[
            dict[GpuRefValue, GpuReplicas],
            Meta(max_length=MAX_LISTED_GPUS, description="replicas by GPU index or UUID"),
        ]
        | None
    ) = None
    allocation_policy: ReplicaPolicy | None = None

    def __post_init__(self) -> None:
        for key, name in (("name", self.name), ("rename", self.rename)):
            if name is not None and not is_extended_resource_name(name):
                raise ConfigError.at(key, f"must be an extended resource name (domain/name), got {name!r}")


R = TypeVar("R", bound=ResourceSection)


class TimeSlicingSection(Section, Generic[R]):
    """NVIDIA's ``sharing.timeSlicing`` (and the replica keys of ``sharing.mps``, whose entries say more)."""

    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: list[R] | None = None
    allocation_policy: ReplicaPolicy | None = None


@dataclass(frozen=True, slots=True)
class SharedResource:
    """One entry of ``timeSlicing.resources``: which devices of a resource are replicated, how often, as what."""

    name: str
    """The resource whose devices are replicated, e.g. ``nvidia.com/gpu``."""
    replicas: int
    """Replicas per GPU (count, 2 to ``MAX_REPLICAS``) unless ``per_gpu`` says otherwise for that GPU."""
    rename: str | None = None
    """The resource name the replicas are served as; None: ``name``, or ``name.shared`` with renameByDefault."""
    devices: tuple[GpuRef, ...] | None = None
    """The GPUs replicated (NVIDIA's ``devices``); None means all. The others stay whole under ``name``."""
    per_gpu: Mapping[GpuRef, int] = field(default_factory=lambda: MappingProxyType({}))
    """Replica counts (1 to ``MAX_REPLICAS``) of single GPUs, overriding ``replicas``; 1 leaves that GPU whole.
    At most ``MAX_LISTED_GPUS`` entries, as ``devices``."""
    allocation_policy: AllocationPolicyKind | None = None
    """How GetPreferredAllocation picks replicas of this resource; None: the time-slicing default."""

    def replicas_of(self, device: Device) -> int:
        """How many replicas ``device`` becomes; 1 when it is not shared."""
        if self.devices is not None and not any(_names(ref, device) for ref in self.devices):
            return 1
        # A UUID names one GPU for sure; an index only within one node, so the UUID entry wins.
        by_uuid = [count for ref, count in self.per_gpu.items() if not _is_index(ref) and _names(ref, device)]
        if by_uuid:
            return by_uuid[0]
        by_index = [count for ref, count in self.per_gpu.items() if _is_index(ref) and _names(ref, device)]
        return by_index[0] if by_index else self.replicas


@dataclass(frozen=True, slots=True)
class TimeSlicing:
    """NVIDIA's ``sharing.timeSlicing``, plus per-GPU counts, renames and the allocation policy; a TreeTransform."""

    resources: tuple[SharedResource, ...] = ()
    """The shared resources; empty means nothing is shared."""
    rename_by_default: bool = False
    """Serve replicas as ``<name>.shared`` unless a resource has its own ``rename`` (NVIDIA's renameByDefault)."""
    fail_requests_greater_than_one: bool = False
    """Refuse containers asking for more than one replica: a second replica of a time-sliced GPU adds no
    compute, and NVIDIA's users rely on this to catch such requests."""
    allocation_policy: AllocationPolicyKind = AllocationPolicyKind.DISTRIBUTED
    """Default policy for replicas: distributed, so that pods land on idle GPUs first (NVIDIA's default)."""
    path: str = field(default="sharing.timeSlicing", compare=False)
    """Where in the config these settings are, for errors found once the devices are known."""

    @classmethod
    def from_mapping(cls, data: Any, path: str = "sharing.timeSlicing") -> TimeSlicing:
        """Validate the ``timeSlicing`` mapping of a config file; raises ConfigError naming the field."""
        return cls.from_section(decode(data, TimeSlicingSection[ResourceSection] | None, path), path)  # type: ignore[arg-type]

    @classmethod
    def from_section(cls, section: TimeSlicingSection[Any] | None, path: str = "sharing.timeSlicing") -> TimeSlicing:
        """The settings of a decoded section; checks what involves several fields (names, renames)."""
        if section is None:
            return cls()
        resources = tuple(_resource(r) for r in section.resources or ())
        seen: dict[str, int] = {}
        targets: dict[str, int] = {}
        for i, resource in enumerate(resources):
            where = f"{path}.resources[{i}]"
            if resource.name in seen:
                raise ConfigError.at(
                    f"{where}.name", f"{resource.name!r} is already shared by resources[{seen[resource.name]}]"
                )
            seen[resource.name] = i
            target = _target(resource, section.rename_by_default)
            if not is_extended_resource_name(target):
                field_name = "rename" if resource.rename is not None else "name"
                raise ConfigError.at(
                    f"{where}.{field_name}", f"{target!r} is not an extended resource name (domain/name)"
                )
            if target in targets:
                raise ConfigError.at(
                    f"{where}.rename", f"{target!r} is already the name of resources[{targets[target]}]"
                )
            targets[target] = i
        policy = section.allocation_policy
        return cls(
            resources=resources,
            rename_by_default=section.rename_by_default,
            fail_requests_greater_than_one=section.fail_requests_greater_than_one,
            allocation_policy=AllocationPolicyKind.DISTRIBUTED if policy is None else AllocationPolicyKind(policy),
            path=path,
        )

    def served_name(self, resource: SharedResource) -> str:
        """The resource name ``resource``'s replicas are served as."""
        return _target(resource, self.rename_by_default)

    def _check_counts(self, tree: DeviceTree, shared: Mapping[str, SharedResource]) -> None:
        """Refuse replica counts whose devices, with the unshared ones of the same name, would be too many."""
        totals: dict[str, int] = {}
        causes: dict[str, tuple[SharedResource, list[int]]] = {}
        for device in tree.devices:
            resource = shared.get(device.resource)
            count = 1 if resource is None else resource.replicas_of(device)
            name = device.resource if resource is None or count < 2 else self.served_name(resource)
            totals[name] = totals.get(name, 0) + count
            if resource is not None and count >= 2:
                causes.setdefault(name, (resource, []))[1].append(count)
        for name, total in totals.items():
            if total <= MAX_DEVICES_PER_RESOURCE:
                continue
            resource, counts = causes.get(name, (None, []))
            if resource is None:
                continue  # Not made by replicas: gpuplugin.core.limits.check_tree names it.
            where = f"{self.path}.resources[{self.resources.index(resource)}]"
            field_name = "replicas" if not resource.per_gpu else "replicas/perGpu"
            each = f"{counts[0]}" if min(counts) == max(counts) else f"up to {max(counts)}"
            gpus = f"{len(counts)} GPU{'s' if len(counts) > 1 else ''}"
            unshared = total - sum(counts)
            besides = f" with the {unshared} unshared ones" if unshared else ""
            raise DevicesRefuseConfig(
                f"{where}.{field_name}: {gpus} with {each} replicas each make {total} devices of {name}{besides}; "
                f"a resource may have at most {MAX_DEVICES_PER_RESOURCE}, what fits in its "
                f"ListAndWatch message ({MAX_LIST_MESSAGE_BYTES // 2**20} MiB, half the kubelet's "
                f"{KUBELET_MAX_MESSAGE_BYTES // 2**20} MiB limit)"
            )

    def apply(self, tree: DeviceTree) -> DeviceTree:
        """Replace each shared device by its replicas, in place, and set the rules of the shared resources.

        Raises DevicesRefuseConfig when a replica ID would exceed the kubelet's 63 characters, or when a resource would
        have more devices than its ListAndWatch message can carry; the latter is counted before any is built.
        """
        if not self.resources:
            return tree
        shared = {r.name: r for r in self.resources}
        self._check_counts(tree, shared)
        devices: list[Device] = []
        served: dict[str, SharedResource] = {}
        for device in tree.devices:
            resource = shared.get(device.resource)
            count = 1 if resource is None else resource.replicas_of(device)
            if resource is None or count < 2:
                devices.append(device)
                continue
            name = self.served_name(resource)
            served[name] = resource
            devices.extend(_replica(device, name, n) for n in range(count))
        if not served:
            return tree
        rules = dict(tree.rules)
        for name, resource in served.items():
            rules[name] = ResourceRules(
                allocation_policy=resource.allocation_policy or self.allocation_policy,
                max_devices_per_container=1 if self.fail_requests_greater_than_one else None,
            )
        return dataclasses.replace(tree, devices=tuple(devices), rules=MappingProxyType(rules))


def replica_id(device_id: str, n: int) -> str:
    return f"{device_id}{REPLICA_SEPARATOR}{n}"


def _replica(device: Device, resource: str, n: int) -> Device:
    new_id = replica_id(device.id, n)
    if len(new_id) > MAX_DEVICE_ID_LENGTH:
        raise DevicesRefuseConfig(
            f"cannot share device {device.id!r} of {device.resource}: its replica ID {new_id!r} has "
            f"{len(new_id)} characters, the kubelet accepts {MAX_DEVICE_ID_LENGTH}"
        )
    return dataclasses.replace(
        device,
        id=new_id,
        resource=resource,
        attributes=frozen_mapping({**device.attributes, REPLICA_ATTRIBUTE: str(n)}),
    )


def _target(resource: SharedResource, rename_by_default: bool) -> str:
    if resource.rename is not None:
        return resource.rename
    return resource.name + SHARED_SUFFIX if rename_by_default else resource.name


def _is_index(ref: GpuRef) -> bool:
    return isinstance(ref, int) or ref.isdigit()


def _names(ref: GpuRef, device: Device) -> bool:
    """Whether ``ref`` (an index or a UUID) names the GPU ``device`` lives on."""
    if _is_index(ref):
        return device.attributes.get("index") == str(int(ref))
    return ref in (device.gpu, device.id, device.attributes.get("uuid"))


def _resource(section: ResourceSection) -> SharedResource:
    per_gpu = {_ref(key): count for key, count in (section.per_gpu or {}).items()}
    return SharedResource(
        name=section.name,
        replicas=section.replicas,
        rename=section.rename,
        devices=None if section.devices in (None, "all") else tuple(_ref(r) for r in section.devices),
        per_gpu=MappingProxyType(per_gpu),
        allocation_policy=None
        if section.allocation_policy is None
        else AllocationPolicyKind(section.allocation_policy),
    )


def _ref(value: GpuRef) -> GpuRef:
    return value.strip() if isinstance(value, str) else value
