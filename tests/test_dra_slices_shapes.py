"""The gated shapes of the node's ResourceSlices: partitions sharing their GPU's counters beside the whole GPU, and
unhealthy devices kept with a taint; the settings that choose them, and how the publisher settles ``auto`` with
the API server (the fake drops the fields of a gate that is off, as Kubernetes does)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, reject
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.backends.partitioned import H200_PROFILES, LayoutError, PartitionedSettings, slice_tree
from gpuplugin.cli import main
from gpuplugin.core.model import DeviceTree, Health
from gpuplugin.devices.strategies import VISIBLE_DEVICES
from gpuplugin.dra.apiserver import SlicePublisher, api_client
from gpuplugin.dra.driver import DriverSettings, GateMode, TaintEffect
from gpuplugin.dra.names import device_names
from gpuplugin.dra.slices import (
    MAX_DEVICES_PER_TAINTED_SLICE,
    Reasons,
    SliceShape,
    build_slices,
    taint_value,
    whole_gpus,
    with_whole_gpus,
)
from tests.fake_apiserver import fake_apiserver
from tests.test_deploy import validate

SETTINGS = DriverSettings(node_name="node-a")
COUNTERS = SliceShape(counters=True)
TAINTS = SliceShape(taints=True)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PROFILES = [profile.name for profile in H200_PROFILES.profiles]


def mock_tree(gpus: int = 2, unhealthy: tuple[int, ...] = ()) -> DeviceTree:
    return Inventory.build(MockSettings(gpus=gpus, nvlink_groups=(), pcie_switches=())).tree(range(gpus), unhealthy)


def sliced(layout: str | list[str], gpus: int = 2) -> DeviceTree:
    """The partitioned backend's tree over mock GPUs."""
    settings = PartitionedSettings.from_options({"layout": layout})
    return slice_tree(mock_tree(gpus), settings, lambda _: H200_PROFILES)


def partitioned(layout: str | list[str], gpus: int = 2) -> DeviceTree:
    """The partitioned backend's tree, with the whole GPUs the DRA driver adds."""
    return with_whole_gpus(sliced(layout, gpus))


def consumed(device: dict[str, Any]) -> set[str]:
    """The memory-slice counters ``device`` takes."""
    (consumption,) = device["consumesCounters"]
    return {name for name in consumption["counters"] if name.startswith("memory-slice-")}


def test_a_partitioned_gpu_with_counters_is_a_slice_of_its_own_with_its_whole_gpu() -> None:
    """Counters: each GPU's slice holds its seven partitions and the whole GPU, all consuming from the one counter
    set named after the GPU; the set holds what the partitions add up to and the whole GPU takes all of it."""
    tree = partitioned("all-1g.18gb")
    slices = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    assert len(slices) == 2
    for slice_ in slices:
        validate(slice_)
        (counter_set,) = slice_["spec"]["sharedCounters"]
        devices = slice_["spec"]["devices"]
        assert len(devices) == 8
        assert {d["consumesCounters"][0]["counterSet"] for d in devices} == {counter_set["name"]}
        assert counter_set["counters"]["memory"] == {"value": f"{7 * 16384}Mi"}
        assert counter_set["counters"]["compute-slices"] == {"value": "7"}
        (whole,) = [d for d in devices if d["attributes"]["type"] == {"string": "gpu"}]
        assert whole["name"] == counter_set["name"]
        assert whole["consumesCounters"][0]["counters"] == counter_set["counters"]
        parts = [d for d in devices if d is not whole]
        assert all(p["consumesCounters"][0]["counters"]["memory"] == {"value": "16384Mi"} for p in parts)
        assert set().union(*(consumed(p) for p in parts)) == consumed(whole)
        assert sum(len(consumed(p)) for p in parts) == len(consumed(whole))


def test_without_counters_partitions_are_flat_and_their_whole_gpu_is_left_out() -> None:
    """No counters: the partitions alone, as devices of their own in one slice, none consuming counters, and no
    whole GPU beside them (nothing would keep the two apart)."""
    tree = partitioned("all-1g.18gb")
    (slice_,) = build_slices(tree, SETTINGS, 1)
    validate(slice_)
    assert "sharedCounters" not in slice_["spec"]
    devices = slice_["spec"]["devices"]
    assert len(devices) == 14
    assert all(d["attributes"]["type"] == {"string": "partition"} and "consumesCounters" not in d for d in devices)


def test_the_whole_gpu_is_prepared_as_the_gpu_without_mig_capabilities() -> None:
    """The added whole GPU names the parent's UUID for the runtime, keeps the GPU's device node and drops the MIG
    capability nodes, and carries the parent's model and index."""
    (whole,) = whole_gpus(sliced("all-1g.18gb", gpus=1))
    parent = mock_tree(1).devices[0]
    assert (whole.id, whole.gpu, whole.resource) == (parent.id, parent.id, "nvidia.com/gpu")
    assert whole.spec.list_env[VISIBLE_DEVICES] == parent.id
    assert [n.container_path for n in whole.spec.device_nodes] == ["/dev/nvidia0"]
    assert whole.attributes["model"] == "NVIDIA H200" and whole.attributes["index"] == "0"
    assert whole.health is Health.HEALTHY


def test_gpus_served_whole_or_as_mps_shares_get_no_counters() -> None:
    """A GPU served whole (no layout) and MPS shares have no placement: no counter set, no added whole GPU."""
    tree = mock_tree(2)
    assert whole_gpus(tree) == ()
    (slice_,) = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    assert "sharedCounters" not in slice_["spec"]
    mps = slice_tree(
        tree,
        PartitionedSettings.from_options({"layout": "all-1g.18gb", "isolation": "mps"}),
        lambda _: H200_PROFILES,
    )
    assert whole_gpus(mps) == ()


@given(st.lists(st.sampled_from(PROFILES), min_size=1, max_size=7))
def test_two_devices_share_a_memory_slice_counter_exactly_when_they_overlap(layout: list[str]) -> None:
    """Any layout a GPU takes: two of its devices (partitions or the whole GPU) consume a common memory-slice
    counter exactly when they cover a common memory slice, so the scheduler never allocates both."""
    try:
        tree = partitioned(layout, gpus=1)
    except LayoutError:
        reject()
    (slice_,) = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    validate(slice_)
    by_name = device_names(tree)
    devices = slice_["spec"]["devices"]
    assert len(devices) == len(layout) + 1

    def covered(name: str) -> set[int]:
        device = by_name[name]
        if device.instance is None:
            return set(range(H200_PROFILES.memory_slices))
        start, count = int(device.attributes["start_slice"]), int(device.attributes["memory_slices"])
        return set(range(start, start + count))

    for a in devices:
        for b in devices:
            if a is not b:
                overlap = bool(covered(a["name"]) & covered(b["name"]))
                assert bool(consumed(a) & consumed(b)) == overlap


def test_with_taints_an_unhealthy_device_stays_tainted_with_its_reason() -> None:
    """Taints: the unhealthy GPU stays, tainted with the driver's key, the fault's reason as a label value and the
    effect set; the healthy one carries none. Without taints it leaves the slice."""
    tree = mock_tree(2, unhealthy=(0,))
    first, second = (d.id for d in tree.devices)
    reasons: Reasons = {(first, None): "XID 79: GPU has fallen off the bus"}
    shape = SliceShape(taints=True, taint_effect=TaintEffect.NO_EXECUTE)
    (slice_,) = build_slices(tree, SETTINGS, 1, shape=shape, reasons=reasons)
    validate(slice_)
    hit, other = slice_["spec"]["devices"]
    assert hit["taints"] == [
        {"key": "gpu.gpuplugin.dev/unhealthy", "value": "XID-79-GPU-has-fallen-off-the-bus", "effect": "NoExecute"}
    ]
    assert "taints" not in other
    (flat,) = build_slices(tree, SETTINGS, 1, reasons=reasons)
    assert [d["name"] for d in flat["spec"]["devices"]] == [second.lower()]


def test_a_faulty_partition_taints_itself_and_its_whole_gpu_only() -> None:
    """Counters and taints: a fault on one partition taints that partition and its whole GPU (which covers it),
    with the partition's reason; its siblings and the other GPU stay untainted."""
    raw = sliced("all-1g.18gb")
    hit = next(d for d in raw.devices if d.instance == (3, 0))
    tree = with_whole_gpus(
        replace(raw, devices=tuple(replace(d, health=Health.UNHEALTHY) if d == hit else d for d in raw.devices))
    )
    reasons: Reasons = {(hit.gpu, (3, 0)): "XID 94: contained ECC error"}
    slices = build_slices(tree, SETTINGS, 1, shape=SliceShape(counters=True, taints=True), reasons=reasons)
    tainted = {d["name"]: d["taints"][0]["value"] for s in slices for d in s["spec"]["devices"] if "taints" in d}
    names = {device.id: name for name, device in device_names(tree).items()}
    assert tainted == {names[hit.id]: "XID-94-contained-ECC-error", names[hit.gpu]: "XID-94-contained-ECC-error"}


def test_with_taints_slices_hold_at_most_64_devices() -> None:
    """The API server allows 64 devices in a slice where one carries a taint: with taints, slices split at 64."""
    slices = build_slices(mock_tree(MAX_DEVICES_PER_TAINTED_SLICE * 2 + 1), SETTINGS, 1, shape=TAINTS)
    assert [len(s["spec"]["devices"]) for s in slices] == [64, 64, 1]


@given(st.text(max_size=200))
def test_any_reason_becomes_a_label_value(reason: str) -> None:
    """Whatever a fault's reason says, the taint's value is a label value of at most 63 characters."""
    value = taint_value(reason)
    assert value and len(value) <= 63 and LABEL_VALUE.match(value)


@given(st.text(max_size=20), st.sampled_from(["partitionable_devices", "device_taints", "taint_effect"]))
def test_any_setting_text_is_a_choice_or_one_line_naming_the_field(text: str, setting: str) -> None:
    """The gated-shape settings take their choices as text; anything else is refused in one line naming the
    field and the choices."""
    try:
        given_setting: dict[str, Any] = {setting: text}
        settings = DriverSettings(node_name="node-a", **given_setting)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message
        field = {"partitionable_devices": "partitionableDevices", "device_taints": "deviceTaints"}.get(setting)
        assert message.startswith(f"dra.{field or 'taintEffect'}: must be one of ")
    else:
        assert str(getattr(settings, setting)) == text


def test_a_bad_flag_value_is_refused_by_the_command_line() -> None:
    """``serve --dra-device-taints maybe`` exits 2 naming the flag and the choices, without a traceback."""
    result = CliRunner().invoke(main, ["serve", "--kubelet-api", "dra", "--node-name", "n", "--dra-device-taints", "x"])
    assert result.exit_code == 2
    assert "--dra-device-taints" in result.output and "'auto', 'on', 'off'" in result.output


@pytest.mark.parametrize(
    ("gates", "counters", "taints", "shape"),
    [
        (frozenset(), GateMode.AUTO, GateMode.AUTO, SliceShape()),
        (
            frozenset({"DRAPartitionableDevices", "DRADeviceTaints"}),
            GateMode.AUTO,
            GateMode.AUTO,
            SliceShape(True, True),
        ),
        (frozenset({"DRADeviceTaints"}), GateMode.AUTO, GateMode.AUTO, SliceShape(taints=True)),
        (frozenset({"DRAPartitionableDevices", "DRADeviceTaints"}), GateMode.OFF, GateMode.OFF, SliceShape()),
        (frozenset(), GateMode.ON, GateMode.ON, SliceShape(True, True)),
    ],
)
async def test_auto_takes_the_shapes_the_api_server_keeps(
    gates: frozenset[str], counters: GateMode, taints: GateMode, shape: SliceShape, tmp_path: Path
) -> None:
    """``auto`` asks the API server once with a dry run that stores nothing, and publishes the shapes it keeps,
    saying in one line each which it falls back from; ``on`` and ``off`` publish as told without asking."""
    settings = DriverSettings(node_name="node-a", partitionable_devices=counters, device_taints=taints)
    async with fake_apiserver() as api:
        api.gates = gates
        api.add_node("node-a", "uid-a")
        client = api_client(api.url)
        publisher = SlicePublisher(settings, client)
        try:
            with capture_logs() as logs:
                await publisher.publish(partitioned("all-1g.18gb"))
        finally:
            await publisher.aclose()
            await client.close()
    assert publisher.shape == shape
    assert publisher.problem is None
    assert len(api.slices) == (2 if shape.counters else 1)
    fallbacks = [e["event"] for e in logs if "drops" in e["event"]]
    expected = [g for g in ("DRAPartitionableDevices", "DRADeviceTaints") if g not in gates]
    assert len(fallbacks) == (len(expected) if GateMode.AUTO in (counters, taints) else 0)
    assert all(any(g in line for line in fallbacks) for g in expected if counters is GateMode.AUTO)
