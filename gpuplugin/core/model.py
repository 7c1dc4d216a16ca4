"""The device model: what a backend discovers and what the core serves.

Everything here is immutable, so a tree can be shared between the manager, the resource servers and the
allocation policies without copies or locks, and anything derived from it can be precomputed once.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: The kubelet rejects longer device IDs.
MAX_DEVICE_ID_LENGTH = 63

# IsQualifiedName's two halves, as the kubelet checks "requests." + name (apimachinery validation).
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def is_extended_resource_name(name: str) -> bool:
    """Whether the kubelet accepts ``name`` from a device plugin (``v1helper.IsExtendedResourceName``)."""
    # Native: no domain at all, or anything in the kubernetes.io namespace (a substring test upstream).
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    prefix, _, short = f"requests.{name}".partition("/")
    if "/" in short:
        return False
    return (
        len(prefix) <= 253
        and _DNS1123_SUBDOMAIN.match(prefix) is not None
        and 0 < len(short) <= 63
        and _QUALIFIED_NAME.match(short) is not None
    )


class Health(enum.StrEnum):
    """A device's health, spelled as the kubelet expects it."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class AllocationPolicyKind(enum.StrEnum):
    """How GetPreferredAllocation chooses among available devices; the core implements each."""

    TOPOLOGY = "topology"
    """Best-connected set: NVLink first, then a shared PCIe switch, then one NUMA node."""
    DISTRIBUTED = "distributed"
    """Replicas and partitions: spread over the least-loaded physical GPUs."""
    PACKED = "packed"
    """Replicas and partitions: fill the most-loaded physical GPUs first."""


@dataclass(frozen=True, slots=True)
class ResourceRules:
    """How one resource is handed out, set by whatever produced its devices (a backend, time-slicing)."""

    allocation_policy: AllocationPolicyKind | None = None
    """None: the backend's choice (``PreferredAllocation``), else the topology policy."""
    max_devices_per_container: int | None = None
    """Allocate refuses containers asking for more (time-slicing's ``failRequestsGreaterThanOne`` sets 1)."""


class PCIeLevel(enum.IntEnum):
    """How close two GPUs sit on the PCIe tree, closest first (NVML's topology levels)."""

    INTERNAL = 0
    """Same board (multi-GPU boards)."""
    SINGLE = 10
    """Behind one PCIe switch."""
    MULTIPLE = 20
    """Behind several PCIe switches, without crossing a host bridge."""
    HOSTBRIDGE = 30
    """Under the same host bridge."""
    NODE = 40
    """Same NUMA node, different host bridges."""
    SYSTEM = 50
    """Across NUMA nodes (SMP interconnect)."""


def frozen_mapping(items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> Mapping[str, str]:
    """A read-only copy, so that frozen dataclasses stay immutable all the way down."""
    return MappingProxyType(dict(items))


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node the container runtime creates in the container."""

    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path mounted into the container."""

    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What a container needs to use one device; the Allocate response is the merge of its devices' specs."""

    env: Mapping[str, str] = field(default_factory=frozen_mapping)
    """Variables set as they are; devices that set the same one must agree."""
    list_env: Mapping[str, str] = field(default_factory=frozen_mapping)
    """Variables whose values from several devices are joined with commas (``NVIDIA_VISIBLE_DEVICES``)."""
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=frozen_mapping)
    """Annotations set as they are; devices that set the same one must agree."""
    list_annotations: Mapping[str, str] = field(default_factory=frozen_mapping)
    """Annotations whose values from several devices are joined with commas (CDI device names)."""
    cdi_devices: tuple[str, ...] = ()
    """Fully qualified CDI device names (``vendor.com/class=name``)."""


@dataclass(frozen=True, slots=True)
class Device:
    """One allocatable unit served under one resource name: a whole GPU, a partition or a replica."""

    id: str
    resource: str
    """The extended resource name it is served as, e.g. ``nvidia.com/gpu``."""
    gpu: str
    """The ID of the physical GPU it lives on; equal to ``id`` for a whole GPU."""
    spec: ContainerSpec
    numa_node: int | None = None
    """The NUMA node of its PCIe device; None where the platform reports none."""
    health: Health = Health.HEALTHY
    """Health as discovered; the core folds health events on top of it."""
    instance: tuple[int, int] | None = None
    """(GPU instance ID, compute instance ID) for a partition, so that an event naming it reaches it alone."""
    attributes: Mapping[str, str] = field(default_factory=frozen_mapping)
    """What an operator wants to see (model, memory, bus id); never read on the RPC paths."""

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > MAX_DEVICE_ID_LENGTH:
            raise ValueError(f"device ID {self.id!r} must have 1 to {MAX_DEVICE_ID_LENGTH} characters")
        if not is_extended_resource_name(self.resource):
            raise ValueError(f"resource name {self.resource!r} is not an extended resource (domain/name)")


@dataclass(frozen=True, slots=True)
class Link:
    """How two physical GPUs are connected."""

    nvlinks: int = 0
    """Active NVLink links between them."""
    pcie: PCIeLevel = PCIeLevel.SYSTEM


@dataclass(frozen=True, slots=True)
class DeviceTree:
    """Everything a backend serves at one moment: devices of every resource, and the links between GPUs."""

    devices: tuple[Device, ...] = ()
    links: Mapping[frozenset[str], Link] = field(default_factory=lambda: MappingProxyType({}))
    """Keyed by the pair of physical GPU IDs; a missing pair means no known link (``Link()``)."""
    rules: Mapping[str, ResourceRules] = field(default_factory=lambda: MappingProxyType({}))
    """Per resource name; a resource without an entry gets ``ResourceRules()``."""

    def __post_init__(self) -> None:
        seen: set[tuple[str, str]] = set()
        for device in self.devices:
            key = (device.resource, device.id)
            if key in seen:
                raise ValueError(f"device {device.id!r} appears twice under {device.resource}")
            seen.add(key)

    @property
    def resources(self) -> tuple[str, ...]:
        """Resource names in first-seen order."""
        return tuple(dict.fromkeys(d.resource for d in self.devices))

    def of(self, resource: str) -> tuple[Device, ...]:
        """The devices served under one resource name."""
        return tuple(d for d in self.devices if d.resource == resource)

    def by_resource(self) -> Mapping[str, tuple[Device, ...]]:
        grouped: dict[str, list[Device]] = {}
        for device in self.devices:
            grouped.setdefault(device.resource, []).append(device)
        return {name: tuple(devices) for name, devices in grouped.items()}

    def rules_of(self, resource: str) -> ResourceRules:
        return self.rules.get(resource, ResourceRules())

    def link(self, a: str, b: str) -> Link:
        return self.links.get(frozenset((a, b)), Link())

    def gpus(self) -> tuple[str, ...]:
        """Physical GPU IDs in first-seen order."""
        return tuple(dict.fromkeys(d.gpu for d in self.devices))


def links_from_pairs(pairs: Iterable[tuple[str, str, Link]]) -> Mapping[frozenset[str], Link]:
    """Build the read-only link table of a tree from (gpu, gpu, link) triples."""
    return MappingProxyType({frozenset((a, b)): link for a, b, link in pairs if a != b})


class SpecConflict(ValueError):
    """Devices of one request ask for different values of the same variable; a backend bug, not a user error."""


def merge_specs(specs: Iterable[ContainerSpec]) -> ContainerSpec:
    """The spec of a container given several devices: lists joined in order, shared nodes and mounts once."""
    env: dict[str, str] = {}
    list_env: dict[str, list[str]] = {}
    nodes: dict[str, DeviceNode] = {}
    mounts: dict[str, Mount] = {}
    annotations: dict[str, str] = {}
    list_annotations: dict[str, list[str]] = {}
    cdi: dict[str, None] = {}
    for spec in specs:
        for key, value in spec.env.items():
            if env.setdefault(key, value) != value:
                raise SpecConflict(f"devices set {key} to both {env[key]!r} and {value!r}")
        _join(list_env, spec.list_env)
        _join(list_annotations, spec.list_annotations)
        for node in spec.device_nodes:
            nodes.setdefault(node.container_path, node)
        for mount in spec.mounts:
            mounts.setdefault(mount.container_path, mount)
        for key, value in spec.annotations.items():
            if annotations.setdefault(key, value) != value:
                raise SpecConflict(f"devices set annotation {key} to both {annotations[key]!r} and {value!r}")
        cdi.update(dict.fromkeys(spec.cdi_devices))
    return ContainerSpec(
        env=frozen_mapping(env),
        list_env=frozen_mapping((k, ",".join(v)) for k, v in list_env.items()),
        device_nodes=tuple(nodes.values()),
        mounts=tuple(mounts.values()),
        annotations=frozen_mapping(annotations),
        list_annotations=frozen_mapping((k, ",".join(v)) for k, v in list_annotations.items()),
        cdi_devices=tuple(cdi),
    )


def _join(into: dict[str, list[str]], values: Mapping[str, str]) -> None:
    for key, value in values.items():
        joined = into.setdefault(key, [])
        if value not in joined:
            joined.append(value)
