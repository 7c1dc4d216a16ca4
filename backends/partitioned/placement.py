"""Placing a GPU's layout: each partition at a start slice its profile allows, none overlapping.

Largest profiles go first and each takes the first allowed start that is free; when a later one then finds no
room, earlier ones move to their next start (a search over at most 8 partitions of 7 starts each), so every layout the
hardware accepts is placed, and always the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpuplugin.backends.partitioned.profiles import Profile, ProfileTable


class LayoutError(ValueError):
    """A layout does not fit its GPU; the message names the GPU and the profile. Retrying does not help."""


@dataclass(frozen=True, slots=True)
class Placement:
    """One partition of a GPU: its profile and the memory slice it starts at."""

    profile: Profile
    start: int

    @property
    def slices(self) -> range:
        """The memory slices it covers."""
        return range(self.start, self.start + self.profile.memory_slices)


def _order(profiles: Sequence[Profile]) -> list[Profile]:
    # Largest first; ties by name, so that the order never depends on how the layout was written.
    return sorted(profiles, key=lambda p: (-p.compute_slices, -p.memory_slices, p.name))


def place(
    gpu: str, profiles: Sequence[Profile], table: ProfileTable, *, source: str = "layout"
) -> tuple[Placement, ...]:
    """Place ``profiles`` on the GPU labelled ``gpu``; the placements come back in start order.

    Raises LayoutError naming the GPU, the setting (``source``) and the profile that does not fit.
    """
    where = f"partitioned.{source}.gpu {gpu}"
    for profile in dict.fromkeys(profiles):
        count = sum(p == profile for p in profiles)
        if count > profile.max_count:
            raise LayoutError(f"{where}: {count} of {profile.name}, but a GPU holds at most {profile.max_count}")
    ordered = _order(profiles)
    best: list[Placement] = []
    chosen: list[Placement] = []

    def search(i: int, used: frozenset[int], compute: int) -> bool:
        nonlocal best
        if len(chosen) > len(best):
            best = list(chosen)
        if i == len(ordered):
            return True
        profile = ordered[i]
        if compute + profile.compute_slices > table.compute_slices:
            return False
        for start in profile.starts:
            placement = Placement(profile, start)
            if used.isdisjoint(placement.slices):
                chosen.append(placement)
                if search(i + 1, used | frozenset(placement.slices), compute + profile.compute_slices):
                    return True
                chosen.pop()
        return False

    if not search(0, frozenset(), 0):
        missing = ordered[len(best)]
        used = {s for p in best for s in p.slices}
        free = [s for s in range(table.memory_slices) if s not in used]
        after = ", ".join(p.profile.name for p in best) or "nothing"
        raise LayoutError(
            f"{where}: {missing.name} does not fit after {after} "
            f"(free slices: {', '.join(map(str, free)) or 'none'}; {missing.name} may start at "
            f"{', '.join(map(str, missing.starts))} and covers {missing.memory_slices})"
        )
    return tuple(sorted(chosen, key=lambda p: p.start))


def fill(gpu: str, profile: Profile, table: ProfileTable, *, source: str = "layout") -> tuple[Placement, ...]:
    """As many partitions of one profile as the GPU holds (``all-1g.18gb``: 7 on an H200)."""
    for count in range(profile.max_count, 0, -1):
        try:
            return place(gpu, [profile] * count, table, source=source)
        except LayoutError:
            continue
    return place(gpu, [profile], table, source=source)
