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


def label_of(device_id: str, *, hashed: bool = False) -> str:
    """``device_id`` as a DNS label: lowercase, other characters as ``-``; with a hash suffix when characters were
    replaced, when it is too long, or when ``hashed`` (another ID of the tree maps to the same label)."""
    name = _NOT_IN_LABEL.sub("-", device_id.lower()).strip("-") or "device"
    if not hashed and name == device_id.lower() and len(name) <= MAX_NAME_LENGTH:
        return name
    # A short hash of the original keeps two IDs that map to the same text apart.
    digest = hashlib.sha256(device_id.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"


def device_names(tree: DeviceTree) -> Mapping[str, Device]:
    """Every device of ``tree`` by its ResourceSlice name; a device ID served under two resources appears once.

    IDs that differ only in case share a label: each of them then carries its hash, whatever the tree's order.
    """
    first: dict[str, Device] = {}
    for device in tree.devices:
        first.setdefault(device.id, device)
    ids_of: dict[str, list[str]] = {}
    for device_id in first:
        ids_of.setdefault(label_of(device_id), []).append(device_id)
    named: dict[str, Device] = {}
    for device_id, device in first.items():
        named[label_of(device_id, hashed=len(ids_of[label_of(device_id)]) > 1)] = device
    return named
