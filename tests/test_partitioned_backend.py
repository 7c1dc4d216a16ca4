"""The partitioned backend over the mock and the fake NVML: trees, names, IDs, strategies and the real-MIG path."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.backends.mock import MockBackend
from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.fake import FakeMigDevice, FakeNvml, h200_node, write_mig_capabilities
from gpuplugin.backends.partitioned import (
    LayoutError,
    PartitionedBackend,
    PartitionedSettings,
    StrategyError,
    create,
    parent_context,
    partition_id,
)
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import HealthChanged, InventoryChanged, PreferredAllocation
from gpuplugin.core.model import AllocationPolicyKind, DeviceNode, Health
from gpuplugin.devices.health import HealthPolicy

MIG_ID = re.compile(r"^MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def context(workdir: Path, options: Mapping[str, Any]) -> BackendContext:
    parent_options = {"gpus": 2, **options.get("parent_options", {})}
    return BackendContext(
        options={**options, "parent_options": parent_options},
        health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
        state_dir=workdir,
    )


@asynccontextmanager
async def partitioned(workdir: Path, **options: Any) -> AsyncIterator[PartitionedBackend]:
    backend = create(context(workdir, options))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_all_one_profile_makes_seven_partitions_per_gpu(workdir: Path) -> None:
    """``all-1g.18gb`` slices each mock GPU into 7 partitions served as nvidia.com/mig-1g.18gb."""
    async with partitioned(workdir) as backend:
        tree = await backend.discover()
        assert tree.resources == ("nvidia.com/mig-1g.18gb",)
        assert len(tree.devices) == 14
        parent = await backend.parent.discover()
        first = parent.devices[0]
        on_first = [d for d in tree.devices if d.gpu == first.id]
        assert [d.instance for d in on_first] == [(gi, 0) for gi in range(1, 8)]
        assert [d.attributes["start_slice"] for d in on_first] == [str(s) for s in range(7)]
        assert {d.numa_node for d in on_first} == {first.numa_node}
        assert tree.links == parent.links


async def test_mixed_layout_serves_one_resource_per_profile(workdir: Path) -> None:
    """A mixed layout on GPU 0 and the default on the rest give one nvidia.com/mig-<profile> resource per profile."""
    layouts = {0: ["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"]}
    async with partitioned(workdir, layout="all-1g.35gb", layouts=layouts) as backend:
        tree = await backend.discover()
        counts = {resource: len(devices) for resource, devices in tree.by_resource().items()}
        assert counts == {
            "nvidia.com/mig-2g.35gb": 1,
            "nvidia.com/mig-1g.18gb": 2,
            "nvidia.com/mig-3g.71gb": 1,
            "nvidia.com/mig-1g.35gb": 4,
        }
        assert all(tree.rules_of(r).allocation_policy is AllocationPolicyKind.DISTRIBUTED for r in tree.resources)
        assert isinstance(backend, PreferredAllocation)
        assert backend.allocation_policy("nvidia.com/mig-3g.71gb") is AllocationPolicyKind.DISTRIBUTED


async def test_partition_attributes_and_spec(workdir: Path) -> None:
    """A simulated partition carries its profile, parent, start slice and memory, and a spec naming its MIG ID."""
    async with partitioned(workdir, layout=["3g.71gb"], allocation_policy="packed") as backend:
        tree = await backend.discover()
        parent = (await backend.parent.discover()).devices[1]
        device = next(d for d in tree.devices if d.gpu == parent.id)
        assert dict(device.attributes) == {
            "profile": "3g.71gb",
            "parent_uuid": parent.id,
            "parent_index": "1",
            "start_slice": "0",
            "compute_slices": "3",
            "memory_slices": "4",
            "memory_mib": "71424",
            "gpu_instance_id": "1",
            "compute_instance_id": "0",
            "simulated": "true",
            "model": "NVIDIA H200",
        }
        assert device.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": device.id}
        assert device.spec.device_nodes == (
            DeviceNode("/dev/null", "/dev/nvidia1", "rw"),
            DeviceNode("/dev/null", "/dev/nvidia-caps/nvidia-cap147", "rw"),
            DeviceNode("/dev/null", "/dev/nvidia-caps/nvidia-cap148", "rw"),
        )
        assert tree.rules_of(device.resource).allocation_policy is AllocationPolicyKind.PACKED


async def test_ids_are_deterministic_mig_uuids(workdir: Path) -> None:
    """Partition IDs are MIG UUIDs of at most 63 characters, derived from the parent UUID and instance alone."""
    async with partitioned(workdir) as backend:
        first = await backend.discover()
    async with partitioned(workdir) as again:
        assert [d.id for d in (await again.discover()).devices] == [d.id for d in first.devices]
    assert all(MIG_ID.match(d.id) and len(d.id) <= 63 for d in first.devices)
    assert len({d.id for d in first.devices}) == len(first.devices)
    device = first.devices[3]
    assert device.instance is not None
    assert device.id == partition_id(device.gpu, *device.instance)
    # Pinned, not only compared within this process: the IDs must be the same on every start.
    assert (first.devices[0].instance, first.devices[0].id) == ((1, 0), "MIG-cd62950b-5fe4-5c93-b3d7-e6817d1661c1")


async def test_single_strategy_serves_partitions_as_gpu(workdir: Path) -> None:
    """Under ``single`` one profile everywhere is served as nvidia.com/gpu."""
    async with partitioned(workdir, strategy="single", layout="all-2g.35gb") as backend:
        tree = await backend.discover()
        assert tree.resources == ("nvidia.com/gpu",)
        assert len(tree.devices) == 6
        assert {d.attributes["profile"] for d in tree.devices} == {"2g.35gb"}


async def test_single_strategy_refuses_mixed_profiles(workdir: Path) -> None:
    """Under ``single`` partitions of several profiles fail the start, naming each profile found and its GPUs."""
    backend = create(context(workdir, {"strategy": "single", "layouts": {1: ["4g.71gb", "3g.71gb"]}}))
    with pytest.raises(StrategyError) as caught:
        await backend.start()
    message = str(caught.value)
    assert "must be one profile" in message
    assert "1g.18gb on gpu 0" in message and "4g.71gb on gpu 1" in message and "3g.71gb on gpu 1" in message
    await backend.aclose()
    assert not (workdir / "mock.sock").exists()


async def test_layout_that_does_not_fit_fails_start_naming_gpu(workdir: Path) -> None:
    """A per-GPU layout that does not fit fails the start naming the setting, the GPU and the profile."""
    backend = create(context(workdir, {"layouts": {1: ["4g.71gb", "4g.71gb"]}}))
    with pytest.raises(LayoutError, match=r"partitioned\.layouts\.1\.gpu 1 \(GPU-[0-9a-f-]+\): 2 of 4g\.71gb"):
        await backend.start()
    await backend.aclose()


async def test_whole_layout_keeps_gpu_beside_partitions(workdir: Path) -> None:
    """Under ``mixed`` a GPU with layout none stays whole under the parent's resource beside the partitions."""
    async with partitioned(workdir, layouts={"gpu 1": "none"}) as backend:
        tree = await backend.discover()
        whole = tree.of("nvidia.com/gpu")
        assert len(whole) == 1 and whole[0].attributes["index"] == "1"
        assert len(tree.of("nvidia.com/mig-1g.18gb")) == 7


async def test_none_strategy_passes_parent_through(workdir: Path) -> None:
    """Under ``none`` the parent's whole GPUs are served exactly as the parent discovers them."""
    async with partitioned(workdir, strategy="none") as backend:
        assert await backend.discover() == await backend.parent.discover()
        assert backend.allocation_policy("nvidia.com/gpu") is AllocationPolicyKind.TOPOLOGY


async def test_resource_domain_follows_parent(workdir: Path) -> None:
    """The MIG resources take the domain of the parent's resource name."""
    async with partitioned(workdir, parent_options={"resource": "example.com/gpu"}) as backend:
        assert (await backend.discover()).resources == ("example.com/mig-1g.18gb",)


async def test_parent_health_passes_through_and_inventory_is_resliced(workdir: Path) -> None:
    """A parent's XID passes through as it is; an unplugged GPU yields an InventoryChanged of the re-sliced tree."""
    async with partitioned(workdir) as backend:
        mock = backend.parent
        assert isinstance(mock, MockBackend)
        stream = backend.events()
        try:
            mock.xid(0, 79, (2, 0))
            event = await asyncio.wait_for(anext(stream), 2)
            assert event == HealthChanged(mock.status()[0].uuid, Health.UNHEALTHY, "XID 79", 79, (2, 0))
            mock.unplug(1)
            changed = await asyncio.wait_for(anext(stream), 2)
            assert isinstance(changed, InventoryChanged)
            assert len(changed.tree.devices) == 7
            assert {d.gpu for d in changed.tree.devices} == {mock.status()[0].uuid}
        finally:
            assert isinstance(stream, AsyncGenerator)
            await stream.aclose()


def test_nvml_parent_is_asked_for_mig_devices() -> None:
    """With the nvml parent the backend asks it to report MIG devices and profiles, except under ``none``."""
    ctx = BackendContext(options={})
    settings = PartitionedSettings.from_options({"parent": "nvml", "parent_options": {"driver_root": "/run/x"}})
    assert parent_context(settings, ctx).options == {"driver_root": "/run/x", "report_mig_devices": True}
    plain = PartitionedSettings.from_options({"parent": "nvml", "strategy": "none"})
    assert parent_context(plain, ctx).options == {}


# The real-MIG path: the NVML backend over the fake NVML, a fake proc tree under tmp_path.

MIG_A = "MIG-aaaaaaaa-1111-5111-8111-000000000001"
MIG_B = "MIG-aaaaaaaa-1111-5111-8111-000000000002"
MIG_C = "MIG-aaaaaaaa-1111-5111-8111-000000000003"


def mig_node(tmp_path: Path) -> FakeNvml:
    """Two H200s: GPU 0 with MIG on (3g.71gb at GI 1, two 2g.35gb at GI 3 and 5), GPU 1 with MIG off."""
    fake = h200_node(2)
    gpu = fake.gpus[0]
    gpu.mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
    gpu.mig_devices = [
        FakeMigDevice(MIG_A, 1, 0, 3, 71424),
        FakeMigDevice(MIG_B, 3, 0, 2, 33280),
        FakeMigDevice(MIG_C, 5, 0, 2, 33280),
    ]
    write_mig_capabilities(tmp_path, gpu)
    return fake


def nvml_partitioned(fake: FakeNvml, tmp_path: Path, **options: Any) -> PartitionedBackend:
    """The partitioned backend over the NVML backend over ``fake``, not started."""
    settings = PartitionedSettings.from_options({"parent": "nvml", **options})
    nvml = NvmlSettings(report_mig_devices=True, driver_root=str(tmp_path), event_wait_timeout_ms=50)
    return PartitionedBackend(settings, NvmlBackend(nvml, HealthPolicy(), fake))


@asynccontextmanager
async def over_nvml(fake: FakeNvml, tmp_path: Path, **options: Any) -> AsyncIterator[PartitionedBackend]:
    backend = nvml_partitioned(fake, tmp_path, **options)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_real_mig_devices_served_with_uuids_instances_and_caps(tmp_path: Path) -> None:
    """A MIG-enabled GPU's real MIG devices are served by MIG UUID, with instance IDs, profile and caps nodes."""
    fake = mig_node(tmp_path)
    parent_uuid = fake.gpus[0].uuid
    async with over_nvml(fake, tmp_path, layout="none") as backend:
        tree = await backend.discover()
    real = [d for d in tree.devices if d.gpu == parent_uuid]
    assert [(d.id, d.resource, d.instance) for d in real] == [
        (MIG_A, "nvidia.com/mig-3g.71gb", (1, 0)),
        (MIG_B, "nvidia.com/mig-2g.35gb", (3, 0)),
        (MIG_C, "nvidia.com/mig-2g.35gb", (5, 0)),
    ]
    assert real[0].spec.list_env == {"NVIDIA_VISIBLE_DEVICES": MIG_A}
    assert real[0].spec.device_nodes == (
        DeviceNode("/dev/nvidia0", "/dev/nvidia0"),
        DeviceNode("/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap12"),
        DeviceNode("/dev/nvidia-caps/nvidia-cap13", "/dev/nvidia-caps/nvidia-cap13"),
    )
    assert real[1].attributes["parent_uuid"] == parent_uuid and real[1].attributes["profile"] == "2g.35gb"
    assert all(d.health is Health.HEALTHY for d in real)
    # GPU 1 has MIG off and layout none: served whole beside them.
    assert [d.id for d in tree.of("nvidia.com/gpu")] == [fake.gpus[1].uuid]
    assert tree.link(parent_uuid, fake.gpus[1].uuid).nvlinks == 18


async def test_real_mig_missing_capability_file_serves_device_unhealthy(tmp_path: Path) -> None:
    """A MIG device whose capability file is missing is served Unhealthy rather than handed to pods."""
    fake = mig_node(tmp_path)
    (tmp_path / "proc/driver/nvidia/capabilities/gpu0/mig/gi5/ci0/access").unlink()
    async with over_nvml(fake, tmp_path, layout="none") as backend:
        tree = await backend.discover()
    health = {d.id: d.health for d in tree.devices if d.instance is not None}
    assert health == {MIG_A: Health.HEALTHY, MIG_B: Health.HEALTHY, MIG_C: Health.UNHEALTHY}


async def test_nvml_profiles_slice_mig_disabled_gpu(tmp_path: Path) -> None:
    """With profiles read from NVML, a MIG-disabled GPU is sliced by its own table, media-extension variant too."""
    fake = mig_node(tmp_path)
    async with over_nvml(fake, tmp_path, profiles="nvml", layout=["1g.18gb+me", "3g.71gb"]) as backend:
        tree = await backend.discover()
    simulated = [d for d in tree.devices if d.gpu == fake.gpus[1].uuid]
    assert [(d.resource, d.attributes["start_slice"]) for d in simulated] == [
        ("nvidia.com/mig-3g.71gb", "0"),
        ("nvidia.com/mig-1g.18gb.me", "4"),
    ]


async def test_nvml_profiles_unknown_profile_names_gpu(tmp_path: Path) -> None:
    """A layout naming a profile the GPU does not offer fails naming the GPU and the known profiles."""
    backend = nvml_partitioned(mig_node(tmp_path), tmp_path, profiles="nvml", layout="all-5g.60gb")
    with pytest.raises(LayoutError, match=r"partitioned\.layout\.gpu 1 \(GPU-.*\): unknown profile '5g\.60gb'"):
        await backend.start()
    await backend.aclose()


async def test_single_strategy_with_real_mig_of_two_profiles_fails(tmp_path: Path) -> None:
    """Under ``single`` the real MIG layout of 3g.71gb and 2g.35gb fails the start naming both profiles."""
    backend = nvml_partitioned(mig_node(tmp_path), tmp_path, strategy="single", layout="none")
    with pytest.raises(StrategyError, match=r"found 3g\.71gb on gpu 0; 2g\.35gb on gpu 0"):
        await backend.start()
    await backend.aclose()
