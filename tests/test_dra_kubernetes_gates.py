"""The gated shapes of the node's ResourceSlices against a real Kubernetes 1.34 control plane started with the
alpha gates DRAPartitionableDevices and DRADeviceTaints (tests/controlplane.py): the scheduler keeps a partition and
its whole GPU apart through their shared counters, and passes over a tainted device until it recovers. Each test
starts its own control plane, as nothing here deallocates claims (no controller manager runs). The fallback where
the gates are off is in tests/test_dra_kubernetes.py. Skipped where the binaries are not cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient
from lightkube.resources.core_v1 import Pod
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

from gpuplugin.dra.apiserver import SlicePublisher
from gpuplugin.dra.names import device_names
from gpuplugin.dra.slices import SliceShape
from tests.controlplane import ControlPlane, available, control_plane
from tests.test_dra_kubernetes import claim_and_pod, cluster_node, eventually, prepare, results, schedule

GATES = ("DRAPartitionableDevices", "DRADeviceTaints")
#: DeviceTaintRules, which the scheduler watches with DRADeviceTaints on.
APIS = ("resource.k8s.io/v1alpha3",)


@pytest.fixture
def gated() -> Iterator[ControlPlane]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with control_plane(GATES, APIS) as started:
        yield started


async def slices(admin: AsyncClient) -> list[dict[str, Any]]:
    return [s.to_dict() for s in [s async for s in admin.list(ResourceSlice)]]


async def published(admin: AsyncClient) -> dict[str, dict[str, Any]]:
    """Every published device by name."""
    return {d["name"]: d for s in await slices(admin) for d in s["spec"].get("devices", [])}


async def claim_for(admin: AsyncClient, name: str, device_class: str) -> None:
    """A claim for one device of ``device_class`` and a pod using it."""
    request = {"name": "dev", "exactly": {"deviceClassName": device_class, "count": 1}}
    await claim_and_pod(admin, name, {"devices": {"requests": [request]}})


async def allocation(admin: AsyncClient, name: str) -> dict[str, Any] | None:
    claim: dict[str, Any] = (await admin.get(ResourceClaim, name, namespace="default")).to_dict()
    return claim if claim.get("status", {}).get("allocation") else None


async def unschedulable(admin: AsyncClient, name: str) -> bool:
    """Whether the scheduler tried the pod and found no allocation for its claim."""
    pod = (await admin.get(Pod, name, namespace="default")).to_dict()
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)


async def test_a_partition_allocated_keeps_its_whole_gpu_from_being_allocated(
    gated: ControlPlane, workdir: Path
) -> None:
    """With the gate on, one partitioned GPU is published as its seven partitions and the whole GPU sharing one
    counter set; the scheduler allocates a partition (prepared as that partition), and then finds no whole GPU."""
    async with cluster_node(gated, workdir, "partitioned", gpus=1, layout="all-1g.18gb") as (admin, driver, kubelet):
        assert isinstance(driver.publisher, SlicePublisher)
        names = list(device_names(driver.tree))
        assert len(names) == 8
        found = await eventually(lambda: _with_counters(admin, names))
        (counter_set,) = found["spec"]["sharedCounters"]
        assert counter_set["counters"]["memory-slice-6"] == {"value": "1"}
        assert driver.publisher.shape == SliceShape(counters=True, taints=True, taint_key="gpu.gpuplugin.dev/unhealthy")

        claim = await schedule(admin, "small", "one-small-partition")
        (result,) = results(claim)
        partition = device_names(driver.tree)[result["device"]]
        devices, env = await prepare(kubelet, driver, claim)
        assert devices == [result["device"]]
        assert f"NVIDIA_VISIBLE_DEVICES={partition.id}" in env

        await claim_for(admin, "whole", "whole-gpu.gpuplugin.dev")
        assert await eventually(lambda: unschedulable(admin, "whole"))
        assert await allocation(admin, "whole") is None


async def test_a_whole_gpu_allocated_keeps_every_partition_of_it_from_being_allocated(
    gated: ControlPlane, workdir: Path
) -> None:
    """With the gate on, a claim for a whole GPU gets the partitioned GPU, prepared as the GPU (its UUID, no MIG
    capability nodes); a partition claim then finds none left on it."""
    async with cluster_node(gated, workdir, "partitioned", gpus=1, layout="all-1g.18gb") as (admin, driver, kubelet):
        names = list(device_names(driver.tree))
        await eventually(lambda: _with_counters(admin, names))
        await claim_for(admin, "whole", "whole-gpu.gpuplugin.dev")
        claim = await eventually(lambda: allocation(admin, "whole"))
        (result,) = results(claim)
        gpu = device_names(driver.tree)[result["device"]]
        assert gpu.id == gpu.gpu
        _, env = await prepare(kubelet, driver, claim)
        assert f"NVIDIA_VISIBLE_DEVICES={gpu.attributes['uuid']}" in env

        await claim_for(admin, "small", "partition.gpuplugin.dev")
        assert await eventually(lambda: unschedulable(admin, "small"))
        assert await allocation(admin, "small") is None


async def test_a_tainted_gpu_is_passed_over_until_it_recovers(gated: ControlPlane, workdir: Path) -> None:
    """With the gate on, an XID keeps the GPU in the slice with a NoSchedule taint naming the XID; a claim for it
    stays unallocated while the taint is there, and is allocated once the GPU recovers and the taint is gone."""
    async with cluster_node(gated, workdir, gpus=1) as (admin, driver, _):
        (name,) = device_names(driver.tree)
        await eventually(lambda: _names_are(admin, [name]))
        driver.backend.xid(0, 79)  # type: ignore[attr-defined]
        device = await eventually(lambda: _tainted(admin, name))
        (taint,) = device["taints"]
        assert (taint["key"], taint["effect"]) == ("gpu.gpuplugin.dev/unhealthy", "NoSchedule")
        assert taint["value"].startswith("XID-79")

        await claim_for(admin, "train", "whole-gpu.gpuplugin.dev")
        assert await eventually(lambda: unschedulable(admin, "train"))
        assert await allocation(admin, "train") is None

        driver.backend.recover(0)  # type: ignore[attr-defined]
        claim = await eventually(lambda: allocation(admin, "train"))
        assert [r["device"] for r in results(claim)] == [name]
        assert "taints" not in (await published(admin))[name]


async def _with_counters(admin: AsyncClient, names: list[str]) -> dict[str, Any] | None:
    """The one slice, once it holds ``names`` and a counter set."""
    found = await slices(admin)
    if len(found) != 1 or not found[0]["spec"].get("sharedCounters"):
        return None
    return found[0] if sorted(d["name"] for d in found[0]["spec"]["devices"]) == sorted(names) else None


async def _names_are(admin: AsyncClient, names: list[str]) -> bool:
    return list(await published(admin)) == names


async def _tainted(admin: AsyncClient, name: str) -> dict[str, Any] | None:
    device = (await published(admin)).get(name)
    return device if device is not None and device.get("taints") else None
