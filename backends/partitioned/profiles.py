"""MIG profiles: compute and memory slices, memory, how many fit, where they may start, and NVIDIA's names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

#: An H100/H200 has 7 compute slices and 8 memory slices.
H200_COMPUTE_SLICES = 7
H200_MEMORY_SLICES = 8
#: What an H200 reports as its memory (MiB); NVIDIA's profile names are fractions of it.
_MIB = 1024 * 1024
_GIB = 1024 * 1024 * 1024


class ProfileError(ValueError):
    """A profile is unknown or a profile table is inconsistent; the message names it. Retrying does not help."""


@dataclass(frozen=True, slots=True)
class Profile:
    """One GPU-instance profile: a partition spanning ``compute_slices`` and ``memory_slices``."""

    name: str
    """NVIDIA's name: ``1g.18gb``, ``1g.18gb+me``."""
    compute_slices: int
    memory_slices: int
    memory_mib: int
    max_count: int
    """How many a GPU holds at most."""
    starts: tuple[int, ...]
    """Memory slices a partition of this profile may start at; it covers ``memory_slices`` from there."""


@dataclass(frozen=True, slots=True)
class ProfileTable:
    """The profiles a GPU offers, and its geometry."""

    compute_slices: int
    memory_slices: int
    profiles: tuple[Profile, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ProfileError(f"profile table names a profile twice: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    def get(self, name: str) -> Profile:
        """The profile called ``name``; raises ProfileError naming the known ones."""
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(self.names) or 'none'}")


def memory_gb(memory_mib: int, total_memory_mib: int) -> int:
    """The ``gb`` of a profile's name, as NVIDIA computes it: the profile's share of the GPU's memory rounded up to
    eighths, times the GPU's memory in whole GiB rounded up (an H200's 143771 MiB make 141; 16384 MiB make 18)."""
    fraction = math.ceil(memory_mib * _MIB / (total_memory_mib * _MIB) * 8) / 8
    total_gb = (total_memory_mib * _MIB + _GIB - 1) // _GIB
    # Half away from zero, as Go's math.Round; Python's round() would make 70.5 into 70, not NVIDIA's 71.
    return math.floor(fraction * total_gb + 0.5)


def profile_name(
    gpu_instance_slices: int,
    memory_mib: int,
    total_memory_mib: int,
    *,
    compute_instance_slices: int | None = None,
    variant: str = "",
) -> str:
    """NVIDIA's name: ``<g>g.<gb>gb``, ``<c>c.<g>g.<gb>gb`` for a smaller compute instance, plus a variant suffix."""
    name = f"{gpu_instance_slices}g.{memory_gb(memory_mib, total_memory_mib)}gb{variant}"
    if compute_instance_slices is not None and compute_instance_slices != gpu_instance_slices:
        name = f"{compute_instance_slices}c.{name}"
    return name


def valid_starts(compute: int, memory: int, compute_slices: int, memory_slices: int) -> tuple[int, ...]:
    """NVIDIA's placements: starts aligned to the profile's memory size, where its compute slices still fit
    (on a 7/8 GPU: 1g at 0-6; 1g with 2 memory slices at 0, 2, 4, 6; 2g at 0, 2, 4; 3g at 0, 4; 4g and 7g at 0)."""
    return tuple(
        start
        for start in range(0, memory_slices, memory)
        if start + memory <= memory_slices and start + compute <= compute_slices
    )


def _profile(name: str, compute: int, memory: int, memory_mib: int, max_count: int) -> Profile:
    starts = valid_starts(compute, memory, H200_COMPUTE_SLICES, H200_MEMORY_SLICES)
    return Profile(name, compute, memory, memory_mib, max_count, starts)


#: The H100/H200 geometry with the memory NVIDIA reports for an H200's profiles.
H200_PROFILES = ProfileTable(
    compute_slices=H200_COMPUTE_SLICES,
    memory_slices=H200_MEMORY_SLICES,
    profiles=(
        _profile("1g.18gb", 1, 1, 16384, 7),
        _profile("1g.35gb", 1, 2, 33280, 4),
        _profile("2g.35gb", 2, 2, 33280, 3),
        _profile("3g.71gb", 3, 4, 71424, 2),
        _profile("4g.71gb", 4, 4, 71424, 1),
        _profile("7g.141gb", 7, 8, 143360, 1),
    ),
)
BUILT_IN_TABLES: Mapping[str, ProfileTable] = MappingProxyType({"h200": H200_PROFILES})


class InstanceProfileInfo(Protocol):
    """What a parent reports about one GPU-instance profile (the NVML backend's ``GpuInstanceProfile``)."""

    @property
    def slice_count(self) -> int: ...

    @property
    def memory_mib(self) -> int: ...

    @property
    def instance_count(self) -> int: ...

    @property
    def variant(self) -> str: ...


def table_from_infos(infos: Sequence[InstanceProfileInfo], total_memory_mib: int) -> ProfileTable:
    """A table from what NVML reports for one GPU; memory slices follow from each profile's share of the largest.

    Raises ProfileError when the GPU reports no profiles (no MIG).
    """
    if not infos:
        raise ProfileError("the GPU reports no GPU-instance profiles (it has no MIG)")
    full = max(infos, key=lambda i: (i.slice_count, i.memory_mib))
    compute_slices = full.slice_count
    # MIG GPUs with 7 compute slices have 8 memory slices; the others (A30: 4 and 4) have as many of each.
    memory_slices = H200_MEMORY_SLICES if compute_slices == H200_COMPUTE_SLICES else compute_slices
    profiles: dict[str, Profile] = {}
    for info in sorted(infos, key=lambda i: (i.slice_count, i.memory_mib, i.variant)):
        memory = max(1, min(memory_slices, round(info.memory_mib * memory_slices / full.memory_mib)))
        name = profile_name(info.slice_count, info.memory_mib, total_memory_mib, variant=info.variant)
        starts = valid_starts(info.slice_count, memory, compute_slices, memory_slices)
        profiles.setdefault(name, Profile(name, info.slice_count, memory, info.memory_mib, info.instance_count, starts))
    return ProfileTable(compute_slices, memory_slices, tuple(profiles.values()))
