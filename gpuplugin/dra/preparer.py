"""Preparing and unpreparing claims: each claim's devices resolved in the current tree, its sharing applied, its
CDI spec written, and the checkpoint updated, one claim at a time; a claim that fails gets its error and leaves the
others alone.

Sharing applied on the node: a time-sliced request's GPUs get its interval (through the backend's TimeSliceControl;
Default leaves the GPU as it is), back to Default once the last claim holding them goes; MPS requests get one
control daemon per claim, its pipe and log directories under ``<state dir>/mps/<hash of the claim UID>``, quit on
unprepare. Both are recorded in the checkpoint, so a restarted plugin undoes them too.

Idempotent both ways: a claim already prepared answers what it answered before (its spec rewritten if it went
missing, its MPS daemon started again if it no longer answers), and unpreparing a claim never prepared, or already
unprepared, succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiofiles.os
import structlog

from gpuplugin.core.backend import TimeSliceControl, TimeSliceFailed
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import Device, DeviceTree, Health, SpecConflict
from gpuplugin.devices.mps import ControlDaemon, ControlDaemonSettings
from gpuplugin.devices.strategies import CDI_DEVICE_NAME
from gpuplugin.dra.checkpoint import Checkpoint, PreparedClaim
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef, ClaimSource, ClaimUnavailable
from gpuplugin.dra.claimspec import (
    cdi_device_id,
    cdi_device_name,
    gpu_uuid,
    remove_claim_spec,
    spec_path,
    write_claim_spec,
)
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.sharing import DEFAULT_INTERVAL, ClaimSharing, claim_sharing, interval_number

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


class ClaimObserver(Protocol):
    """What counts claims (the DRA metrics): told the outcome of every prepare and unprepare call."""

    def observe_prepare(self, seconds: float, prepared: int, failed: int) -> None: ...

    def observe_unprepare(self, unprepared: int, failed: int) -> None: ...


class ClaimPreparer:
    """Prepares claims of one driver on one node from the tree ``tree()`` returns at the time of the call;
    ``observer``, where set, is told the outcome of every call."""

    def __init__(
        self,
        settings: DriverSettings,
        tree: Callable[[], DeviceTree],
        claims: ClaimSource,
        checkpoint: Checkpoint,
        *,
        backend: object = None,
        mps: ControlDaemonSettings | None = None,
    ) -> None:
        """``backend``: what sets time-slice intervals, when it is a TimeSliceControl; ``mps``: how claims' MPS
        control daemons run (their ``root`` is replaced by ``<state dir>/mps``)."""
        self._settings = settings
        self._tree = tree
        self._claims = claims
        self._checkpoint = checkpoint
        self.use_backend(backend)
        self.mps = dataclasses.replace(mps or ControlDaemonSettings(), root=settings.state_dir / "mps")
        # One change at a time: the checkpoint is rewritten whole, and a claim prepared and unprepared at once
        # must end in one state or the other.
        self._lock = asyncio.Lock()
        self.observer: ClaimObserver | None = None

    def use_backend(self, backend: object) -> None:
        """Set time-slice intervals through ``backend`` from now on (a reloaded config's), where it can."""
        self._timeslices = backend if isinstance(backend, TimeSliceControl) else None
        self._backend_name = "this plugin" if backend is None else f"the {getattr(backend, 'name', '')} backend"

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, ClaimResult]:
        """A result for every claim, by UID (a claim named twice is prepared once)."""
        began = time.perf_counter()
        try:
            results = await self._prepare_all(claims)
        except Exception:
            if self.observer is not None:
                # The kubelet gets UNKNOWN for every claim of the call.
                self.observer.observe_prepare(time.perf_counter() - began, 0, len({c.uid for c in claims}))
            raise
        if self.observer is not None:
            failed = sum(1 for result in results.values() if result.error)
            self.observer.observe_prepare(time.perf_counter() - began, len(results) - failed, failed)
        return results

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """An error (empty: none) for every claim, by UID."""
        try:
            errors = await self._unprepare_all(claims)
        except Exception:
            if self.observer is not None:
                self.observer.observe_unprepare(0, len({c.uid for c in claims}))
            raise
        if self.observer is not None:
            failed = sum(1 for error in errors.values() if error)
            self.observer.observe_unprepare(len(errors) - failed, failed)
        return errors

    async def _prepare_all(self, claims: Sequence[ClaimRef]) -> dict[str, ClaimResult]:
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

    async def _unprepare_all(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        errors: dict[str, str] = {}
        async with self._lock:
            for claim in claims:
                if claim.uid in errors:
                    continue
                try:
                    _check_ref(claim)
                    known = self._checkpoint.claims.get(claim.uid)
                    if known is not None:
                        # Undone first: a failure keeps the claim recorded, so the kubelet's retry undoes it again.
                        await self._restore_timeslices(known.timeslice_gpus, claim.uid)
                        await self._stop_mps(claim.uid, known.mps_gpus)
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
            await self._revive_mps(claim, known)
            if await _missing(spec_path(self._settings, claim.uid)) and known.devices:
                # Prepared before, spec gone (a wiped /var/run): the same devices, written again.
                await self._write(claim, self._resolve(claim, known.devices), known)
            return self._result(known)
        try:
            allocation = await self._claims.allocation(claim, self._settings.driver_name)
        except ClaimUnavailable as exc:
            raise ClaimRefused(str(exc)) from None
        allocated = allocation.devices
        requests = self._resolve(claim, allocated)
        try:
            sharing = claim_sharing(allocation.configs, {r: [gpu_uuid(d) for d in ds] for r, ds in requests.items()})
        except ConfigError as exc:
            raise ClaimRefused(f"claim {_name(claim)}: {exc}") from None
        timeslice_gpus = self._timeslice_gpus(claim, requests, sharing)
        mps_gpus = tuple(dict.fromkeys(gpu_uuid(d) for r in sharing.mps for d in requests[r]))
        prepared = PreparedClaim(claim, allocated, sharing.time_slicing, sharing.mps, timeslice_gpus, mps_gpus)
        await self._set_timeslices(claim, timeslice_gpus)
        try:
            if mps_gpus:
                await self._start_mps(claim, mps_gpus)
            if requests:
                await self._write(claim, requests, prepared)
            try:
                await self._checkpoint.put(prepared)
            except OSError as exc:
                # Not recorded, so not prepared: no spec may outlive it, or nothing would ever remove it.
                with contextlib.suppress(OSError):
                    await remove_claim_spec(self._settings, claim.uid)
                raise ClaimRefused(f"cannot write the checkpoint: {exc.strerror or exc}") from None
        except BaseException:
            # Nothing of a claim not prepared may stay: its daemon, or an interval no claim holds any more.
            with contextlib.suppress(ClaimRefused):
                await self._stop_mps(claim.uid, mps_gpus)
            with contextlib.suppress(ClaimRefused):
                await self._restore_timeslices(timeslice_gpus, claim.uid)
            raise
        log.info("claim prepared", claim=_name(claim), uid=claim.uid, devices=[d.device for d in allocated])
        return self._result(prepared)

    def _timeslice_gpus(
        self, claim: ClaimRef, requests: Mapping[str, Sequence[Device]], sharing: ClaimSharing
    ) -> dict[str, str]:
        """The GPUs whose interval the claim sets (Default sets none), checked against each other and against the
        intervals other prepared claims hold; refused when the backend cannot set one."""
        wanted: dict[str, str] = {}
        for request, interval in sharing.time_slicing.items():
            if interval == DEFAULT_INTERVAL:
                continue
            for device in requests[request]:
                gpu = gpu_uuid(device)
                if wanted.setdefault(gpu, interval) != interval:
                    raise ClaimRefused(
                        f"claim {_name(claim)}: GPU {gpu} is asked for two time-slice intervals, "
                        f"{wanted[gpu]} and {interval} (request {request})"
                    )
        for gpu, interval in wanted.items():
            for other in self._checkpoint.claims.values():
                held = other.timeslice_gpus.get(gpu)
                if held is not None and held != interval:
                    raise ClaimRefused(
                        f"claim {_name(claim)}: GPU {gpu} runs time slices of interval {held} for claim "
                        f"{_name(other.claim)}; this claim asks {interval}"
                    )
        if wanted and self._timeslices is None:
            interval = next(iter(wanted.values()))
            raise ClaimRefused(
                f"claim {_name(claim)}: sharing.timeSlicingConfig.interval: {self._backend_name} cannot "
                f"set a GPU's time-slice interval ({interval}); use Default"
            )
        return wanted

    def _held(self, gpu: str, but: str) -> bool:
        """Whether a prepared claim other than ``but`` holds an interval on ``gpu``."""
        return any(gpu in p.timeslice_gpus for uid, p in self._checkpoint.claims.items() if uid != but)

    async def _set_timeslices(self, claim: ClaimRef, wanted: Mapping[str, str]) -> None:
        """Set each GPU's interval (one already held at it by another claim is left alone); on a failure, the
        GPUs set so far go back to Default and the claim is refused."""
        done: dict[str, str] = {}
        for gpu, interval in wanted.items():
            if self._held(gpu, claim.uid):
                continue
            assert self._timeslices is not None
            try:
                await self._timeslices.set_timeslice(gpu, interval_number(interval))
            except TimeSliceFailed as exc:
                with contextlib.suppress(ClaimRefused):
                    await self._restore_timeslices(done, claim.uid)
                raise ClaimRefused(f"claim {_name(claim)}: {exc}") from None
            done[gpu] = interval
            log.info("time-slice interval set", gpu=gpu, interval=interval, claim=_name(claim))

    async def _restore_timeslices(self, gpus: Mapping[str, str], uid: str) -> None:
        """Put back Default on the GPUs of ``gpus`` that no other prepared claim holds; raises ClaimRefused."""
        for gpu in gpus:
            if self._held(gpu, uid) or self._timeslices is None:
                continue
            try:
                await self._timeslices.set_timeslice(gpu, interval_number(DEFAULT_INTERVAL))
            except TimeSliceFailed as exc:
                raise ClaimRefused(f"cannot restore the Default time-slice interval: {exc}") from None
            log.info("time-slice interval restored", gpu=gpu, interval=DEFAULT_INTERVAL)

    def _daemon(self, uid: str, gpus: Sequence[str]) -> ControlDaemon:
        return ControlDaemon(mps_key(uid), self.mps, lambda: None, gpus)

    async def _start_mps(self, claim: ClaimRef, gpus: Sequence[str]) -> None:
        """Launch the claim's MPS control daemon (one already running on its pipe directory is taken as it is)."""
        daemon = self._daemon(claim.uid, gpus)
        if not await daemon.launch():
            raise ClaimRefused(
                f"claim {_name(claim)}: the MPS control daemon of GPUs {','.join(gpus)} did not start: "
                f"{daemon.state.last_error or 'it did not answer'}"
            )
        start_s = round(daemon.state.last_start_s or 0.0, 3)
        log.info("mps control daemon started", claim=_name(claim), gpus=list(gpus), start_s=start_s)

    async def _revive_mps(self, claim: ClaimRef, known: PreparedClaim) -> None:
        """A prepared claim asked again: its daemon must answer (it may have died, or the node rebooted)."""
        if known.mps_gpus and await self._daemon(claim.uid, known.mps_gpus).query("get_server_list") is None:
            await self._start_mps(claim, known.mps_gpus)

    async def _stop_mps(self, uid: str, gpus: Sequence[str]) -> None:
        """Quit the claim's daemon and remove its directories; raises ClaimRefused when they cannot go."""
        if not gpus:
            return
        await self._daemon(uid, gpus).quit()
        try:
            await asyncio.to_thread(_remove_tree, self.mps.root / mps_key(uid))
        except OSError as exc:
            raise ClaimRefused(f"cannot remove the claim's MPS directories: {exc.strerror or exc}") from None
        log.info("mps control daemon stopped", uid=uid, gpus=list(gpus))

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

    async def _write(self, claim: ClaimRef, requests: Mapping[str, Sequence[Device]], prepared: PreparedClaim) -> None:
        pipe = self.mps.pipe_dir(mps_key(claim.uid)) if prepared.mps_gpus else None
        try:
            await write_claim_spec(self._settings, claim.uid, requests, prepared.sharing, pipe)
        except SpecConflict as exc:
            raise ClaimRefused(f"the claim's devices cannot share a container: {exc}") from None
        except OSError as exc:
            raise ClaimRefused(f"cannot write the claim's CDI spec: {exc.strerror or exc}") from None

    def _result(self, prepared: PreparedClaim) -> ClaimResult:
        uid = prepared.claim.uid
        return ClaimResult(devices=tuple((d, cdi_device_id(self._settings, uid, d.request)) for d in prepared.devices))


def mps_key(uid: str) -> str:
    """The name of a claim's MPS directories: a hash of its UID, short because the MPS server's sockets live in the
    pipe directory and a unix socket's path has at most 107 bytes (``/var/lib/kubelet/plugins/<driver>/mps/<key>/
    pipe/control_privileged`` stays well under with 16 characters, would not with a 36-character UID)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _check_ref(claim: ClaimRef) -> None:
    if not _UID.match(claim.uid):
        raise ClaimRefused(f"claim UID {claim.uid[:128]!r} is not a UID")
    if not claim.namespace or not claim.name:
        raise ClaimRefused(f"claim {claim.uid} lacks its namespace or name")


def _name(claim: ClaimRef) -> str:
    return f"{claim.namespace}/{claim.name}"


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


async def _missing(path: Path) -> bool:
    return not await aiofiles.os.path.exists(path)
