"""Preparing and unpreparing claims: each claim's devices resolved in the current tree, its CDI spec written, and
the checkpoint updated, one claim at a time; a claim that fails gets its error and leaves the others alone.

Idempotent both ways: a claim already prepared answers what it answered before (its spec rewritten if it went
missing), and unpreparing a claim never prepared, or already unprepared, succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiofiles.os
import structlog

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import Device, DeviceTree, Health, SpecConflict
from gpuplugin.devices.strategies import CDI_DEVICE_NAME
from gpuplugin.dra.checkpoint import Checkpoint, PreparedClaim
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef, ClaimSource, ClaimUnavailable
from gpuplugin.dra.claimspec import cdi_device_id, cdi_device_name, remove_claim_spec, spec_path, write_claim_spec
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.sharing import time_slicing

log = structlog.get_logger("gpuplugin.dra.preparer")

#: Claim UIDs become file and CDI device names: Kubernetes UIDs are UUIDs, anything else is refused.
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """One claim's answer: its devices, each with the CDI device name of its request, or an error."""

    devices: tuple[tuple[AllocatedDevice, str], ...] = ()
    error: str = ""


class ClaimRefused(Exception):
    """This claim cannot be prepared; the message is what the kubelet shows in the pod's events."""


class ClaimPreparer:
    """Prepares claims of one driver on one node from the tree ``tree()`` returns at the time of the call."""

    def __init__(
        self,
        settings: DriverSettings,
        tree: Callable[[], DeviceTree],
        claims: ClaimSource,
        checkpoint: Checkpoint,
    ) -> None:
        self._settings = settings
        self._tree = tree
        self._claims = claims
        self._checkpoint = checkpoint
        # One change at a time: the checkpoint is rewritten whole, and a claim prepared and unprepared at once
        # must end in one state or the other.
        self._lock = asyncio.Lock()

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, ClaimResult]:
        """A result for every claim, by UID (a claim named twice is prepared once)."""
        results: dict[str, ClaimResult] = {}
        async with self._lock:
            for claim in claims:
                if claim.uid in results:
                    continue
                try:
                    results[claim.uid] = await self._prepare(claim)
                except ClaimRefused as exc:
                    log.warning("claim not prepared", claim=_name(claim), uid=claim.uid, error=str(exc))
                    results[claim.uid] = ClaimResult(error=str(exc))
        return results

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """An error (empty: none) for every claim, by UID."""
        errors: dict[str, str] = {}
        async with self._lock:
            for claim in claims:
                if claim.uid in errors:
                    continue
                try:
                    _check_ref(claim)
                    await remove_claim_spec(self._settings, claim.uid)
                    await self._checkpoint.drop(claim.uid)
                except ClaimRefused as exc:
                    errors[claim.uid] = str(exc)
                except OSError as exc:
                    errors[claim.uid] = f"cannot remove the claim's CDI spec or checkpoint: {exc.strerror or exc}"
                else:
                    errors[claim.uid] = ""
                    log.info("claim unprepared", claim=_name(claim), uid=claim.uid)
        return errors

    async def _prepare(self, claim: ClaimRef) -> ClaimResult:
        _check_ref(claim)
        known = self._checkpoint.claims.get(claim.uid)
        if known is not None:
            if await _missing(spec_path(self._settings, claim.uid)) and known.devices:
                # Prepared before, spec gone (a wiped /var/run): the same devices, written again.
                await self._write(claim, self._resolve(claim, known.devices), known.time_slicing)
            return self._result(known)
        try:
            allocation = await self._claims.allocation(claim, self._settings.driver_name)
        except ClaimUnavailable as exc:
            raise ClaimRefused(str(exc)) from None
        allocated = allocation.devices
        requests = self._resolve(claim, allocated)
        try:
            sliced = time_slicing(allocation.configs, list(requests))
        except ConfigError as exc:
            raise ClaimRefused(f"claim {_name(claim)}: {exc}") from None
        if requests:
            await self._write(claim, requests, sliced)
        prepared = PreparedClaim(claim, allocated, sliced)
        try:
            await self._checkpoint.put(prepared)
        except OSError as exc:
            # Not recorded, so not prepared: no spec may outlive it, or nothing would ever remove it.
            with contextlib.suppress(OSError):
                await remove_claim_spec(self._settings, claim.uid)
            raise ClaimRefused(f"cannot write the checkpoint: {exc.strerror or exc}") from None
        log.info("claim prepared", claim=_name(claim), uid=claim.uid, devices=[d.device for d in allocated])
        return self._result(prepared)

    def _resolve(self, claim: ClaimRef, allocated: Sequence[AllocatedDevice]) -> dict[str, list[Device]]:
        """The tree's devices of an allocation by request; refused when one is elsewhere, unknown or unhealthy."""
        named = device_names(self._tree())
        requests: dict[str, list[Device]] = {}
        for result in allocated:
            if result.pool != self._settings.pool:
                raise ClaimRefused(f"device {result.device} is in pool {result.pool}, not {self._settings.pool}")
            device = named.get(result.device)
            if device is None:
                raise ClaimRefused(f"device {result.device} is not on this node")
            if device.health is not Health.HEALTHY:
                raise ClaimRefused(f"device {result.device} is unhealthy")
            if not CDI_DEVICE_NAME.match(cdi_device_name(claim.uid, result.request)):
                raise ClaimRefused(f"request name {result.request[:64]!r} cannot name a CDI device")
            of_request = requests.setdefault(result.request, [])
            if device not in of_request:
                of_request.append(device)
        return requests

    async def _write(
        self, claim: ClaimRef, requests: Mapping[str, Sequence[Device]], sliced: Mapping[str, str]
    ) -> None:
        try:
            await write_claim_spec(self._settings, claim.uid, requests, sliced)
        except SpecConflict as exc:
            raise ClaimRefused(f"the claim's devices cannot share a container: {exc}") from None
        except OSError as exc:
            raise ClaimRefused(f"cannot write the claim's CDI spec: {exc.strerror or exc}") from None

    def _result(self, prepared: PreparedClaim) -> ClaimResult:
        uid = prepared.claim.uid
        return ClaimResult(devices=tuple((d, cdi_device_id(self._settings, uid, d.request)) for d in prepared.devices))


def _check_ref(claim: ClaimRef) -> None:
    if not _UID.match(claim.uid):
        raise ClaimRefused(f"claim UID {claim.uid[:128]!r} is not a UID")
    if not claim.namespace or not claim.name:
        raise ClaimRefused(f"claim {claim.uid} lacks its namespace or name")


def _name(claim: ClaimRef) -> str:
    return f"{claim.namespace}/{claim.name}"


async def _missing(path: Path) -> bool:
    return not await aiofiles.os.path.exists(path)
