"""How much one resource may serve: its ListAndWatch message must reach the kubelet.

The kubelet reads ListAndWatch with grpc-go's default receive limit, 4 MiB; a larger message fails the stream on
the kubelet's side, so the plugin looks registered while the node shows no devices. Every device costs a known
number of bytes in that message, so the size is computed from the devices without encoding them, and a config
whose devices would not fit is refused before any of them is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gpuplugin.core.errors import DevicesRefuseConfig
from gpuplugin.core.model import Device, DeviceTree, Health

#: grpc-go's default maximum receive message size, which the kubelet's device-manager client keeps.
KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The most one resource's ListAndWatch message may take: half the kubelet's limit. The same IDs also travel in
#: the kubelet's checkpoint and in its pod-resources answers, next to other resources' devices, and a message
#: sized up to a hard limit breaks on the first thing added to it.
MAX_LIST_MESSAGE_BYTES = 2 * 1024 * 1024
#: The largest NUMA node ID counted at two varint bytes; Linux allows 1024 nodes (MAX_NUMNODES).
LARGE_NUMA_NODE = 16383
#: A device's share of the message at worst with ASCII IDs: a 63-character ID, "Unhealthy", a NUMA node up to
#: 16383. Replica, partition and GPU IDs are ASCII; a device with another ID is counted exactly.
MAX_DEVICE_ENTRY_BYTES = 85
#: Devices of one resource at most, whatever their IDs (ASCII): 24,672. Checked before replicas are built.
MAX_DEVICES_PER_RESOURCE = MAX_LIST_MESSAGE_BYTES // MAX_DEVICE_ENTRY_BYTES


class ResourceTooLarge(DevicesRefuseConfig):
    """A resource has more devices than its ListAndWatch message can carry to the kubelet."""


def varint_bytes(value: int) -> int:
    """Bytes of ``value`` as a protobuf varint (a negative int64 takes ten)."""
    if value < 0:
        return 10
    return max(1, (value.bit_length() + 6) // 7)


def _field_bytes(length: int) -> int:
    """A length-delimited field of ``length`` bytes: tag, length, payload (field numbers below 16)."""
    return 1 + varint_bytes(length) + length


def device_entry_bytes(device_id: str, health: str, numa_node: int | None) -> int:
    """What one device adds to a ListAndWatchResponse, as proto3 encodes it (zero values left out)."""
    size = _field_bytes(len(device_id.encode())) + _field_bytes(len(health.encode()))
    if numa_node is not None:
        numa = 0 if numa_node == 0 else 1 + varint_bytes(numa_node)  # NUMANode{ID}
        size += _field_bytes(_field_bytes(numa))  # Device.topology = TopologyInfo{nodes: [NUMANode]}
    return _field_bytes(size)


def list_message_bytes(devices: Iterable[Device]) -> int:
    """The encoded size of the ListAndWatchResponse listing ``devices``, every one of them unhealthy (the worst)."""
    return sum(device_entry_bytes(d.id, str(Health.UNHEALTHY), d.numa_node) for d in devices)


def check_resource(resource: str, devices: Sequence[Device]) -> None:
    """Raise ResourceTooLarge if ``devices`` would not reach the kubelet in one ListAndWatch message."""
    if len(devices) > MAX_DEVICES_PER_RESOURCE:
        raise ResourceTooLarge(
            f"{resource}: {len(devices)} devices; a resource may have at most {MAX_DEVICES_PER_RESOURCE}, what fits "
            f"in its ListAndWatch message ({MAX_LIST_MESSAGE_BYTES // 1024 // 1024} MiB, half the kubelet's "
            f"{KUBELET_MAX_MESSAGE_BYTES // 1024 // 1024} MiB limit)"
        )
    size = list_message_bytes(devices)
    if size > MAX_LIST_MESSAGE_BYTES:
        raise ResourceTooLarge(
            f"{resource}: its ListAndWatch message would take {size} bytes, more than the {MAX_LIST_MESSAGE_BYTES} "
            f"allowed (half the kubelet's {KUBELET_MAX_MESSAGE_BYTES // 1024 // 1024} MiB limit); its device IDs "
            "are too long or too many"
        )


def check_tree(tree: DeviceTree) -> DeviceTree:
    """A TreeTransform, the last one: refuse a tree with a resource the kubelet could not receive."""
    for resource, devices in tree.by_resource().items():
        check_resource(resource, devices)
    return tree


#: The most values (scalars, lists, mappings) a config may hold once YAML's aliases are expanded. A real config
#: holds hundreds; aliases let a 340-byte file hold a billion, which quoting one in an error would spell out.
MAX_CONFIG_VALUES = 100_000


def within_values(data: object, limit: int) -> bool:
    """Whether ``data`` holds at most ``limit`` values, each alias counted every time it is used; stops counting
    at the limit, so a self-referencing or billion-value document costs ``limit`` steps."""
    pending = [data]
    count = 0
    while pending:
        count += 1
        if count > limit:
            return False
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list | tuple):
            pending.extend(value)
    return True
