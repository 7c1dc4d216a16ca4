"""The partitioned backend's profile table, placement rules and settings: pure functions, no backend running."""

from __future__ import annotations

from typing import Any

import pytest

from gpuplugin.backends.nvml.fake import H200_INSTANCE_PROFILES
from gpuplugin.backends.nvml.mig import GpuInstanceProfile
from gpuplugin.backends.partitioned import (
    H200_PROFILES,
    Layout,
    LayoutError,
    PartitionedSettings,
    ProfileError,
    ProfileSource,
    Strategy,
    fill,
    memory_gb,
    place,
    profile_name,
    table_from_infos,
)
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import AllocationPolicyKind

H200_MIB = 143771


def names(*profiles: str) -> list[Any]:
    return [H200_PROFILES.get(p) for p in profiles]


def test_h200_table_matches_nvidia() -> None:
    """The default table is the H200's: names, compute and memory slices, MiB, maximum count and start slices."""
    rows = [
        (p.name, p.compute_slices, p.memory_slices, p.memory_mib, p.max_count, p.starts) for p in H200_PROFILES.profiles
    ]
    assert rows == [
        ("1g.18gb", 1, 1, 16384, 7, (0, 1, 2, 3, 4, 5, 6)),
        ("1g.35gb", 1, 2, 33280, 4, (0, 2, 4, 6)),
        ("2g.35gb", 2, 2, 33280, 3, (0, 2, 4)),
        ("3g.71gb", 3, 4, 71424, 2, (0, 4)),
        ("4g.71gb", 4, 4, 71424, 1, (0,)),
        ("7g.141gb", 7, 8, 143360, 1, (0,)),
    ]
    assert (H200_PROFILES.compute_slices, H200_PROFILES.memory_slices) == (7, 8)


@pytest.mark.parametrize(
    ("mib", "gb"), [(16384, 18), (33280, 35), (71424, 71), (143360, 141)], ids=["1g", "2g", "3g-half-rounds-up", "7g"]
)
def test_memory_named_as_nvidia_names_h200_profiles(mib: int, gb: int) -> None:
    """Profile memory is named as NVIDIA does: eighths of the GPU rounded up, times its whole GiB, half rounding up."""
    assert memory_gb(mib, H200_MIB) == gb


def test_profile_names_with_compute_instance_and_variant() -> None:
    """A smaller compute instance is prefixed ``<c>c.``; a variant such as media extensions is appended."""
    assert profile_name(3, 71424, H200_MIB, compute_instance_slices=1) == "1c.3g.71gb"
    assert profile_name(1, 16384, H200_MIB, variant="+me") == "1g.18gb+me"


def test_table_from_nvml_profiles_of_an_h200() -> None:
    """NVML's GPU-instance profiles of an H200 give the default table plus the media-extension variant."""
    infos = [
        GpuInstanceProfile(p.id, p.sliceCount, p.memorySizeMB, p.instanceCount, "+me" if p.id == 7 else "")
        for p in H200_INSTANCE_PROFILES.values()
    ]
    table = table_from_infos(infos, H200_MIB)
    assert set(table.names) == {*H200_PROFILES.names, "1g.18gb+me"}
    for profile in H200_PROFILES.profiles:
        assert table.get(profile.name) == profile
    assert table.get("1g.18gb+me").max_count == 1


def test_table_from_no_profiles_is_an_error() -> None:
    """A GPU that reports no profiles (no MIG) has no table, and the error says so."""
    with pytest.raises(ProfileError, match="no GPU-instance profiles"):
        table_from_infos([], H200_MIB)


@pytest.mark.parametrize(
    ("layout", "starts"),
    [
        (["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"], [0, 2, 3, 4]),
        (["4g.71gb", "2g.35gb", "1g.18gb"], [0, 4, 6]),
        (["3g.71gb", "3g.71gb"], [0, 4]),
        (["1g.35gb"] * 4, [0, 2, 4, 6]),
        (["7g.141gb"], [0]),
    ],
)
def test_valid_layouts_are_placed(layout: list[str], starts: list[int]) -> None:
    """Layouts the hardware accepts are placed without overlap, in start order, the same way every time."""
    placements = place("0", names(*layout), H200_PROFILES)
    assert [p.start for p in placements] == starts
    covered = [s for p in placements for s in p.slices]
    assert len(covered) == len(set(covered))
    assert place("0", names(*reversed(layout)), H200_PROFILES) == placements


def test_layout_that_does_not_fit_names_gpu_and_profile() -> None:
    """A layout that does not fit fails naming the setting, the GPU, the profile left over and the free slices."""
    with pytest.raises(LayoutError) as caught:
        place("3", names("3g.71gb", "2g.35gb", "4g.71gb"), H200_PROFILES)
    message = str(caught.value)
    assert message.startswith("partitioned.layout.gpu 3: 2g.35gb does not fit after 4g.71gb, 3g.71gb")
    assert "free slices: none" in message


def test_too_many_of_one_profile_is_refused() -> None:
    """More partitions of a profile than a GPU holds fail naming the profile and its maximum."""
    with pytest.raises(LayoutError, match=r"gpu 1: 3 of 3g\.71gb, but a GPU holds at most 2"):
        place("1", names("3g.71gb", "3g.71gb", "3g.71gb"), H200_PROFILES, source="layouts.1")


def test_one_g_never_starts_at_slice_seven() -> None:
    """Eight 1g.18gb do not fit: a 1g partition may not start at the eighth memory slice."""
    with pytest.raises(LayoutError):
        place("0", names(*["1g.18gb"] * 7, "1g.18gb"), H200_PROFILES)
    with pytest.raises(LayoutError, match=r"1g\.18gb does not fit after 1g\.35gb, 1g\.35gb, 1g\.35gb, 1g\.35gb"):
        place("0", names(*["1g.35gb"] * 4, "1g.18gb"), H200_PROFILES)


@pytest.mark.parametrize(("profile", "count"), [("1g.18gb", 7), ("1g.35gb", 4), ("2g.35gb", 3), ("3g.71gb", 2)])
def test_fill_places_as_many_as_fit(profile: str, count: int) -> None:
    """``all-<profile>`` makes as many partitions as the GPU holds."""
    assert len(fill("0", H200_PROFILES.get(profile), H200_PROFILES)) == count


def test_settings_defaults() -> None:
    """Defaults: mock parent, mixed strategy, 7 of 1g.18gb everywhere, the H200 table, distributed allocation."""
    settings = PartitionedSettings.from_options({})
    assert settings.parent == "mock"
    assert settings.strategy is Strategy.MIXED
    assert settings.layout == Layout(fill="1g.18gb")
    assert settings.profiles is ProfileSource.H200
    assert settings.allocation_policy is AllocationPolicyKind.DISTRIBUTED


def test_settings_read_layouts_in_every_spelling() -> None:
    """Layouts read as all-<p>, {all: p}, lists, comma lists, {profile: count} and none; keys by index or UUID."""
    settings = PartitionedSettings.from_options(
        {
            "layout": {"all": "2g.35gb"},
            "layouts": {
                0: ["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"],
                "1": "all-1g.35gb",
                "gpu 2": "4g.71gb,3g.71gb",
                "3": {"1g.18gb": 2, "3g.71gb": 1},
                "GPU-abc": "none",
            },
            "allocation-policy": "packed",
            "strategy": "Single",
        }
    )
    assert settings.layout == Layout(fill="2g.35gb")
    assert settings.layouts == {
        0: Layout(("3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb")),
        1: Layout(fill="1g.35gb"),
        2: Layout(("4g.71gb", "3g.71gb")),
        3: Layout(("1g.18gb", "1g.18gb", "3g.71gb")),
        "GPU-abc": Layout(),
    }
    assert settings.layout_of(4, "GPU-abc") == (Layout(), "layouts.GPU-abc")
    assert settings.layout_of(1, "GPU-x") == (Layout(fill="1g.35gb"), "layouts.1")
    assert settings.layout_of(9, "GPU-x") == (Layout(fill="2g.35gb"), "layout")
    assert settings.allocation_policy is AllocationPolicyKind.PACKED
    assert settings.strategy is Strategy.SINGLE


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "all"}, "partitioned.strategy: must be one of none, single, mixed"),
        ({"layout": "all-5g.20gb"}, "partitioned.layout: unknown profile '5g.20gb'"),
        ({"layouts": {"2": ["3g.71gb", "9g.1gb"]}}, "partitioned.layouts.2: unknown profile '9g.1gb'"),
        ({"layouts": ["1g.18gb"]}, "partitioned.layouts: expected mapping, got ['1g.18gb']"),
        ({"layouts": {0: {"1g.18gb": -1}}}, "partitioned.layouts.0.1g.18gb: must be a count"),
        ({"profiles": "nvml"}, "partitioned.profiles: nvml reads each GPU's profiles through NVML"),
        ({"profiles": "a100"}, "partitioned.profiles: must be one of h200, nvml"),
        ({"parent": "partitioned"}, "partitioned.parent: the partitioned backend cannot slice itself"),
        ({"parent_options": ["x"]}, "partitioned.parent_options: expected mapping, got ['x']"),
        ({"allocation_policy": "random"}, "partitioned.allocation_policy: must be one of"),
        ({"layuot": "none"}, "partitioned.layuot: unknown setting"),
    ],
)
def test_settings_errors_name_the_field(options: dict[str, Any], message: str) -> None:
    """Every invalid setting fails with a message that starts with the field's name."""
    with pytest.raises(ConfigError) as caught:
        PartitionedSettings.from_options(options)
    assert str(caught.value).startswith(message)
