"""Sharing through a claim, set in the claim's opaque config in the shape of NVIDIA's DRA driver's ``GpuConfig``:
time-slicing (``sharing.strategy: TimeSlicing``, ``sharing.timeSlicingConfig.interval``) or MPS
(``sharing.strategy: MPS``, ``sharing.mpsConfig``: the active thread percentage and pinned device memory limits of
the claim's CUDA clients).

A claim is shared when several containers (or pods) name it; the scheduler hands its devices out once, so sharing
is the claim's own business. The config reaches the plugin in the allocation result
(``status.allocation.devices.config[]``, class configs first, then the claim's): the last entry naming a request
(or naming none: all of them) wins for it. A config that does not decode fails its claim with one line naming the
field; entries for other drivers never reach this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Annotated, Any, Literal, get_args

from msgspec import Meta

from gpuplugin.core.config import Section, decode
from gpuplugin.core.errors import ConfigError
from gpuplugin.devices.mps import MAX_MEMORY_LIMIT_MIB
from gpuplugin.dra.claims import OpaqueConfig

#: The ``apiVersion`` and ``kind`` of our opaque parameters.
API_VERSION = "gpu.gpuplugin.dev/v1alpha1"
KIND = "GpuConfig"
Interval = Literal["Default", "Short", "Medium", "Long"]
INTERVALS: tuple[str, ...] = get_args(Interval)
DEFAULT_INTERVAL = "Default"
#: What the prepared CDI device tells the container: the GPU stays the GPU (as a device-plugin replica keeps its
#: GPU's spec), and the workload can see that it shares it and how.
STRATEGY_ENV = "GPUPLUGIN_SHARING_STRATEGY"
INTERVAL_ENV = "GPUPLUGIN_TIMESLICE_INTERVAL"
TIME_SLICING = "TimeSlicing"
MPS = "MPS"
_MIB = 1 << 20
#: A Kubernetes quantity of bytes: a decimal number with a binary (Ki…Ei) or decimal (k…E) suffix or an exponent.
_QUANTITY = re.compile(
    r"^\+?(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIXES = {
    **{s: 1024 ** (n + 1) for n, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 1000 ** (n + 1) for n, s in enumerate(("k", "M", "G", "T", "P", "E"))},
}

Quantity = Annotated[int, Meta(ge=0, description="bytes")] | Annotated[str, Meta(min_length=1, max_length=64)]


def interval_number(interval: str) -> int:
    """NVIDIA's number of an interval (``nvidia-smi compute-policy --set-timeslice``): Default 0 … Long 3."""
    return INTERVALS.index(interval)


class TimeSlicingConfigSection(Section):
    """``sharing.timeSlicingConfig``: the time slice each process gets before the next one runs."""

    interval: Interval = "Default"


class MpsConfigSection(Section):
    """``sharing.mpsConfig``: the share of each CUDA client of the claim's MPS server, as NVIDIA's ``MpsConfig``."""

    default_active_thread_percentage: Annotated[int, Meta(ge=1, le=100, description="percent of SMs")] | None = None
    default_pinned_device_memory_limit: Quantity | None = None
    """For every GPU of the request; a quantity (``8Gi``), at least 1 MiB."""
    default_per_device_pinned_memory_limit: dict[str, Quantity] | None = None
    """By GPU UUID or index among the request's GPUs; overrides the default for that GPU."""


class SharingSection(Section):
    """``sharing``: time-slicing or MPS, each with its own config."""

    strategy: Literal["TimeSlicing", "MPS"]
    time_slicing_config: TimeSlicingConfigSection | None = None
    mps_config: MpsConfigSection | None = None


class GpuConfigSection(Section):
    """The opaque parameters of a claim's config for our driver."""

    api_version: Literal["gpu.gpuplugin.dev/v1alpha1"]
    kind: Literal["GpuConfig"]
    sharing: SharingSection | None = None


@dataclass(frozen=True, slots=True)
class MpsShare:
    """What one request's CUDA clients may use of each of its GPUs under the claim's MPS server."""

    thread_percentage: int | None = None
    """Active thread percentage (1 to 100); None: all SMs."""
    pinned_mib: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Pinned device memory limit (MiB) by GPU UUID; a GPU not named has none."""


@dataclass(frozen=True, slots=True)
class _Decoded:
    """One config's sharing: ``None`` strategy shares nothing."""

    strategy: str | None
    interval: str = DEFAULT_INTERVAL
    mps: MpsConfigSection | None = None
    where: str = ""


@dataclass(frozen=True, slots=True)
class ClaimSharing:
    """How each shared request of a claim is shared."""

    time_slicing: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """The interval of each time-sliced request."""
    mps: Mapping[str, MpsShare] = field(default_factory=lambda: MappingProxyType({}))
    """The MPS share of each request served through the claim's MPS server."""


def _decode(config: OpaqueConfig) -> _Decoded:
    where = f"config[{config.index}].opaque.parameters"
    section = decode(config.parameters, GpuConfigSection, where)
    sharing = section.sharing
    if sharing is None:
        return _Decoded(None)
    if sharing.strategy == TIME_SLICING:
        if sharing.mps_config is not None:
            raise ConfigError.at(f"{where}.sharing.mpsConfig", "only with strategy MPS, not TimeSlicing")
        return _Decoded(TIME_SLICING, (sharing.time_slicing_config or TimeSlicingConfigSection()).interval)
    if sharing.time_slicing_config is not None:
        raise ConfigError.at(f"{where}.sharing.timeSlicingConfig", "only with strategy TimeSlicing, not MPS")
    mps = sharing.mps_config or MpsConfigSection()
    limits = f"{where}.sharing.mpsConfig"
    if mps.default_pinned_device_memory_limit is not None:
        quantity_mib(mps.default_pinned_device_memory_limit, f"{limits}.defaultPinnedDeviceMemoryLimit")
    for key, value in (mps.default_per_device_pinned_memory_limit or {}).items():
        quantity_mib(value, f"{limits}.defaultPerDevicePinnedMemoryLimit.{key}")
    return _Decoded(MPS, mps=mps, where=where)


def interval_of(config: OpaqueConfig) -> str | None:
    """The time-slice interval ``config`` sets (None: no time-slicing); raises ConfigError naming the field."""
    decoded = _decode(config)
    return decoded.interval if decoded.strategy == TIME_SLICING else None


def quantity_mib(value: int | str, path: str) -> int:
    """A quantity of bytes (``8Gi``, ``512Mi``, ``1e9``, 1073741824) in whole MiB, rounded down as NVIDIA's driver
    does; raises ConfigError naming ``path`` when it is no quantity, below 1 MiB or above 1 TiB."""
    if isinstance(value, int):
        count = Decimal(value)
    else:
        match = _QUANTITY.match(value)
        if match is None:
            raise ConfigError.at(path, f"not a quantity of bytes (like 8Gi or 512Mi), got {value!r}")
        suffix = match["suffix"] or ""
        try:
            scale = Decimal(_SUFFIXES[suffix]) if suffix in _SUFFIXES else Decimal(f"1{suffix}" if suffix else 1)
            count = Decimal(match["number"]) * scale
        except InvalidOperation:
            raise ConfigError.at(path, f"not a quantity of bytes, got {value!r}") from None
    if count > Decimal(MAX_MEMORY_LIMIT_MIB) * _MIB:
        raise ConfigError.at(path, f"at most 1Ti, got {value!r}")
    mib = int(count // _MIB)
    if mib < 1:
        raise ConfigError.at(path, f"at least 1Mi, got {value!r}")
    return mib


def claim_sharing(configs: Sequence[OpaqueConfig], gpus: Mapping[str, Sequence[str]]) -> ClaimSharing:
    """How each request of ``gpus`` (request → the UUIDs of its GPUs, in order) is shared; every config is decoded,
    so a bad one fails the claim even where it names no request of ours. Raises ConfigError."""
    decoded = [(config, _decode(config)) for config in configs]
    sliced: dict[str, str] = {}
    mps: dict[str, MpsShare] = {}
    for request, uuids in gpus.items():
        # Later entries win: the claim's own configs come after its class's.
        chosen = next((d for config, d in reversed(decoded) if _names(config, request)), None)
        if chosen is None or chosen.strategy is None:
            continue
        if chosen.strategy == TIME_SLICING:
            sliced[request] = chosen.interval
        elif chosen.mps is not None:
            mps[request] = _share(chosen.mps, uuids, f"{chosen.where}.sharing.mpsConfig", request)
    return ClaimSharing(MappingProxyType(sliced), MappingProxyType(mps))


def _share(config: MpsConfigSection, uuids: Sequence[str], where: str, request: str) -> MpsShare:
    """One request's share: the default limit on each of its GPUs, then the per-device ones (UUID or index)."""
    pinned: dict[str, int] = {}
    if config.default_pinned_device_memory_limit is not None:
        default = quantity_mib(config.default_pinned_device_memory_limit, f"{where}.defaultPinnedDeviceMemoryLimit")
        pinned = dict.fromkeys(uuids, default)
    for key, value in (config.default_per_device_pinned_memory_limit or {}).items():
        path = f"{where}.defaultPerDevicePinnedMemoryLimit.{key}"
        if key in uuids:
            uuid = key
        elif key.isdecimal() and int(key) < len(uuids):
            uuid = uuids[int(key)]
        else:
            raise ConfigError.at(path, f"names no GPU of request {request} (a UUID, or an index below {len(uuids)})")
        pinned[uuid] = quantity_mib(value, path)
    return MpsShare(config.default_active_thread_percentage, MappingProxyType(pinned))


def time_slicing_env(interval: str) -> dict[str, str]:
    """The environment of a time-sliced request's CDI device, besides its GPUs' own."""
    return {STRATEGY_ENV: TIME_SLICING, INTERVAL_ENV: interval}


def check_intervals(sliced: Mapping[str, object]) -> dict[str, str]:
    """``sliced`` as read back from a checkpoint: names (requests, GPUs) to known intervals; raises ValueError."""
    if not isinstance(sliced, Mapping):
        raise ValueError(f"time-slicing is a {type(sliced).__name__}, not a mapping")
    checked: dict[str, str] = {}
    for name, interval in sliced.items():
        if not isinstance(name, str) or interval not in INTERVALS:
            raise ValueError(f"time-slicing of {name!r} is {interval!r}, not one of {', '.join(INTERVALS)}")
        checked[name] = str(interval)
    return checked


def encode_shares(mps: Mapping[str, MpsShare]) -> dict[str, Any]:
    """The MPS shares of a claim as the checkpoint holds them."""
    return {
        request: {"activeThreadPercentage": share.thread_percentage, "pinnedMemoryMiB": dict(share.pinned_mib)}
        for request, share in mps.items()
    }


def decode_shares(entries: object) -> dict[str, MpsShare]:
    """The MPS shares of a checkpoint entry; raises ValueError."""
    if not isinstance(entries, Mapping):
        raise ValueError(f"mps is a {type(entries).__name__}, not a mapping")
    shares: dict[str, MpsShare] = {}
    for request, entry in entries.items():
        threads, pinned = entry["activeThreadPercentage"], entry["pinnedMemoryMiB"]
        if threads is not None and not (isinstance(threads, int) and 1 <= threads <= 100):
            raise ValueError(f"mps thread percentage of {request!r} is {threads!r}")
        if not isinstance(pinned, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and 1 <= v <= MAX_MEMORY_LIMIT_MIB for k, v in pinned.items()
        ):
            raise ValueError(f"mps memory limits of {request!r} are {pinned!r}")
        shares[str(request)] = MpsShare(threads, MappingProxyType(dict(pinned)))
    return shares


def _names(config: OpaqueConfig, request: str) -> bool:
    """A config naming no request applies to all; one naming ``gpu`` applies to its subrequests (``gpu/large``)."""
    if not config.requests:
        return True
    return any(request == name or request.startswith(f"{name}/") for name in config.requests)
