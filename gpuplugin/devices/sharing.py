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
from typing import Any, TypeGuard

from gpuplugin.core.errors import ConfigError, DevicesRefuseConfig, config_key
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
#: Policies that make sense for replicas; topology scoring is about links between distinct GPUs.
REPLICA_POLICIES = (AllocationPolicyKind.DISTRIBUTED, AllocationPolicyKind.PACKED)
#: Replicas of one GPU at most: what one resource may serve in all (see gpuplugin.core.limits). The replicas of all
#: the GPUs of a resource together are held to the same bound when the GPUs are known, before any is built.
MAX_REPLICAS = MAX_DEVICES_PER_RESOURCE
#: Entries of a ``devices`` list or ``perGpu`` mapping at most: far above any node's GPUs (8 or 16), and low
#: enough that matching them against every GPU stays cheap.
MAX_LISTED_GPUS = 1024

GpuRef = int | str
"""A GPU named in the config: its index (an int, or a string of digits) or its UUID."""


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
        if data is None:
            return cls()
        section = _mapping(data, path)
        _no_unknown(
            section,
            {"renameByDefault", "failRequestsGreaterThanOne", "resources", "allocationPolicy"},
            path,
        )
        raw_resources = section.get("resources", [])
        if raw_resources is None:
            raw_resources = []
        if not isinstance(raw_resources, list):
            raise ConfigError.at(f"{path}.resources", f"must be a list, got {type(raw_resources).__name__}")
        rename_by_default = _bool(section, "renameByDefault", path)
        resources = tuple(_resource(item, f"{path}.resources[{i}]") for i, item in enumerate(raw_resources))
        seen: dict[str, int] = {}
        targets: dict[str, int] = {}
        for i, resource in enumerate(resources):
            where = f"{path}.resources[{i}]"
            if resource.name in seen:
                raise ConfigError.at(
                    f"{where}.name", f"{resource.name!r} is already shared by resources[{seen[resource.name]}]"
                )
            seen[resource.name] = i
            target = _target(resource, rename_by_default)
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
        return cls(
            resources=resources,
            rename_by_default=rename_by_default,
            fail_requests_greater_than_one=_bool(section, "failRequestsGreaterThanOne", path),
            allocation_policy=_policy(section, path) or AllocationPolicyKind.DISTRIBUTED,
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


def _resource(data: Any, path: str) -> SharedResource:
    section = _mapping(data, path)
    _no_unknown(section, {"name", "replicas", "rename", "devices", "perGpu", "allocationPolicy"}, path)
    name = section.get("name")
    if not isinstance(name, str) or not is_extended_resource_name(name):
        raise ConfigError.at(f"{path}.name", f"must be an extended resource name (domain/name), got {name!r}")
    replicas = section.get("replicas")
    if not _is_int(replicas) or not 2 <= replicas <= MAX_REPLICAS:
        raise ConfigError.at(
            f"{path}.replicas",
            f"must be an integer from 2 to {MAX_REPLICAS} (what one resource's ListAndWatch message holds), "
            f"got {replicas!r}",
        )
    rename = section.get("rename")
    if rename is not None and not isinstance(rename, str):
        raise ConfigError.at(f"{path}.rename", f"must be an extended resource name (domain/name), got {rename!r}")
    return SharedResource(
        name=name,
        replicas=replicas,
        rename=rename,
        devices=_devices(section.get("devices", "all"), f"{path}.devices"),
        per_gpu=_per_gpu(section.get("perGpu"), f"{path}.perGpu"),
        allocation_policy=_policy(section, path),
    )


def _devices(value: Any, path: str) -> tuple[GpuRef, ...] | None:
    if value is None or value == "all":
        return None
    if not isinstance(value, list):
        raise ConfigError.at(path, f'must be "all" or a list of GPU indices and UUIDs, got {value!r}')
    if len(value) > MAX_LISTED_GPUS:
        raise ConfigError.at(path, f"lists {len(value)} GPUs; at most {MAX_LISTED_GPUS}")
    return tuple(_gpu_ref(item, f"{path}[{i}]") for i, item in enumerate(value))


def _per_gpu(value: Any, path: str) -> Mapping[GpuRef, int]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise ConfigError.at(path, f"must be a mapping of GPU index or UUID to replicas, got {type(value).__name__}")
    if len(value) > MAX_LISTED_GPUS:
        raise ConfigError.at(path, f"names {len(value)} GPUs; at most {MAX_LISTED_GPUS}")
    counts: dict[GpuRef, int] = {}
    for key, count in value.items():
        where = f"{path}.{config_key(key)}"
        ref = _gpu_ref(key, where)
        if not _is_int(count) or not 1 <= count <= MAX_REPLICAS:
            raise ConfigError.at(where, f"must be an integer from 1 (not shared) to {MAX_REPLICAS}, got {count!r}")
        counts[ref] = count
    return MappingProxyType(counts)


def _gpu_ref(value: Any, path: str) -> GpuRef:
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ConfigError.at(path, f"must be a GPU index (≥ 0) or UUID, got {value!r}")


def _policy(section: Mapping[str, Any], path: str) -> AllocationPolicyKind | None:
    value = section.get("allocationPolicy")
    if value is None:
        return None
    allowed = [str(p) for p in REPLICA_POLICIES]
    if value not in allowed:
        raise ConfigError.at(f"{path}.allocationPolicy", f"must be one of {', '.join(allowed)}, got {value!r}")
    return AllocationPolicyKind(value)


def _bool(section: Mapping[str, Any], key: str, path: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError.at(f"{path}.{key}", f"must be true or false, got {value!r}")
    return value


def _is_int(value: Any) -> TypeGuard[int]:
    # YAML's true/false are ints to Python; a replica count of "true" is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(data: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError.at(path, f"must be a mapping, got {type(data).__name__}")
    return data


def _no_unknown(section: Mapping[str, Any], known: set[str], path: str) -> None:
    unknown = sorted(config_key(k) for k in section if k not in known)
    if unknown:
        raise ConfigError.at(f"{path}.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
