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


@dataclass(frozen=True, slots=True)
class OpaqueConfig:
    """One opaque config of our driver in an allocation result: the requests it names (none: all), its
    parameters as given (decoded by ``gpuplugin.dra.sharing``), and its place in the result's ``config`` list."""

    requests: tuple[str, ...]
    parameters: Any
    index: int = 0


@dataclass(frozen=True, slots=True)
class Allocation:
    """What the scheduler allocated to a claim for one driver: its devices, and the configs for that driver."""

    devices: tuple[AllocatedDevice, ...]
    configs: tuple[OpaqueConfig, ...] = ()


class ClaimUnavailable(Exception):
    """The claim cannot be read, is not allocated, or is not the one the kubelet named; the message says which."""


class ClaimSource(Protocol):
    """Where the plugin reads what was allocated to a claim."""

    async def allocation(self, claim: ClaimRef, driver: str) -> Allocation:
        """The devices and configs of ``driver`` allocated to ``claim``; raises ClaimUnavailable."""
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


def allocation_of(resource_claim: Mapping[str, Any], claim: ClaimRef, driver: str) -> Allocation:
    """The devices and opaque configs of ``driver`` in a ResourceClaim object; raises ClaimUnavailable."""
    devices = allocated_devices(resource_claim, claim, driver)
    allocation = (resource_claim.get("status") or {}).get("allocation") or {}
    return Allocation(devices, opaque_configs((allocation.get("devices") or {}).get("config"), claim, driver))


def opaque_configs(entries: Any, claim: ClaimRef, driver: str) -> tuple[OpaqueConfig, ...]:
    """The opaque configs of ``driver`` among an allocation result's ``config`` entries (None: there are none);
    other drivers' are skipped unread. Raises ClaimUnavailable when an entry is no config."""
    if entries is None:
        return ()
    malformed = ClaimUnavailable(f"claim {claim.namespace}/{claim.name} has a malformed allocation config")
    if not isinstance(entries, list):
        raise malformed
    configs = []
    for index, entry in enumerate(entries):
        opaque = entry.get("opaque") if isinstance(entry, Mapping) else None
        if not isinstance(opaque, Mapping) or opaque.get("driver") != driver:
            continue
        requests = entry.get("requests") or []
        if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
            raise malformed
        configs.append(OpaqueConfig(tuple(requests), opaque.get("parameters"), index))
    return tuple(configs)
