"""Settings of the partitioned backend: the parent it slices, the MIG strategy, the layouts and the profile table."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gpuplugin.backends.partitioned.profiles import BUILT_IN_TABLES, ProfileError, ProfileTable
from gpuplugin.core.config import Text, decode, word
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import AllocationPolicyKind
from gpuplugin.devices.mps import ControlDaemonSettings

_GPU_KEY = re.compile(r"^(?:gpu\s*)?(\d+)$", re.IGNORECASE)
_WHOLE = frozenset({"none", "whole", ""})
#: Partitions of one GPU at most: MIG makes at most 7 GPU instances on every MIG-capable GPU (A100 to B200).
MAX_PARTITIONS_PER_GPU = 7
#: Entries of ``layouts`` at most: far above any node's GPUs; the mock's own bound.
MAX_LAYOUTS = 1024


class Strategy(enum.StrEnum):
    """NVIDIA's MIG strategies."""

    NONE = "none"
    """MIG ignored: the parent's whole GPUs are served as they are."""
    SINGLE = "single"
    """Partitions served under the parent's name (``nvidia.com/gpu``); all must be one profile."""
    MIXED = "mixed"
    """One resource per profile: ``nvidia.com/mig-<profile>``."""


class Isolation(enum.StrEnum):
    """What makes a partition of a GPU without MIG a partition."""

    AUTO = "auto"
    """MPS over the nvml parent (real GPUs), simulated over the mock (kind clusters)."""
    MPS = "mps"
    """The whole GPU with MPS limits from the profile: its memory, and its compute slices as a thread percentage."""
    SIMULATED = "simulated"
    """A made-up MIG UUID and ``/dev/null`` capability nodes: env only, for clusters without GPUs."""


class ProfileSource(enum.StrEnum):
    """Where the profile table comes from."""

    H200 = "h200"
    """The H100/H200 geometry (7 compute, 8 memory slices) with an H200's memory sizes."""
    NVML = "nvml"
    """Each GPU's own GPU-instance profiles, read through NVML (MIG enabled or not)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """How one GPU is sliced: a list of profiles, as many of one profile as fit, or not at all."""

    profiles: tuple[str, ...] = ()
    """The partitions, ``MAX_PARTITIONS_PER_GPU`` (7) at most."""
    fill: str | None = None
    """``all-<profile>``: as many partitions of it as the GPU holds."""

    @property
    def whole(self) -> bool:
        """Not partitioned: the GPU is served whole under the parent's resource."""
        return self.fill is None and not self.profiles

    @property
    def names(self) -> tuple[str, ...]:
        return self.profiles if self.fill is None else (self.fill,)

    def __str__(self) -> str:
        if self.fill is not None:
            return f"all-{self.fill}"
        return ", ".join(self.profiles) if self.profiles else "none"


GpuKey = int | str
"""A GPU index, or a GPU UUID."""


@dataclass(frozen=True, slots=True)
class PartitionedSettings:
    """What the partitioned backend slices and how it serves the partitions."""

    parent: str = "mock"
    """The backend whose GPUs are sliced (``mock`` or ``nvml``), built with the same health policy and state dir."""
    parent_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """The parent's own settings, as its config section would hold them."""
    strategy: Strategy = Strategy.MIXED
    """``none``, ``single`` or ``mixed`` (NVIDIA's names); mixed serves each profile as its own resource."""
    layout: Layout = Layout(fill="1g.18gb")
    """Layout of every GPU without an entry in ``layouts``; default the most partitions (7 of 1g.18gb)."""
    layouts: Mapping[GpuKey, Layout] = field(default_factory=lambda: MappingProxyType({}))
    """Per GPU, by index or UUID (``MAX_LAYOUTS`` entries at most); a UUID entry wins over an index entry."""
    profiles: ProfileSource = ProfileSource.H200
    """``h200`` (the default geometry) or ``nvml`` (read from each GPU; needs the ``nvml`` parent)."""
    allocation_policy: AllocationPolicyKind = AllocationPolicyKind.DISTRIBUTED
    """How GetPreferredAllocation picks partitions: ``distributed`` over GPUs (NVIDIA's default) or ``packed``."""
    isolation: Isolation = Isolation.AUTO
    """How partitions of GPUs without MIG are made (real MIG devices are always served as they are)."""
    mps: ControlDaemonSettings = field(default_factory=ControlDaemonSettings)
    """The per-GPU MPS control daemons of MPS partitions: ``root``, ``command``, ``probe_interval_s``."""

    @property
    def uses_mps(self) -> bool:
        """Whether partitions of GPUs without MIG are MPS partitions."""
        if self.isolation is Isolation.AUTO:
            return self.parent == "nvml"
        return self.isolation is Isolation.MPS

    def __post_init__(self) -> None:
        if self.parent == "partitioned":
            raise ConfigError("partitioned.parent: the partitioned backend cannot slice itself")
        if self.profiles is ProfileSource.NVML and self.parent != "nvml":
            raise ConfigError(
                f"partitioned.profiles: nvml reads each GPU's profiles through NVML; parent is {self.parent!r}, "
                "set parent: nvml or profiles: h200"
            )
        table = BUILT_IN_TABLES.get(str(self.profiles))
        if table is not None:
            check_layout("partitioned.layout", self.layout, table)
            for key, layout in self.layouts.items():
                check_layout(f"partitioned.layouts.{key}", layout, table)

    def layout_of(self, index: int, uuid: str) -> tuple[Layout, str]:
        """The layout of one GPU and the setting it came from (for errors)."""
        if uuid in self.layouts:
            return self.layouts[uuid], f"layouts.{uuid}"
        if index in self.layouts:
            return self.layouts[index], f"layouts.{index}"
        return self.layout, "layout"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PartitionedSettings:
        """Read settings from a config section or flags; keys may use ``-`` or ``_``; None means unset."""
        values = {str(key).replace("-", "_"): value for key, value in options.items() if value is not None}
        values = {key: word(value) if key in _WORDS else value for key, value in values.items()}
        section = decode(values, PartitionedSection, "partitioned", lax=True)
        given: dict[str, Any] = {
            "parent": section.parent,
            "parent_options": None if section.parent_options is None else MappingProxyType(section.parent_options),
            "strategy": section.strategy,
            "layout": None if section.layout is None else parse_layout("partitioned.layout", section.layout),
            "layouts": None if section.layouts is None else _layouts("partitioned.layouts", section.layouts),
            "profiles": section.profiles,
            "allocation_policy": section.allocation_policy,
            "isolation": section.isolation,
            "mps": None if section.mps is None else ControlDaemonSettings.from_mapping(section.mps, "partitioned.mps"),
        }
        return cls(**{key: value for key, value in given.items() if value is not None})


#: A layout as written: ``all-<profile>``, ``none``, profiles separated by commas, a list, or a mapping.
LayoutValue = str | list[Any] | dict[Any, Any]


class PartitionedSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The partitioned backend's section as written; layouts are read by ``parse_layout``, ``mps`` by
    ControlDaemonSettings."""

    parent: Text | None = None
    parent_options: dict[str, Any] | None = None
    strategy: Strategy | None = None
    layout: LayoutValue | None = None
    layouts: Annotated[dict[Any, LayoutValue], Meta(max_length=MAX_LAYOUTS)] | None = None
    profiles: ProfileSource | None = None
    allocation_policy: AllocationPolicyKind | None = None
    isolation: Isolation | None = None
    mps: dict[str, Any] | None = None


#: Choices that flags may spell in any case.
_WORDS = frozenset({"strategy", "profiles", "allocation_policy", "isolation"})


def check_layout(name: str, layout: Layout, table: ProfileTable) -> None:
    """Every profile the layout names is in ``table``."""
    for profile in layout.names:
        try:
            table.get(profile)
        except ProfileError as error:
            raise ConfigError(f"{name}: {error}") from None


def parse_layout(name: str, value: object) -> Layout:
    """``all-1g.18gb``, ``none``, a profile or comma-separated profiles, a list of profiles, ``{all: 1g.18gb}`` or
    ``{1g.18gb: 3, 2g.35gb: 2}``; at most ``MAX_PARTITIONS_PER_GPU`` partitions."""
    layout = _parse_layout(name, value)
    _at_most(name, len(layout.profiles))
    return layout


def _at_most(name: str, partitions: int) -> None:
    if partitions > MAX_PARTITIONS_PER_GPU:
        raise ConfigError(
            f"{name}: {partitions} partitions; a GPU holds at most {MAX_PARTITIONS_PER_GPU} (MIG's limit)"
        )


def _parse_layout(name: str, value: object) -> Layout:
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _WHOLE:
            return Layout()
        if text.lower().startswith("all-"):
            return Layout(fill=_profile(name, text[4:]))
        return Layout(profiles=tuple(_profile(f"{name}[{i}]", p) for i, p in enumerate(text.split(","))))
    if isinstance(value, Mapping):
        if set(value) == {"all"}:
            return Layout(fill=_profile(f"{name}.all", value["all"]))
        profiles: list[str] = []
        for profile, count in value.items():
            # Each count is bounded before the list grows: a count of a billion is refused, not allocated.
            profiles += [_profile(name, profile)] * _count(f"{name}.{profile}", count)
        return Layout(profiles=tuple(profiles))
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        _at_most(name, len(value))
        return Layout(profiles=tuple(_profile(f"{name}[{i}]", p) for i, p in enumerate(value)))
    raise ConfigError(
        f"{name}: must be all-<profile>, none, a list of profiles or a mapping of profile to count, got {value!r}"
    )


def _profile(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: a profile name such as 1g.18gb, got {value!r}")
    return value.strip()


def _count(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PARTITIONS_PER_GPU:
        return value
    raise ConfigError(f"{name}: must be a count from 0 to {MAX_PARTITIONS_PER_GPU}, got {value!r}")


def _gpu_key(name: str, key: object) -> GpuKey:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.strip():
        match = _GPU_KEY.match(key.strip())
        return int(match.group(1)) if match else key.strip()
    raise ConfigError(f"{name}: keys are GPU indices or UUIDs, got {key!r}")


def _layouts(name: str, value: Mapping[Any, Any]) -> Mapping[GpuKey, Layout]:
    layouts: dict[GpuKey, Layout] = {}
    for raw_key, raw in value.items():
        key = _gpu_key(name, raw_key)
        if key in layouts:
            raise ConfigError(f"{name}: GPU {key} has two layouts")
        layouts[key] = parse_layout(f"{name}.{key}", raw)
    return MappingProxyType(layouts)
