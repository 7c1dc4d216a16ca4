"""ResourceSlices from a device tree: what the scheduler sees of a node's GPUs (``resource.k8s.io/v1``).

Pure: the publisher sends what this builds. Every healthy device of the tree is a device of its own, partitions
included (with their profile and parent); an unhealthy one is left out, so nothing new is allocated on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gpuplugin.core.model import Device, DeviceTree, Health
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names

API_VERSION = "resource.k8s.io/v1"
#: The API server refuses a slice with more devices.
MAX_DEVICES_PER_SLICE = 128
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


def slice_devices(tree: DeviceTree) -> list[dict[str, Any]]:
    """The healthy devices of ``tree`` as ResourceSlice devices, in the tree's order."""
    devices = []
    for name, device in device_names(tree).items():
        if device.health is not Health.HEALTHY:
            continue
        entry: dict[str, Any] = {"name": name, "attributes": device_attributes(device)}
        capacity = device_capacity(device)
        if capacity:
            entry["capacity"] = capacity
        devices.append(entry)
    return devices


def slice_name(settings: DriverSettings, number: int) -> str:
    """A fixed name per node, driver and number, so that a publisher replaces its own slices in place."""
    return f"{settings.node_name}-{settings.driver_name}-{number}"[:253].rstrip("-.")


def build_slices(
    tree: DeviceTree,
    settings: DriverSettings,
    generation: int,
    owner: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The node's ResourceSlices for ``tree``: one pool (the node), split every 128 devices, at ``generation``.

    A node without a healthy device still gets one empty slice: the pool stays known, with nothing to allocate.
    ``owner`` (the Node's ``name`` and ``uid``) makes the slices go with the node.
    """
    devices = slice_devices(tree)
    chunks: Sequence[list[dict[str, Any]]] = [
        devices[i : i + MAX_DEVICES_PER_SLICE] for i in range(0, len(devices), MAX_DEVICES_PER_SLICE)
    ] or [[]]
    slices = []
    for number, chunk in enumerate(chunks):
        metadata: dict[str, Any] = {"name": slice_name(settings, number)}
        if owner is not None:
            metadata["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": owner["name"], "uid": owner["uid"], "controller": True}
            ]
        slices.append(
            {
                "apiVersion": API_VERSION,
                "kind": "ResourceSlice",
                "metadata": metadata,
                "spec": {
                    "driver": settings.driver_name,
                    "nodeName": settings.node_name,
                    "pool": {"name": settings.pool, "generation": generation, "resourceSliceCount": len(chunks)},
                    "devices": chunk,
                },
            }
        )
    return slices
