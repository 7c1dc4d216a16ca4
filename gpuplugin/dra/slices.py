"""ResourceSlices from a device tree: what the scheduler sees of a node's GPUs (``resource.k8s.io/v1``).

Pure: the publisher sends what this builds, in one of two shapes per feature (``SliceShape``):

- Partitions: flat, every partition a device of its own; or, with counters (gate DRAPartitionableDevices), each
  partitioned GPU in a slice of its own with a counter set (its memory, compute slices and each memory slice), its
  partitions and the whole GPU consuming from it, so the scheduler never hands out two that overlap.
- Unhealthy devices: left out, so nothing new is allocated on them; or, with taints (gate DRADeviceTaints), kept
  with a taint naming why, removed on recovery.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from gpuplugin.core.model import ContainerSpec, Device, DeviceTree, Health, frozen_mapping
from gpuplugin.devices.strategies import VISIBLE_DEVICES
from gpuplugin.dra.driver import DEFAULT_DRIVER_NAME, DriverSettings, TaintEffect
from gpuplugin.dra.names import device_names, label_of

API_VERSION = "resource.k8s.io/v1"
#: The API server refuses a slice with more devices; with more than 64 where one carries a taint or counters.
MAX_DEVICES_PER_SLICE = 128
MAX_DEVICES_PER_TAINTED_SLICE = 64
#: Taint values are label values.
MAX_TAINT_VALUE = 63
_NOT_IN_VALUE = re.compile(r"[^A-Za-z0-9._-]+")
_VALUE_ENDS = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")
#: Where a partition's device nodes for its MIG capabilities go; a whole GPU has none.
_CAPS_PREFIX = "/dev/nvidia-caps/"

FaultKey = tuple[str, tuple[int, int] | None]
"""(physical GPU, partition instance or None for the whole GPU), as health events name what they reach."""
Reasons = Mapping[FaultKey, str]
"""Why each open fault is open, in an operator's words (``XID 79: GPU has fallen off the bus``)."""
NO_REASONS: Reasons = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SliceShape:
    """Which of the gated shapes the slices take: what the cluster's API server keeps."""

    counters: bool = False
    """Partitioned GPUs with shared counters and their whole GPU (DRAPartitionableDevices)."""
    taints: bool = False
    """Unhealthy devices kept, tainted (DRADeviceTaints)."""
    taint_effect: TaintEffect = TaintEffect.NO_SCHEDULE
    taint_key: str = f"{DEFAULT_DRIVER_NAME}/unhealthy"


@dataclass(frozen=True, slots=True)
class SliceContent:
    """What one slice carries, before it gets a name and a generation."""

    devices: tuple[Mapping[str, Any], ...]
    counter_sets: tuple[Mapping[str, Any], ...] = field(default=())


#: Nor does it take longer string attribute values.
MAX_STRING_ATTRIBUTE = 64
_SEMVER = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")

# Backend attribute → (slice attribute, type). Versions are normalised to semver ("12.4" → "12.4.0"), which CEL's
# semver comparisons need.
_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("uuid", "uuid", "string"),
    ("model", "productName", "string"),
    ("index", "index", "int"),
    ("minor", "minor", "int"),
    ("pci_bus_id", "pciBusID", "string"),
    ("driver_version", "driverVersion", "version"),
    ("cuda_version", "cudaVersion", "version"),
    ("compute_capability", "computeCapability", "version"),
    ("profile", "profile", "string"),
    ("parent_uuid", "parentUUID", "string"),
    ("parent_index", "parentIndex", "int"),
)


def semver(text: str) -> str | None:
    """``text`` as a semantic version (missing parts are 0), or None when it is not dotted numbers."""
    match = _SEMVER.match(text.strip())
    if match is None:
        return None
    return ".".join(str(int(part or 0)) for part in match.groups())


def device_attributes(device: Device) -> dict[str, dict[str, Any]]:
    """The typed attributes of one device, for CEL selectors (``device.attributes["gpu.gpuplugin.dev"].uuid``)."""
    partition = "profile" in device.attributes or device.instance is not None
    attributes: dict[str, dict[str, Any]] = {"type": {"string": "partition" if partition else "gpu"}}
    if "uuid" not in device.attributes and device.id == device.gpu:
        attributes["uuid"] = {"string": device.id}
    for source, name, kind in _ATTRIBUTES:
        value = _typed(device.attributes.get(source), kind)
        if value is not None:
            attributes[name] = value
    if device.numa_node is not None:
        attributes["numaNode"] = {"int": device.numa_node}
    return attributes


def _typed(text: str | None, kind: str) -> dict[str, Any] | None:
    if text is None:
        return None
    if kind == "int":
        return {"int": int(text)} if text.lstrip("-").isdecimal() else None
    if kind == "version":
        version = semver(text)
        return None if version is None else {"version": version}
    return {"string": text} if 0 < len(text) <= MAX_STRING_ATTRIBUTE else None


def device_capacity(device: Device) -> dict[str, dict[str, str]]:
    memory = device.attributes.get("memory_mib", "")
    return {"memory": {"value": f"{int(memory)}Mi"}} if memory.isdecimal() else {}


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a MIG partition sits on its GPU, and what it takes of it."""

    start: int
    """Its first memory slice."""
    memory_slices: int
    compute_slices: int
    memory_mib: int

    @property
    def slices(self) -> range:
        return range(self.start, self.start + self.memory_slices)


def placement(device: Device) -> Placed | None:
    """Where a MIG partition whose place on its GPU is known (the partitioned backend's) sits; None for anything
    else, MPS shares included."""
    attributes = device.attributes
    if device.instance is None or attributes.get("isolation") == "mps":
        return None
    values = [attributes.get(key, "") for key in ("start_slice", "memory_slices", "compute_slices", "memory_mib")]
    if not all(value.isdecimal() for value in values):
        return None
    return Placed(*(int(value) for value in values))


def whole_gpus(tree: DeviceTree) -> tuple[Device, ...]:
    """The whole GPU of each GPU served as placed simulated partitions only, so that a claim may ask for it where
    counters keep it apart from its partitions: the partitions' spec naming the GPU instead (without the MIG
    capability nodes), Unhealthy while any of its partitions is. Not for real MIG devices: with MIG mode on, CUDA
    cannot use the parent GPU itself, so a claim for it would hold every MIG device and give the pod nothing."""
    served_whole = {device.id for device in tree.devices if device.id == device.gpu}
    partitions: dict[str, list[Device]] = {}
    for device in tree.devices:
        simulated = device.attributes.get("simulated") == "true"
        if device.gpu not in served_whole and simulated and placement(device) is not None:
            partitions.setdefault(device.gpu, []).append(device)
    return tuple(_whole(gpu, parts) for gpu, parts in partitions.items())


def _whole(gpu: str, partitions: Sequence[Device]) -> Device:
    first = partitions[0]
    spec = first.spec
    parent_uuid = first.attributes.get("parent_uuid", gpu)
    attributes = {"uuid": parent_uuid}
    for source, name in (("model", "model"), ("parent_index", "index")):
        if source in first.attributes:
            attributes[name] = first.attributes[source]
    healthy = all(part.health is Health.HEALTHY for part in partitions)
    return Device(
        id=gpu,
        resource=f"{first.resource.partition('/')[0]}/gpu",
        gpu=gpu,
        spec=ContainerSpec(
            env=spec.env,
            list_env=frozen_mapping({**spec.list_env, VISIBLE_DEVICES: parent_uuid}),
            device_nodes=tuple(n for n in spec.device_nodes if not n.container_path.startswith(_CAPS_PREFIX)),
            mounts=spec.mounts,
            annotations=spec.annotations,
        ),
        numa_node=first.numa_node,
        health=Health.HEALTHY if healthy else Health.UNHEALTHY,
        attributes=frozen_mapping(attributes),
    )


def with_whole_gpus(tree: DeviceTree) -> DeviceTree:
    """``tree`` with ``whole_gpus`` added: every device a claim on this node may name."""
    wholes = whole_gpus(tree)
    return replace(tree, devices=(*tree.devices, *wholes)) if wholes else tree


def taint_value(reason: str) -> str:
    """``reason`` as a label value (a taint's value): other characters as ``-``, at most 63."""
    text = _NOT_IN_VALUE.sub("-", reason)[:MAX_TAINT_VALUE]
    return _VALUE_ENDS.sub("", text) or "unhealthy"


def _reason(device: Device, reasons: Reasons) -> str:
    found = reasons.get((device.gpu, device.instance)) or reasons.get((device.gpu, None))
    if found is None and device.id == device.gpu:
        # A whole GPU is unhealthy for a fault on any of its partitions.
        found = next((reason for (gpu, _), reason in sorted(reasons.items(), key=str) if gpu == device.gpu), None)
    return found or "unhealthy"


def _entry(name: str, device: Device, shape: SliceShape, reasons: Reasons) -> dict[str, Any] | None:
    if device.health is not Health.HEALTHY and not shape.taints:
        return None
    entry: dict[str, Any] = {"name": name, "attributes": device_attributes(device)}
    capacity = device_capacity(device)
    if capacity:
        entry["capacity"] = capacity
    if device.health is not Health.HEALTHY:
        taint = {
            "key": shape.taint_key,
            "value": taint_value(_reason(device, reasons)),
            "effect": str(shape.taint_effect),
        }
        entry["taints"] = [taint]
    return entry


def _counters(memory_mib: int, compute: int, memory_slices: Iterable[int]) -> dict[str, dict[str, str]]:
    counters = {"memory": {"value": f"{memory_mib}Mi"}, "compute-slices": {"value": str(compute)}}
    counters.update({f"memory-slice-{number}": {"value": "1"} for number in memory_slices})
    return counters


def _counter_slice(
    set_name: str, members: Sequence[tuple[Device, dict[str, Any]]], parts: Sequence[Device]
) -> SliceContent:
    """One partitioned GPU: its counter set (what all its placed partitions add up to, which the whole GPU takes
    entirely) and its devices, each consuming its share."""
    placed = [p for p in (placement(part) for part in parts) if p is not None]
    whole = _counters(
        sum(p.memory_mib for p in placed),
        sum(p.compute_slices for p in placed),
        sorted({number for p in placed for number in p.slices}),
    )
    devices = []
    for device, entry in members:
        found = placement(device)
        counters = whole if found is None else _counters(found.memory_mib, found.compute_slices, found.slices)
        devices.append({**entry, "consumesCounters": [{"counterSet": set_name, "counters": counters}]})
    return SliceContent(tuple(devices), ({"name": set_name, "counters": whole},))


def slice_contents(
    tree: DeviceTree, shape: SliceShape = SliceShape(), reasons: Reasons = NO_REASONS
) -> list[SliceContent]:
    """What the node's slices carry in ``shape``: the devices of no counter set in slices of up to 128 (64 with
    taints), then one slice per partitioned GPU with counters. Never none: a node without a device to publish
    still has one empty slice, so the pool stays known with nothing to allocate."""
    partitions: dict[str, list[Device]] = {}
    for device in tree.devices:
        if placement(device) is not None:
            partitions.setdefault(device.gpu, []).append(device)
    flat: list[dict[str, Any]] = []
    groups: dict[str, list[tuple[Device, dict[str, Any]]]] = {}
    set_names: dict[str, str] = {}
    for name, device in device_names(tree).items():
        entry = _entry(name, device, shape, reasons)
        shares = device.gpu in partitions and (device.id == device.gpu or placement(device) is not None)
        if device.id == device.gpu and shares:
            # Named after the whole GPU's device, so unique in the pool as device names are.
            set_names[device.gpu] = name
            if not shape.counters:
                # Without counters a whole GPU beside its partitions could be allocated twice over.
                continue
        if entry is None:
            continue
        if shares and shape.counters:
            groups.setdefault(device.gpu, []).append((device, entry))
        else:
            flat.append(entry)
    size = MAX_DEVICES_PER_TAINTED_SLICE if shape.taints else MAX_DEVICES_PER_SLICE
    contents = [SliceContent(tuple(flat[i : i + size])) for i in range(0, len(flat), size)]
    for gpu, members in groups.items():
        contents.append(_counter_slice(set_names.get(gpu, label_of(gpu)), members, partitions[gpu]))
    return contents or [SliceContent(())]


def slice_name(settings: DriverSettings, number: int) -> str:
    """A fixed name per node, driver and number, so that a publisher replaces its own slices in place."""
    return f"{settings.node_name}-{settings.driver_name}-{number}"[:253].rstrip("-.")


def render_slices(
    contents: Sequence[SliceContent],
    settings: DriverSettings,
    generation: int,
    owner: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """``contents`` as the node's ResourceSlices: one pool (the node), at ``generation``. ``owner`` (the Node's
    ``name`` and ``uid``) makes the slices go with the node."""
    slices = []
    for number, content in enumerate(contents):
        metadata: dict[str, Any] = {"name": slice_name(settings, number)}
        if owner is not None:
            metadata["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": owner["name"], "uid": owner["uid"], "controller": True}
            ]
        spec: dict[str, Any] = {
            "driver": settings.driver_name,
            "nodeName": settings.node_name,
            "pool": {"name": settings.pool, "generation": generation, "resourceSliceCount": len(contents)},
            "devices": [dict(device) for device in content.devices],
        }
        if content.counter_sets:
            spec["sharedCounters"] = [dict(counter_set) for counter_set in content.counter_sets]
        slices.append({"apiVersion": API_VERSION, "kind": "ResourceSlice", "metadata": metadata, "spec": spec})
    return slices


def build_slices(
    tree: DeviceTree,
    settings: DriverSettings,
    generation: int,
    owner: Mapping[str, str] | None = None,
    shape: SliceShape = SliceShape(),
    reasons: Reasons = NO_REASONS,
) -> list[dict[str, Any]]:
    """The node's ResourceSlices for ``tree`` in ``shape`` at ``generation``."""
    return render_slices(slice_contents(tree, shape, reasons), settings, generation, owner)


def probe_slice(settings: DriverSettings) -> dict[str, Any]:
    """A slice using both gated shapes, for a dry run: the API server answers it without the fields of each gate
    that is off (it drops them silently), and stores nothing."""
    counters = {"memory-slice-0": {"value": "1"}}
    device = {
        "name": "probe",
        "consumesCounters": [{"counterSet": "probe", "counters": counters}],
        "taints": [{"key": settings.taint_key, "value": "probe", "effect": str(TaintEffect.NO_SCHEDULE)}],
    }
    (slice_,) = render_slices([SliceContent((device,), ({"name": "probe", "counters": counters},))], settings, 1)
    return slice_


def gates_kept(answer: Mapping[str, Any]) -> tuple[bool, bool]:
    """From the API server's answer to ``probe_slice``: whether it kept the counters, and the taints."""
    spec = answer.get("spec") or {}
    devices = spec.get("devices") or [{}]
    return bool(spec.get("sharedCounters")), bool(devices[0].get("taints"))
