"""The prepared claims, on disk in the plugin's state directory, so that a plugin restart keeps them.

The kubelet does not prepare a claim again after our restart while its pod runs: whatever we told it must still
hold, and a later unprepare must find the claim. The file is rewritten atomically after every change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from gpuplugin.devices.cdi import write_atomically
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef
from gpuplugin.dra.sharing import ClaimSharing, MpsShare, check_intervals, decode_shares, encode_shares

CHECKPOINT_VERSION = 1
#: Only the plugin (root) reads it.
_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class PreparedClaim:
    """A claim the kubelet was told is prepared, with the devices it was given."""

    claim: ClaimRef
    devices: tuple[AllocatedDevice, ...]
    time_slicing: Mapping[str, str] = field(default_factory=dict)
    """The time-slice interval of each time-sliced request, to write the same spec again if it goes missing."""
    mps: Mapping[str, MpsShare] = field(default_factory=dict)
    """The MPS share of each request served through the claim's MPS server."""
    timeslice_gpus: Mapping[str, str] = field(default_factory=dict)
    """The GPUs (by UUID) whose time-slice interval this claim set, with that interval: what goes back to Default
    once no prepared claim holds it, after a plugin restart too."""
    mps_gpus: tuple[str, ...] = ()
    """The GPUs (by UUID) of the claim's MPS control daemon; empty: it has none."""

    @property
    def sharing(self) -> ClaimSharing:
        return ClaimSharing(self.time_slicing, self.mps)


class CheckpointCorrupt(Exception):
    """The checkpoint cannot be read back; the message names the file and what is wrong."""


def encode(claims: Mapping[str, PreparedClaim]) -> bytes:
    document = {
        "version": CHECKPOINT_VERSION,
        "claims": {
            uid: {
                "namespace": prepared.claim.namespace,
                "name": prepared.claim.name,
                "devices": [{"request": d.request, "pool": d.pool, "device": d.device} for d in prepared.devices],
                # Only when set: a checkpoint without sharing reads the same in a plugin that knows none.
                **({"timeSlicing": dict(prepared.time_slicing)} if prepared.time_slicing else {}),
                **({"timeSliceGpus": dict(prepared.timeslice_gpus)} if prepared.timeslice_gpus else {}),
                **({"mps": encode_shares(prepared.mps)} if prepared.mps else {}),
                **({"mpsGpus": list(prepared.mps_gpus)} if prepared.mps_gpus else {}),
            }
            for uid, prepared in sorted(claims.items())
        },
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def decode(content: bytes, path: Path) -> dict[str, PreparedClaim]:
    """The claims of a checkpoint file's content; raises CheckpointCorrupt naming ``path``."""
    try:
        document = json.loads(content)
        if document.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {document.get('version')!r}, expected {CHECKPOINT_VERSION}")
        claims: dict[str, PreparedClaim] = {}
        for uid, entry in document["claims"].items():
            devices = tuple(_device(d) for d in entry["devices"])
            ref = ClaimRef(_text(entry["namespace"]), _text(entry["name"]), uid)
            claims[uid] = PreparedClaim(
                ref,
                devices,
                check_intervals(entry.get("timeSlicing", {})),
                decode_shares(entry.get("mps", {})),
                check_intervals(entry.get("timeSliceGpus", {})),
                tuple(_text(gpu) for gpu in _list(entry.get("mpsGpus", []))),
            )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointCorrupt(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    return claims


def _device(entry: Any) -> AllocatedDevice:
    return AllocatedDevice(_text(entry["request"]), _text(entry["pool"]), _text(entry["device"]))


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


class Checkpoint:
    """The prepared claims by UID, mirrored to one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._claims: dict[str, PreparedClaim] = {}

    @property
    def claims(self) -> Mapping[str, PreparedClaim]:
        return self._claims

    async def load(self) -> None:
        """Read the file (none yet: no claims); raises CheckpointCorrupt."""
        try:
            async with aiofiles.open(self.path, "rb") as f:
                content = await f.read()
        except FileNotFoundError:
            self._claims = {}
            return
        self._claims = decode(content, self.path)

    async def put(self, prepared: PreparedClaim) -> None:
        """Record a prepared claim; raises OSError (the claim is then not recorded)."""
        await self._save({**self._claims, prepared.claim.uid: prepared})

    async def drop(self, uid: str) -> None:
        """Forget a claim (unknown: nothing to do); raises OSError."""
        if uid in self._claims:
            await self._save({k: v for k, v in self._claims.items() if k != uid})

    async def _save(self, claims: dict[str, PreparedClaim]) -> None:
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        await write_atomically(self.path, encode(claims), _FILE_MODE)
        self._claims = claims
