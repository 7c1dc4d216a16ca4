"""ResourceClaims as the plugin needs them: which of our devices the scheduler allocated to a claim, by request.

The kubelet names a claim only (namespace, name, UID); what was allocated is in the claim's status on the API
server. A ``ClaimSource`` reads it there (``gpuplugin.dra.apiserver``) or, in tests, from a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """A claim as the kubelet names it."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class AllocatedDevice:
    """One device of an allocation result: the claim's request it serves, and where the slice put it."""

    request: str
    pool: str
    device: str


class ClaimUnavailable(Exception):
    """The claim cannot be read, is not allocated, or is not the one the kubelet named; the message says which."""


class ClaimSource(Protocol):
    """Where the plugin reads what was allocated to a claim."""

    async def allocation(self, claim: ClaimRef, driver: str) -> tuple[AllocatedDevice, ...]:
        """The devices of ``driver`` allocated to ``claim``; raises ClaimUnavailable."""
        ...


def allocated_devices(resource_claim: Mapping[str, Any], claim: ClaimRef, driver: str) -> tuple[AllocatedDevice, ...]:
    """The results of ``driver`` in a ResourceClaim object (as the API server returns it, JSON-decoded).

    Raises ClaimUnavailable when the object is another claim (same name, new UID) or has no allocation.
    """
    metadata = resource_claim.get("metadata") or {}
    uid = metadata.get("uid") if isinstance(metadata, Mapping) else None
    if uid != claim.uid:
        raise ClaimUnavailable(f"claim {claim.namespace}/{claim.name} has UID {uid!r}, not {claim.uid!r}")
    status = resource_claim.get("status") or {}
    allocation = status.get("allocation") if isinstance(status, Mapping) else None
    results = ((allocation or {}).get("devices") or {}).get("results") if isinstance(allocation, Mapping) else None
    if not isinstance(results, list):
        raise ClaimUnavailable(f"claim {claim.namespace}/{claim.name} is not allocated")
    devices = []
    for result in results:
        if not isinstance(result, Mapping) or result.get("driver") != driver:
            continue
        request, pool, device = result.get("request"), result.get("pool"), result.get("device")
        if not (isinstance(request, str) and isinstance(pool, str) and isinstance(device, str) and pool and device):
            raise ClaimUnavailable(f"claim {claim.namespace}/{claim.name} has a malformed allocation result")
        devices.append(AllocatedDevice(request, pool, device))
    return tuple(devices)
