"""The names a tree's devices carry in ResourceSlices: DNS labels, stable for the same device on every start.

Allocation results and the checkpoint name devices this way, so the same name must resolve to the same device
after a plugin restart: names come from the device ID (a UUID for GPUs and partitions), never from an order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from gpuplugin.core.model import Device, DeviceTree

#: ResourceSlice device names are DNS labels.
MAX_NAME_LENGTH = 63
_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]+")


def label_of(device_id: str) -> str:
    """``device_id`` as a DNS label: lowercase, other characters as ``-``, cut with a hash suffix when too long."""
    name = _NOT_IN_LABEL.sub("-", device_id.lower()).strip("-") or "device"
    if name == device_id.lower() and len(name) <= MAX_NAME_LENGTH:
        return name
    # Changed or cut: a short hash of the original keeps two IDs that map to the same text apart.
    digest = hashlib.sha256(device_id.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"


def device_names(tree: DeviceTree) -> Mapping[str, Device]:
    """Every device of ``tree`` by its ResourceSlice name; a device ID served under two resources appears once."""
    named: dict[str, Device] = {}
    for device in tree.devices:
        named.setdefault(label_of(device.id), device)
    return named
