"""Real MIG devices in the node's ResourceSlices: the NVML backend over the fake NVML reads each GPU instance's
placement, so with counters (gate DRAPartitionableDevices) a MIG-enabled GPU gets its counter set as a partitioned
GPU does, its MIG devices consuming the memory slices NVML places them on."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, reject, settings
from hypothesis import strategies as st

from gpuplugin.backends.nvml import NvmlSettings
from gpuplugin.backends.nvml.discovery import discover
from gpuplugin.backends.nvml.fake import FakeMigDevice, FakeNvml, h200_node, write_mig_capabilities
from gpuplugin.backends.partitioned import H200_PROFILES, LayoutError, Placement, place
from gpuplugin.core.model import DeviceTree
from gpuplugin.dra.slices import build_slices, with_whole_gpus
from tests.test_deploy import validate
from tests.test_dra_slices_shapes import COUNTERS, PROFILES, SETTINGS, consumed, partitioned

#: GPU 1: 4g.71gb at memory slice 0, 3g.71gb at 4. GPU 2: two 2g.35gb at 0 and 2, three 1g.18gb at 4, 5 and 6.
LAYOUTS = (
    ("4g.71gb", "3g.71gb"),
    ("2g.35gb", "2g.35gb", "1g.18gb", "1g.18gb", "1g.18gb"),
)


def mig_uuid(gpu: int, slot: int) -> str:
    return f"MIG-aaaaaaaa-1111-5111-8111-{gpu:06d}{slot:06d}"


def mig_devices(gpu: int, placements: tuple[Placement, ...]) -> list[FakeMigDevice]:
    """MIG devices as NVML reports them for ``placements``: GPU instances numbered from 1, one compute instance
    spanning each."""
    return [
        FakeMigDevice(
            mig_uuid(gpu, slot),
            slot + 1,
            0,
            p.profile.compute_slices,
            p.profile.memory_mib,
            placement=(p.start, p.profile.memory_slices),
        )
        for slot, p in enumerate(placements)
    ]


def mig_node(driver_root: Path, layouts: tuple[tuple[str, ...], ...] = LAYOUTS) -> FakeNvml:
    """An H200 node with MIG off on GPU 0 and on, in ``layouts``, on the others."""
    fake = h200_node(1 + len(layouts))
    for number, layout in enumerate(layouts, start=1):
        gpu = fake.gpus[number]
        gpu.mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
        placements = place(str(number), [H200_PROFILES.get(name) for name in layout], H200_PROFILES)
        gpu.mig_devices = mig_devices(number, placements)
        write_mig_capabilities(driver_root, gpu)
    fake.nvmlInit()
    return fake


def discovered(fake: FakeNvml, driver_root: Path) -> DeviceTree:
    """The NVML backend's tree, with the whole GPUs the DRA driver adds."""
    return with_whole_gpus(discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(driver_root))).tree)


def mig_tree(driver_root: Path, layouts: tuple[tuple[str, ...], ...] = LAYOUTS) -> tuple[FakeNvml, DeviceTree]:
    fake = mig_node(driver_root, layouts)
    return fake, discovered(fake, driver_root)


def covered(fake: FakeNvml, uuid: str) -> set[int]:
    """The memory slices NVML places a MIG device's GPU instance on; all the GPU's placed ones for a GPU."""
    for gpu in fake.gpus:
        placed = {m.uuid: m.placement for m in gpu.mig_devices if m.placement is not None}
        if uuid == gpu.uuid:
            return {s for start, size in placed.values() for s in range(start, start + size)}
        if uuid in placed:
            start, size = placed[uuid]
            return set(range(start, start + size))
    raise AssertionError(f"{uuid} not on the node")


def test_each_mig_enabled_gpu_gets_a_counter_set_its_mig_devices_consume(tmp_path: Path) -> None:
    """With counters: GPU 0 (MIG off) stays in the first slice without counters; each MIG-enabled GPU gets a slice
    of its own with one counter set, each MIG device consuming its memory, compute slices and exactly the memory
    slices NVML places it on; no whole GPU is published for a GPU in MIG mode (CUDA cannot use it)."""
    fake, tree = mig_tree(tmp_path)
    slices = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    for slice_ in slices:
        validate(slice_)
    flat, *shared = slices
    assert "sharedCounters" not in flat["spec"]
    assert [d["attributes"]["uuid"] for d in flat["spec"]["devices"]] == [{"string": fake.gpus[0].uuid}]
    assert len(shared) == 2
    for slice_, gpu in zip(shared, fake.gpus[1:], strict=True):
        (counter_set,) = slice_["spec"]["sharedCounters"]
        devices = {d["attributes"]["uuid"]["string"]: d for d in slice_["spec"]["devices"]}
        assert set(devices) == {m.uuid for m in gpu.mig_devices}
        for mig in gpu.mig_devices:
            (consumption,) = devices[mig.uuid]["consumesCounters"]
            assert consumption["counterSet"] == counter_set["name"]
            assert consumption["counters"]["memory"] == {"value": f"{mig.memory_mib}Mi"}
            assert consumption["counters"]["compute-slices"] == {"value": str(mig.gpu_instance_slices)}
            assert consumed(devices[mig.uuid]) == {f"memory-slice-{s}" for s in covered(fake, mig.uuid)}


def test_without_counters_mig_devices_stay_flat_and_no_whole_gpu_is_published(tmp_path: Path) -> None:
    """Counters off: MIG devices are devices of their own in one slice, as before their placement was read, and
    their whole GPUs are left out."""
    fake, tree = mig_tree(tmp_path)
    (slice_,) = build_slices(tree, SETTINGS, 1)
    uuids = [d["attributes"]["uuid"]["string"] for d in slice_["spec"]["devices"]]
    assert uuids == [fake.gpus[0].uuid, *(m.uuid for gpu in fake.gpus[1:] for m in gpu.mig_devices)]
    assert not any("consumesCounters" in d for d in slice_["spec"]["devices"])


def test_a_gpu_whose_placement_is_unreadable_is_published_flat(tmp_path: Path) -> None:
    """An NVML error on one GPU's placement reads: that GPU's MIG devices are published flat, without its whole
    GPU; the other MIG-enabled GPU keeps its counter set."""
    fake = mig_node(tmp_path)
    fake.gpus[1].errors["nvmlGpuInstanceGetInfo"] = FakeNvml.NVML_ERROR_UNKNOWN
    tree = discovered(fake, tmp_path)
    flat, shared = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    flat_uuids = [d["attributes"]["uuid"]["string"] for d in flat["spec"]["devices"]]
    assert flat_uuids == [fake.gpus[0].uuid, *(m.uuid for m in fake.gpus[1].mig_devices)]
    (counter_set,) = shared["spec"]["sharedCounters"]
    consumers = {d["attributes"]["uuid"]["string"]: d["consumesCounters"] for d in shared["spec"]["devices"]}
    assert consumers.keys() == {m.uuid for m in fake.gpus[2].mig_devices}
    assert all(c[0]["counterSet"] == counter_set["name"] for c in consumers.values())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(PROFILES), min_size=1, max_size=7))
def test_real_mig_devices_get_the_counters_simulated_partitions_get(layout: list[str]) -> None:
    """Any layout a GPU takes, with MIG devices where the hardware places it: their counter set and what each
    consumes are those of the partitioned backend's simulated partitions of that layout (less the whole GPU, which
    only simulated partitions publish), and two MIG devices share a memory-slice counter exactly when they cover a
    common memory slice."""
    try:
        simulated = partitioned(layout, gpus=1)
    except LayoutError:
        reject()
    with tempfile.TemporaryDirectory() as root:
        fake, tree = mig_tree(Path(root), (tuple(layout),))
    _, real_slice = build_slices(tree, SETTINGS, 1, shape=COUNTERS)
    (simulated_slice,) = build_slices(simulated, SETTINGS, 1, shape=COUNTERS)
    validate(real_slice)

    def shares(slice_: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        devices = slice_["spec"]["devices"]
        counters = sorted((d["consumesCounters"][0]["counters"] for d in devices), key=str)
        return [s["counters"] for s in slice_["spec"]["sharedCounters"]], counters

    real_sets, real_counters = shares(real_slice)
    simulated_sets, simulated_counters = shares(simulated_slice)
    assert real_sets == simulated_sets
    # The simulated whole GPU consumes the whole set; the real MIG parent is not published.
    simulated_counters.remove(simulated_sets[0])
    assert real_counters == simulated_counters
    devices = real_slice["spec"]["devices"]
    for a in devices:
        for b in devices:
            if a is not b:
                ua, ub = a["attributes"]["uuid"]["string"], b["attributes"]["uuid"]["string"]
                overlap = bool(covered(fake, ua) & covered(fake, ub))
                assert bool(consumed(a) & consumed(b)) == overlap
