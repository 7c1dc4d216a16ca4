"""The fake GPUs: devices with deterministic UUIDs, and the NVLink/PCIe links between every pair."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.core.model import (
    ContainerSpec,
    Device,
    DeviceNode,
    DeviceTree,
    Health,
    Link,
    PCIeLevel,
    frozen_mapping,
    links_from_pairs,
)
from gpuplugin.devices.strategies import VISIBLE_DEVICES

#: Fixed namespace of mock GPU UUIDs; changing it changes every mock UUID.
_UUID_NAMESPACE = uuid.UUID("6f0c1b7e-4a51-5c1e-9a3e-2f6d1c0b8a47")
#: Mock bus IDs start at 0x10 so they read like real ones ("00000000:10:00.0").
_FIRST_BUS = 0x10


def gpu_uuid(node_name: str, index: int) -> str:
    """The UUID of mock GPU ``index`` on ``node_name``, spelled as NVML does: the same on every start."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{node_name}/{index}')}"


def pci_bus_id(index: int) -> str:
    bus = _FIRST_BUS + index
    return f"{bus // 256:08X}:{bus % 256:02X}:00.0"


def numa_node(settings: MockSettings, index: int) -> int:
    """GPUs split evenly across NUMA nodes, in order: with 8 GPUs and 2 nodes, 0-3 on node 0."""
    return index * settings.numa_nodes // settings.gpus


def build_device(settings: MockSettings, index: int) -> Device:
    gpu = gpu_uuid(settings.node_name, index)
    return Device(
        id=gpu,
        resource=settings.resource,
        gpu=gpu,
        numa_node=numa_node(settings, index),
        attributes=frozen_mapping(
            {
                "index": str(index),
                "model": settings.model,
                "memory_mib": str(settings.memory_mib),
                "pci_bus_id": pci_bus_id(index),
            }
        ),
        spec=ContainerSpec(
            list_env=frozen_mapping({VISIBLE_DEVICES: gpu}),
            device_nodes=(DeviceNode(settings.device_node_host_path, f"/dev/nvidia{index}", "rw"),),
        ),
    )


def build_link(settings: MockSettings, a: int, b: int) -> Link:
    nvlinks = sum(g.links for g in settings.nvlink_groups if a in g.gpus and b in g.gpus)
    if any(a in switch and b in switch for switch in settings.pcie_switches):
        pcie = PCIeLevel.SINGLE
    elif numa_node(settings, a) == numa_node(settings, b):
        pcie = PCIeLevel.NODE
    else:
        pcie = PCIeLevel.SYSTEM
    return Link(nvlinks=nvlinks, pcie=pcie)


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every fake GPU the settings describe, built once; trees are cut from it."""

    devices: tuple[Device, ...]
    """Indexed by GPU index."""
    links: Mapping[frozenset[str], Link]
    """Between every pair of GPUs."""

    @classmethod
    def build(cls, settings: MockSettings) -> Inventory:
        devices = tuple(build_device(settings, i) for i in range(settings.gpus))
        pairs = (
            (devices[a].id, devices[b].id, build_link(settings, a, b))
            for a, b in itertools.combinations(range(settings.gpus), 2)
        )
        return cls(devices=devices, links=links_from_pairs(pairs))

    def tree(self, present: Collection[int], unhealthy: Collection[int] = ()) -> DeviceTree:
        """The GPUs in ``present`` (in index order), those in ``unhealthy`` marked so, and the links among them."""
        devices = tuple(
            replace(d, health=Health.UNHEALTHY) if i in unhealthy else d
            for i, d in enumerate(self.devices)
            if i in present
        )
        ids = {d.id for d in devices}
        links = MappingProxyType({pair: link for pair, link in self.links.items() if pair <= ids})
        return DeviceTree(devices=devices, links=links)
