"""What the NVML backend discovers, and the container specs it precomputes, against the fake NVML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuplugin.backends.nvml import DeviceIdStrategy, NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.discovery import discover, read_numa_node, sysfs_bus_id
from gpuplugin.backends.nvml.fake import NVSWITCH, FakeGpu, FakeNvml, h200_node
from gpuplugin.core.backend import InventoryChanged
from gpuplugin.core.model import DeviceNode, DeviceTree, Health, Link, PCIeLevel
from gpuplugin.devices.health import HealthPolicy
from tests.fakes import next_event

A, B, C = "GPU-aaaaaaaa-0000-4000-8000-000000000000", "GPU-bbbbbbbb-0000-4000-8000-000000000001", "GPU-cccc"
BUS_A, BUS_B, BUS_C = "00000000:00:06.0", "00000000:00:07.0", "00000000:0A:00.0"


def initialized(fake: FakeNvml) -> FakeNvml:
    fake.nvmlInit()
    return fake


def tree_of(fake: FakeNvml, **settings: Any) -> DeviceTree:
    return discover(initialized(fake), NvmlSettings(**settings)).tree


def three_gpus() -> FakeNvml:
    """A and B share four active NVLinks (and two inactive); C has no NVLink at all."""
    return FakeNvml(
        [
            FakeGpu(A, 0, BUS_A, nvlinks=(BUS_B, BUS_B, None, BUS_B, None, BUS_B)),
            FakeGpu(B, 1, BUS_B, nvlinks=(BUS_A, BUS_A, BUS_A, BUS_A)),
            FakeGpu(C, 2, BUS_C, name="NVIDIA L4", memory_mib=22491, compute_capability=(8, 9), nvlinks=None),
        ],
        topology={
            frozenset((A, B)): FakeNvml.NVML_TOPOLOGY_SINGLE,
            frozenset((A, C)): FakeNvml.NVML_TOPOLOGY_SYSTEM,
            frozenset((B, C)): FakeNvml.NVML_TOPOLOGY_NODE,
        },
    )


def test_discovery_reads_every_field() -> None:
    """Each GPU is served by UUID under nvidia.com/gpu with its index, minor, bus id, model, memory and capability."""
    tree = tree_of(three_gpus())
    assert [d.id for d in tree.devices] == [A, B, C]
    assert all(d.gpu == d.id and d.resource == "nvidia.com/gpu" for d in tree.devices)
    assert all(d.health is Health.HEALTHY and d.instance is None for d in tree.devices)
    assert dict(tree.devices[2].attributes) == {
        "index": "2",
        "uuid": C,
        "minor": "2",
        "pci_bus_id": BUS_C,
        "model": "NVIDIA L4",
        "memory_mib": "22491",
        "compute_capability": "8.9",
        "driver_version": "580.159.04",
        "cuda_version": "13.0",
    }


def test_h200_node_as_seen_in_the_field() -> None:
    """Two H200s as the field reference read them: 143771 MiB, capability 9.0, NV18 and a shared host bridge."""
    fake = h200_node(2)
    tree = tree_of(fake)
    a, b = (gpu.uuid for gpu in fake.gpus)
    assert {d.attributes["memory_mib"] for d in tree.devices} == {"143771"}
    assert {d.attributes["compute_capability"] for d in tree.devices} == {"9.0"}
    assert tree.link(a, b) == Link(nvlinks=18, pcie=PCIeLevel.HOSTBRIDGE)


def test_links_count_active_nvlinks_and_map_pcie_levels() -> None:
    """Every pair gets a link: active NVLinks to the other GPU counted, and NVML's common ancestor as PCIe level."""
    tree = tree_of(three_gpus())
    assert len(tree.links) == 3
    assert tree.link(A, B) == Link(nvlinks=4, pcie=PCIeLevel.SINGLE)
    assert tree.link(A, C) == Link(nvlinks=0, pcie=PCIeLevel.SYSTEM)
    assert tree.link(B, C) == Link(nvlinks=0, pcie=PCIeLevel.NODE)


def test_gpus_on_nvswitches_are_linked() -> None:
    """GPUs whose links go to NVSwitches reach each other over as many links as the less connected one has."""
    fake = FakeNvml(
        [
            FakeGpu(A, 0, BUS_A, nvlinks=(NVSWITCH,) * 18),
            FakeGpu(B, 1, BUS_B, nvlinks=(NVSWITCH,) * 12 + (None,) * 6),
            FakeGpu(C, 2, BUS_C, nvlinks=None),
        ]
    )
    tree = tree_of(fake)
    assert tree.link(A, B).nvlinks == 12
    assert tree.link(A, C).nvlinks == 0


def test_sysfs_bus_id_is_lower_case_with_a_short_domain() -> None:
    """NVML's eight-digit domain becomes sysfs's four digits, in lower case."""
    assert sysfs_bus_id("00000000:0A:00.0") == "0000:0a:00.0"
    assert sysfs_bus_id("00000001:C1:00.0") == "0001:c1:00.0"


def test_numa_node_from_sysfs(tmp_path: Path) -> None:
    """The NUMA node comes from sysfs; -1 and a missing file both mean None."""
    devices = tmp_path / "bus" / "pci" / "devices"
    for name, value in (("0000:00:06.0", "1\n"), ("0000:00:07.0", "-1\n")):
        (devices / name).mkdir(parents=True)
        (devices / name / "numa_node").write_text(value)
    tree = tree_of(three_gpus(), sysfs_root=str(tmp_path))
    assert [d.numa_node for d in tree.devices] == [1, None, None]
    assert read_numa_node(str(tmp_path), BUS_A) == 1


def test_index_strategy_names_gpus_by_index() -> None:
    """With the index strategy, device IDs, physical IDs, links and NVIDIA_VISIBLE_DEVICES all use the index."""
    tree = tree_of(three_gpus(), device_id_strategy=DeviceIdStrategy.INDEX)
    assert [d.id for d in tree.devices] == ["0", "1", "2"]
    assert [d.gpu for d in tree.devices] == ["0", "1", "2"]
    assert tree.devices[1].spec.list_env == {"NVIDIA_VISIBLE_DEVICES": "1"}
    assert tree.link("0", "1").nvlinks == 4
    assert tree.devices[1].attributes["uuid"] == B


def test_spec_without_device_specs_sets_visible_devices_only() -> None:
    """By default a GPU's spec is NVIDIA_VISIBLE_DEVICES=<uuid> as a list variable, and nothing else."""
    spec = tree_of(three_gpus()).devices[0].spec
    assert spec.list_env == {"NVIDIA_VISIBLE_DEVICES": A}
    assert not spec.env
    assert spec.device_nodes == ()
    assert spec.mounts == ()


def test_spec_with_device_specs_lists_present_nodes_under_device_root(tmp_path: Path) -> None:
    """With pass_device_specs, a GPU gets /dev/nvidia<minor> and the control nodes present under device_root."""
    (tmp_path / "dev").mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1"):
        (tmp_path / "dev" / name).touch()
    tree = tree_of(three_gpus(), pass_device_specs=True, device_root=str(tmp_path), driver_root="/run/nvidia/driver")
    root = str(tmp_path)
    assert tree.devices[1].spec.device_nodes == (
        DeviceNode(f"{root}/dev/nvidia1", "/dev/nvidia1", "rw"),
        DeviceNode(f"{root}/dev/nvidiactl", "/dev/nvidiactl", "rw"),
        DeviceNode(f"{root}/dev/nvidia-uvm", "/dev/nvidia-uvm", "rw"),
    )


def test_spec_with_device_specs_at_host_root() -> None:
    """With device_root /, host and container paths of the GPU's node are the same /dev path."""
    tree = tree_of(three_gpus(), pass_device_specs=True, device_root="/")
    node = tree.devices[2].spec.device_nodes[0]
    assert node == DeviceNode("/dev/nvidia2", "/dev/nvidia2", "rw")


def test_lost_gpu_is_served_unhealthy_without_blocking_others() -> None:
    """A GPU lost before its UUID is read is served Unhealthy under its index; the others are served normally."""
    fake = three_gpus()
    fake.gpu(B).lost = True
    tree = tree_of(fake)
    assert [(d.id, d.health) for d in tree.devices] == [
        (A, Health.HEALTHY),
        ("1", Health.UNHEALTHY),
        (C, Health.HEALTHY),
    ]
    assert "lost" in tree.devices[1].attributes["error"]
    assert tree.link(A, C).pcie is PCIeLevel.SYSTEM
    assert frozenset((A, "1")) not in tree.links


def test_gpu_failing_after_its_uuid_keeps_its_uuid() -> None:
    """A GPU that fails after its UUID was read is served Unhealthy under that UUID, without device nodes."""
    fake = three_gpus()
    fake.gpu(C).errors["nvmlDeviceGetMinorNumber"] = FakeNvml.NVML_ERROR_GPU_IS_LOST
    tree = tree_of(fake, pass_device_specs=True)
    device = tree.devices[2]
    assert (device.id, device.health) == (C, Health.UNHEALTHY)
    assert device.spec.device_nodes == ()
    assert device.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": C}


def test_unsupported_queries_are_tolerated() -> None:
    """NotSupported for MIG mode, compute capability and memory leaves a healthy GPU without those attributes."""
    gpu = FakeGpu(A, 0, BUS_A, mig_mode=None)
    gpu.errors["nvmlDeviceGetCudaComputeCapability"] = FakeNvml.NVML_ERROR_NOT_SUPPORTED
    gpu.errors["nvmlDeviceGetMemoryInfo"] = FakeNvml.NVML_ERROR_NOT_SUPPORTED
    tree = tree_of(FakeNvml([gpu]))
    assert tree.devices[0].health is Health.HEALTHY
    assert "compute_capability" not in tree.devices[0].attributes
    assert "memory_mib" not in tree.devices[0].attributes


def test_every_device_carries_the_driver_and_cuda_versions_or_goes_without_them() -> None:
    """The node's driver and CUDA versions (NVML's 12080 read as 12.8) are on every GPU; versions NVML cannot give
    are left out, and the GPUs are served all the same."""
    fake = FakeNvml([FakeGpu(A, 0, BUS_A), FakeGpu(B, 1, BUS_B)], driver_version="570.86.15", cuda_driver_version=12080)
    tree = tree_of(fake)
    assert {(d.attributes["driver_version"], d.attributes["cuda_version"]) for d in tree.devices} == {
        ("570.86.15", "12.8")
    }
    fake.errors["nvmlSystemGetDriverVersion"] = FakeNvml.NVML_ERROR_UNKNOWN
    fake.errors["nvmlSystemGetCudaDriverVersion"] = FakeNvml.NVML_ERROR_NOT_SUPPORTED
    tree = tree_of(fake)
    assert [d.health for d in tree.devices] == [Health.HEALTHY, Health.HEALTHY]
    assert not {"driver_version", "cuda_version"} & {key for d in tree.devices for key in d.attributes}


def test_mig_enabled_gpu_is_skipped_with_a_log_line() -> None:
    """A GPU with MIG enabled is not served whole, and the log says so."""
    fake = three_gpus()
    fake.gpu(A).mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
    with capture_logs() as logs:
        tree = tree_of(fake)
    assert [d.id for d in tree.devices] == [B, C]
    assert any(entry["event"] == "mig enabled; gpu skipped" and entry["uuid"] == A for entry in logs)


async def test_gpu_failing_discovery_is_rediscovered() -> None:
    """A GPU that failed discovery is retried with backoff, and served again once it answers."""
    fake = three_gpus()
    fake.gpu(B).lost = True
    settings = NvmlSettings(event_wait_timeout_ms=50, retry_backoff_initial_s=0.01, rediscover_backoff_max_s=0.05)
    backend = NvmlBackend(settings, HealthPolicy(), fake)
    await backend.start()
    try:
        assert (await backend.discover()).devices[1].health is Health.UNHEALTHY
        fake.lose(B, lost=False)
        event = await next_event(backend)
        assert isinstance(event, InventoryChanged)
        assert [(d.id, d.health) for d in event.tree.devices] == [
            (A, Health.HEALTHY),
            (B, Health.HEALTHY),
            (C, Health.HEALTHY),
        ]
    finally:
        await backend.aclose()


@pytest.mark.parametrize("strategy", list(DeviceIdStrategy))
async def test_discover_returns_the_tree_of_start(strategy: DeviceIdStrategy) -> None:
    """``discover`` serves the tree read at start, without asking NVML again."""
    fake = three_gpus()
    backend = NvmlBackend(NvmlSettings(device_id_strategy=strategy, event_wait_timeout_ms=50), HealthPolicy(), fake)
    await backend.start()
    try:
        calls = fake.calls["nvmlDeviceGetCount"]
        tree = await backend.discover()
        assert len(tree.devices) == 3
        assert fake.calls["nvmlDeviceGetCount"] == calls
    finally:
        await backend.aclose()
