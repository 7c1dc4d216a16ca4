"""The NVML backend's MIG reporting against the fake NVML: MIG devices, GPU-instance profiles, capability nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gpuplugin.backends.nvml import DeviceIdStrategy, GpuInstanceProfile, NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.discovery import discover
from gpuplugin.backends.nvml.fake import FakeMigDevice, FakeNvml, h200_node, mig_cap_minors, write_mig_capabilities
from gpuplugin.backends.nvml.mig import read_cap_minor
from gpuplugin.core.backend import HealthChanged
from gpuplugin.core.model import DeviceNode, DeviceTree, Health
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.slices import Placed, placement
from tests.fakes import next_event, until

MIG_A = "MIG-aaaaaaaa-1111-5111-8111-000000000001"
MIG_B = "MIG-aaaaaaaa-1111-5111-8111-000000000002"


def mig_node(driver_root: Path) -> FakeNvml:
    """Two H200s; GPU 1 has MIG on with a 4g.71gb (GI 2, memory slices 0-3) and a 3g.71gb (GI 1, slices 4-7)
    holding one compute instance of one slice."""
    fake = h200_node(2)
    gpu = fake.gpus[1]
    gpu.mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
    gpu.mig_devices = [
        FakeMigDevice(MIG_A, 2, 0, 4, 71424, placement=(0, 4)),
        FakeMigDevice(MIG_B, 1, 0, 3, 71424, 1, placement=(4, 4)),
    ]
    write_mig_capabilities(driver_root, gpu)
    fake.nvmlInit()
    return fake


def test_mig_devices_reported_with_instances_attributes_and_caps(tmp_path: Path) -> None:
    """With report_mig_devices a MIG-enabled GPU is served as its MIG devices: UUID, instance, attributes, nodes."""
    fake = mig_node(tmp_path)
    tree = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path))).tree
    parent = fake.gpus[1]
    migs = [d for d in tree.devices if d.instance is not None]
    assert [(d.id, d.gpu, d.instance, d.resource) for d in migs] == [
        (MIG_A, parent.uuid, (2, 0), "nvidia.com/gpu"),
        (MIG_B, parent.uuid, (1, 0), "nvidia.com/gpu"),
    ]
    attributes = migs[1].attributes
    assert (attributes["gpu_instance_slices"], attributes["compute_instance_slices"]) == ("3", "1")
    assert (attributes["memory_mib"], attributes["parent_memory_mib"], attributes["parent_index"]) == (
        "71424",
        "143771",
        "1",
    )
    gi, ci = mig_cap_minors(1, 2, 0)
    assert migs[0].spec.device_nodes == (
        DeviceNode("/dev/nvidia1", "/dev/nvidia1"),
        DeviceNode(f"/dev/nvidia-caps/nvidia-cap{gi}", f"/dev/nvidia-caps/nvidia-cap{gi}"),
        DeviceNode(f"/dev/nvidia-caps/nvidia-cap{ci}", f"/dev/nvidia-caps/nvidia-cap{ci}"),
    )
    assert migs[0].spec.list_env == {"NVIDIA_VISIBLE_DEVICES": MIG_A}
    assert tree.link(fake.gpus[0].uuid, parent.uuid).nvlinks == 18


def placements(tree: DeviceTree) -> dict[str, tuple[str | None, ...]]:
    """Each MIG device's placement attributes, None where one is left out."""
    keys = ("start_slice", "memory_slices", "compute_slices", "memory_mib")
    return {d.id: tuple(d.attributes.get(k) for k in keys) for d in tree.devices if d.instance is not None}


def test_mig_devices_carry_their_gpu_instance_placement(tmp_path: Path) -> None:
    """Each MIG device carries its GPU instance's first memory slice and size as NVML places it, its compute
    instance's compute slices (narrower than its GPU instance for MIG_B) and memory: what DRA's counters read."""
    fake = mig_node(tmp_path)
    inventory = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path)))
    assert placements(inventory.tree) == {MIG_A: ("0", "4", "4", "71424"), MIG_B: ("4", "4", "1", "71424")}
    assert [placement(d) for d in inventory.tree.devices if d.instance is not None] == [
        Placed(start=0, memory_slices=4, compute_slices=4, memory_mib=71424),
        Placed(start=4, memory_slices=4, compute_slices=1, memory_mib=71424),
    ]
    assert not inventory.incomplete


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("nvmlDeviceGetGpuInstanceById", FakeNvml.NVML_ERROR_NOT_FOUND),
        ("nvmlGpuInstanceGetInfo", FakeNvml.NVML_ERROR_UNKNOWN),
        ("nvmlGpuInstanceGetInfo", FakeNvml.NVML_ERROR_NOT_SUPPORTED),
    ],
)
def test_unreadable_placement_leaves_the_gpus_mig_devices_flat(tmp_path: Path, call: str, code: int) -> None:
    """An NVML error reading a GPU instance's placement leaves that GPU's MIG devices without placement (published
    flat), served Healthy, discovery complete; one debug line says why."""
    fake = mig_node(tmp_path)
    fake.gpus[1].errors[call] = code
    with capture_logs() as logs:
        inventory = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path)))
    assert placements(inventory.tree) == {MIG_A: (None, None, None, "71424"), MIG_B: (None, None, None, "71424")}
    assert all(d.health is Health.HEALTHY for d in inventory.tree.devices)
    assert not inventory.incomplete
    (line,) = [e for e in logs if "placement" in e["event"]]
    assert line["log_level"] == "debug" and line["uuid"] == MIG_A


def test_a_gpu_instance_split_into_compute_instances_leaves_the_gpu_flat(tmp_path: Path) -> None:
    """Two MIG devices of one GPU instance (two compute instances) share its memory slices, which counters would
    give to one only: the GPU's MIG devices carry no placement, and no placement is asked for."""
    fake = mig_node(tmp_path)
    gpu = fake.gpus[1]
    gpu.mig_devices = [
        FakeMigDevice(MIG_A, 1, 0, 3, 71424, 1, placement=(4, 4)),
        FakeMigDevice(MIG_B, 1, 1, 3, 71424, 2, placement=(4, 4)),
    ]
    write_mig_capabilities(tmp_path, gpu)
    inventory = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path)))
    assert placements(inventory.tree) == {MIG_A: (None, None, None, "71424"), MIG_B: (None, None, None, "71424")}
    assert fake.calls["nvmlDeviceGetGpuInstanceById"] == 0


def test_mig_devices_under_index_strategy(tmp_path: Path) -> None:
    """Under the index strategy MIG devices are named ``<gpu index>:<mig slot>`` as NVIDIA's plugin names them."""
    fake = mig_node(tmp_path)
    settings = NvmlSettings(
        report_mig_devices=True, driver_root=str(tmp_path), device_id_strategy=DeviceIdStrategy.INDEX
    )
    tree = discover(fake, settings).tree
    assert [(d.id, d.gpu) for d in tree.devices] == [("0", "0"), ("1:0", "1"), ("1:1", "1")]


def test_mig_enabled_gpu_still_skipped_by_default(tmp_path: Path) -> None:
    """Without report_mig_devices nothing changes: the MIG-enabled GPU is skipped and no profile is read."""
    fake = mig_node(tmp_path)
    inventory = discover(fake, NvmlSettings(driver_root=str(tmp_path)))
    assert [d.id for d in inventory.tree.devices] == [fake.gpus[0].uuid]
    assert fake.calls["nvmlDeviceGetGpuInstanceProfileInfo"] == 0
    assert inventory.instance_profiles == {}


def test_profiles_read_with_mig_disabled_and_not_supported_tolerated(tmp_path: Path) -> None:
    """GPU-instance profiles are read whatever the MIG mode; a GPU without MIG has none and is still served."""
    fake = mig_node(tmp_path)
    fake.gpus[0].mig_mode = None
    inventory = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path)))
    assert fake.gpus[0].uuid not in inventory.instance_profiles
    profiles = inventory.instance_profiles[fake.gpus[1].uuid]
    assert GpuInstanceProfile(0, 1, 16384, 7) in profiles
    assert GpuInstanceProfile(7, 1, 16384, 1, "+me") in profiles
    assert {(p.slice_count, p.memory_mib, p.instance_count) for p in profiles if not p.variant} == {
        (1, 16384, 7),
        (1, 33280, 4),
        (2, 33280, 3),
        (3, 71424, 2),
        (4, 71424, 1),
        (7, 143360, 1),
    }
    assert inventory.tree.devices[0].health is Health.HEALTHY


def test_unreadable_mig_devices_leave_the_gpu_out_and_retry(tmp_path: Path) -> None:
    """When a MIG-enabled GPU's MIG devices cannot be listed, none are served and rediscovery is wanted."""
    fake = mig_node(tmp_path)
    fake.gpus[1].errors["nvmlDeviceGetMaxMigDeviceCount"] = FakeNvml.NVML_ERROR_UNKNOWN
    inventory = discover(fake, NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path)))
    assert [d.id for d in inventory.tree.devices] == [fake.gpus[0].uuid]
    assert inventory.incomplete


def test_capability_file_parsing(tmp_path: Path) -> None:
    """The minor is read from the DeviceFileMinor line; a file without one is an error."""
    good = tmp_path / "access"
    good.write_text("DeviceFileMinor: 21\nDeviceFileMode: 292\n")
    assert read_cap_minor(good) == 21
    bad = tmp_path / "bad"
    bad.write_text("DeviceFileMode: 292\n")
    with pytest.raises(ValueError, match="no DeviceFileMinor"):
        read_cap_minor(bad)


async def test_xid_on_a_mig_instance_passes_through(tmp_path: Path) -> None:
    """With report_mig_devices the MIG parent is watched for XIDs, and one naming an instance keeps it."""
    fake = mig_node(tmp_path)
    fake.nvmlShutdown()
    settings = NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path), event_wait_timeout_ms=50)
    backend = NvmlBackend(settings, HealthPolicy(), fake)
    await backend.start()
    try:
        parent = fake.gpus[1].uuid
        # XID events reach only GPUs registered on the health thread's set, as with NVML.
        await until(lambda: fake.registered(parent) & FakeNvml.nvmlEventTypeXidCriticalError)
        assert fake.emit_xid(parent, 79, (2, 0)) == 1
        event = await next_event(backend)
        assert event == HealthChanged(parent, Health.UNHEALTHY, "XID 79", 79, (2, 0))
        assert backend.gpu_instance_profiles()[parent]
    finally:
        await backend.aclose()
