"""Partitions end to end over real unix sockets: the partitioned backend over the mock, the manager, the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuplugin.backends.mock import MockBackend, control
from gpuplugin.backends.partitioned import PartitionedBackend, create
from gpuplugin.backends.registry import BackendContext
from gpuplugin.daemon.manager import Manager
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import registered_manager

SMALL = "nvidia.com/mig-1g.18gb"
LARGE = "nvidia.com/mig-3g.71gb"
MIDDLE = "nvidia.com/mig-2g.35gb"
#: GPU 0 and 1 get a mix, the rest of the 4 mock GPUs 7 of 1g.18gb each.
LAYOUTS = {0: ["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"], 1: ["3g.71gb", "3g.71gb"]}


@dataclass
class Node:
    kubelet: KubeletSimulator
    manager: Manager
    backend: PartitionedBackend
    mock: MockBackend
    directory: Path

    def partitions(self, resource: str, gpu: int | None = None) -> list[str]:
        uuid = None if gpu is None else self.mock.status()[gpu].uuid
        return [d.id for d in self.manager.tree.of(resource) if uuid is None or d.gpu == uuid]


@asynccontextmanager
async def node(directory: Path, options: Mapping[str, Any] | None = None) -> AsyncIterator[Node]:
    backend = create(
        BackendContext(
            options={"layouts": LAYOUTS, "parent_options": {"gpus": 4}, **(options or {})},
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=directory,
        )
    )
    async with registered_manager(backend, directory, (SMALL, MIDDLE, LARGE)) as (kubelet, manager):
        assert isinstance(backend.parent, MockBackend)
        yield Node(kubelet, manager, backend, backend.parent, directory)


async def test_every_profile_registers_with_preferred_allocation(workdir: Path) -> None:
    """Each profile registers as its own resource, advertising GetPreferredAllocation, with its partition count."""
    async with node(workdir) as n:
        assert {r.resource for r in n.kubelet.registrations} == {SMALL, MIDDLE, LARGE}
        assert all(r.options.get_preferred_allocation_available for r in n.kubelet.registrations)
        assert (n.kubelet.allocatable(SMALL), n.kubelet.allocatable(MIDDLE), n.kubelet.allocatable(LARGE)) == (16, 1, 3)


async def test_parent_xid_marks_all_its_partitions_unhealthy_in_every_resource(workdir: Path) -> None:
    """An XID on a GPU marks every partition on it Unhealthy in every MIG resource, and they recover together."""
    async with node(workdir) as n:
        n.mock.xid(0, 62)
        await n.kubelet.wait_for(
            lambda: (
                (n.kubelet.allocatable(SMALL), n.kubelet.allocatable(MIDDLE), n.kubelet.allocatable(LARGE))
                == (14, 0, 2)
            ),
            timeout=2,
        )
        for resource in (SMALL, MIDDLE, LARGE):
            states = n.kubelet.devices(resource)
            assert {states[i] for i in n.partitions(resource, gpu=0)} == {"Unhealthy"}
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 16 and n.kubelet.allocatable(LARGE) == 3, 5)


async def test_xid_naming_an_instance_reaches_that_partition_alone(workdir: Path) -> None:
    """``xid --instance GI,CI`` through the mock's control socket marks only that partition Unhealthy."""
    async with node(workdir) as n:
        target = next(d for d in n.manager.tree.of(SMALL) if d.gpu == n.mock.status()[0].uuid)
        assert target.instance is not None
        answer = await control(
            workdir / "mock.sock", {"op": "xid", "gpu": 0, "xid": 79, "instance": list(target.instance)}
        )
        assert answer["ok"], answer
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 15, timeout=2)
        states = n.kubelet.devices(SMALL)
        assert [i for i, health in states.items() if health == "Unhealthy"] == [target.id]
        assert n.kubelet.allocatable(LARGE) == 3 and n.kubelet.allocatable(MIDDLE) == 1


async def test_allocate_returns_the_partition_mig_id(workdir: Path) -> None:
    """Allocate of a partition sets NVIDIA_VISIBLE_DEVICES to its MIG ID and maps its GPU and caps nodes."""
    async with node(workdir) as n:
        partition = n.partitions(LARGE, gpu=1)[1]
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[partition])])
        response = await n.kubelet.stub(LARGE).allocate(request)
        container = response.container_responses[0]
        assert container.envs["NVIDIA_VISIBLE_DEVICES"] == partition
        paths = [(d.host_path, d.container_path) for d in container.devices]
        assert paths[0] == ("/dev/null", "/dev/nvidia1")
        assert [p for p in paths if p[1].startswith("/dev/nvidia-caps/")] == [
            ("/dev/null", "/dev/nvidia-caps/nvidia-cap156"),
            ("/dev/null", "/dev/nvidia-caps/nvidia-cap157"),
        ]


async def test_admission_spreads_partitions_over_gpus(workdir: Path) -> None:
    """Admission asks GetPreferredAllocation, and the distributed policy spreads a pod's partitions over GPUs."""
    async with node(workdir) as n:
        admission = await n.kubelet.admit("spread", [{SMALL: 3}])
        chosen = admission.device_ids(SMALL)
        allocation = admission.containers[0].allocations[SMALL]
        assert allocation.preferred is not None and set(allocation.preferred) == set(chosen)
        gpus = {d.gpu for d in n.manager.tree.of(SMALL) if d.id in chosen}
        assert len(gpus) == 3
        assert allocation.response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(chosen)


async def test_admission_packed_fills_one_gpu_first(workdir: Path) -> None:
    """With ``allocation_policy: packed`` pods take partitions from the most-used GPU before another."""
    async with node(workdir, {"allocation_policy": "packed"}) as n:
        first = await n.kubelet.admit("first", [{SMALL: 1}])
        second = await n.kubelet.admit("second", [{SMALL: 2}])
        chosen = {*first.device_ids(SMALL), *second.device_ids(SMALL)}
        gpus = {d.gpu for d in n.manager.tree.of(SMALL) if d.id in chosen}
        assert len(chosen) == 3 and len(gpus) == 2
