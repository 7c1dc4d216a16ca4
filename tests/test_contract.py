"""The kubelet contract, line by line, over real unix sockets: the mock backend, the manager and the simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from grpclib import GRPCError
from grpclib.const import Status
from h2.connection import H2Connection

from gpuplugin.backends.mock import MockBackend
from gpuplugin.core.model import ContainerSpec, DeviceTree
from gpuplugin.daemon.manager import Manager
from gpuplugin.kubelet import wire
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import CLOSED_STREAMS_REMEMBERED, ResourceServer, ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import StaticBackend, gpu_tree, mock_manager

GPU = "nvidia.com/gpu"
#: Within the one second the contract allows for noticing a kubelet restart.
NOTICE_S = 1.0


@dataclass
class Node:
    kubelet: KubeletSimulator
    manager: Manager
    backend: MockBackend
    directory: Path

    def ids(self) -> list[str]:
        return [d.id for d in self.manager.tree.devices]


def make_manager(directory: Path, options: Mapping[str, Any] | None = None, *, inotify: bool = True) -> Manager:
    return mock_manager(directory, options, inotify=inotify)


@asynccontextmanager
async def node(
    directory: Path, options: Mapping[str, Any] | None = None, *, inotify: bool = True
) -> AsyncIterator[Node]:
    async with KubeletSimulator(directory) as kubelet:
        manager = make_manager(directory, options, inotify=inotify)
        await manager.start()
        try:
            await kubelet.wait_registered(GPU, timeout=5)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) > 0, timeout=5)
            assert isinstance(manager.backend, MockBackend)
            yield Node(kubelet, manager, manager.backend, directory)
        finally:
            await manager.aclose()


async def allocate(n: Node, *containers: list[str]) -> api.AllocateResponse:
    request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=c) for c in containers])
    return await n.kubelet.stub(GPU).allocate(request)


async def test_registers_after_serving_with_options(workdir: Path) -> None:
    """The plugin registers v1beta1 with an endpoint that already serves GetDevicePluginOptions."""
    async with node(workdir) as n:
        registration = n.kubelet.registrations[0]
        assert registration.resource == GPU
        assert (workdir / registration.endpoint).is_socket()
        assert registration.options.get_preferred_allocation_available
        assert not registration.options.pre_start_required
        assert n.kubelet.allocatable(GPU) == 8


async def test_kubelet_absent_at_start_registers_when_it_appears(workdir: Path) -> None:
    """With no kubelet, registration is retried with one log line, and succeeds as soon as the kubelet serves."""
    manager = make_manager(workdir)
    with structlog.testing.capture_logs() as logs:
        await manager.start()
        try:
            await asyncio.sleep(0.5)
            async with KubeletSimulator(workdir) as kubelet:
                appeared = time.monotonic()
                registration = await kubelet.wait_registered(GPU, timeout=5)
                assert registration.monotonic_s - appeared < NOTICE_S
        finally:
            await manager.aclose()
    unreachable = [e for e in logs if e["event"].startswith("kubelet not reachable")]
    assert len(unreachable) == 1


async def test_list_and_watch_full_list_with_numa(workdir: Path) -> None:
    """The first ListAndWatch message is the full list, each device Healthy with its NUMA node."""
    async with node(workdir) as n:
        stream = cast(AsyncGenerator[api.ListAndWatchResponse], n.kubelet.stub(GPU).list_and_watch(api.Empty()))
        first = await anext(aiter(stream))
        await stream.aclose()
        assert [d.id for d in first.devices] == n.ids()
        assert {d.health for d in first.devices} == {"Healthy"}
        assert [d.topology.nodes[0].id for d in first.devices if d.topology] == [0] * 4 + [1] * 4


async def test_xid_marks_unhealthy_then_recovers(workdir: Path) -> None:
    """A recoverable XID turns one GPU Unhealthy on the stream, and the stream reports it Healthy again."""
    async with node(workdir) as n:
        n.backend.xid(2, 63)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 7, timeout=2)
        assert n.kubelet.devices(GPU)[n.ids()[2]] == "Unhealthy"
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 8, timeout=5)


async def test_many_concurrent_streams_all_see_changes(workdir: Path) -> None:
    """Several ListAndWatch streams at once each get the full list and every change."""
    async with node(workdir) as n:
        streams = [
            cast(AsyncGenerator[api.ListAndWatchResponse], n.kubelet.stub(GPU).list_and_watch(api.Empty()))
            for _ in range(5)
        ]
        firsts = [await anext(aiter(s)) for s in streams]
        assert all(len(f.devices) == 8 for f in firsts)
        n.backend.xid(0, 48)
        seconds = [await asyncio.wait_for(anext(aiter(s)), 2) for s in streams]
        for message in seconds:
            assert [d.health for d in message.devices].count("Unhealthy") == 1
        for s in streams:
            await s.aclose()


async def test_allocate_unknown_ids_invalid_argument_naming_them(workdir: Path) -> None:
    """Allocate with unknown IDs fails INVALID_ARGUMENT and the message names each unknown ID."""
    async with node(workdir) as n:
        with pytest.raises(GRPCError) as caught:
            await allocate(n, [n.ids()[0], "GPU-nope", "GPU-other"])
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert "GPU-nope" in str(caught.value.message) and "GPU-other" in str(caught.value.message)


async def test_serving_bounds_h2s_record_of_closed_streams(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once serving, connections remember CLOSED_STREAMS_REMEMBERED closed streams, not h2's 65,536 (~10 MB each)."""
    monkeypatch.setattr(H2Connection, "MAX_CLOSED_STREAMS", 2**16)
    async with node(workdir) as n:
        await allocate(n, [n.ids()[0]])
        assert H2Connection.MAX_CLOSED_STREAMS == CLOSED_STREAMS_REMEMBERED < 2**16


async def test_allocate_unhealthy_failed_precondition(workdir: Path) -> None:
    """Allocate of an unhealthy GPU fails FAILED_PRECONDITION naming it."""
    async with node(workdir) as n:
        n.backend.xid(5, 79)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 7, timeout=2)
        with pytest.raises(GRPCError) as caught:
            await allocate(n, [n.ids()[5]])
        assert caught.value.status is Status.FAILED_PRECONDITION
        assert n.ids()[5] in str(caught.value.message)


@pytest.mark.parametrize(
    "containers",
    [pytest.param([], id="no-containers"), pytest.param([[]], id="empty-container"), pytest.param(None, id="dup")],
)
async def test_allocate_malformed_requests_rejected(workdir: Path, containers: list[list[str]] | None) -> None:
    """Empty requests, empty containers and duplicated IDs fail INVALID_ARGUMENT."""
    async with node(workdir) as n:
        if containers is None:
            containers = [[n.ids()[1], n.ids()[1]]]
        with pytest.raises(GRPCError) as caught:
            await allocate(n, *containers)
        assert caught.value.status is Status.INVALID_ARGUMENT


async def test_allocate_merges_container_specs(workdir: Path) -> None:
    """Allocate joins NVIDIA_VISIBLE_DEVICES in request order and maps each GPU's device node."""
    async with node(workdir) as n:
        ids = n.ids()
        response = await allocate(n, [ids[3], ids[1]], [ids[0]])
        first, second = response.container_responses
        assert first.envs["NVIDIA_VISIBLE_DEVICES"] == f"{ids[3]},{ids[1]}"
        assert [(d.host_path, d.container_path, d.permissions) for d in first.devices] == [
            ("/dev/null", "/dev/nvidia3", "rw"),
            ("/dev/null", "/dev/nvidia1", "rw"),
        ]
        assert second.envs["NVIDIA_VISIBLE_DEVICES"] == ids[0]


async def test_preferred_allocation_follows_topology(workdir: Path) -> None:
    """Admission picks NVLinked pairs first, then GPUs behind one PCIe switch, then one NUMA node."""
    options = {"nvlink_groups": [[2, 5]], "pcie_switches": [[0, 1], [6, 7]]}
    async with node(workdir, options) as n:
        ids = n.ids()
        nvlinked = await n.kubelet.admit("a", [{GPU: 2}])
        assert set(nvlinked.device_ids(GPU)) == {ids[2], ids[5]}
        switched = await n.kubelet.admit("b", [{GPU: 2}])
        assert set(switched.device_ids(GPU)) in ({ids[0], ids[1]}, {ids[6], ids[7]})
        numa = await n.kubelet.admit("c", [{GPU: 2}])
        indices = {ids.index(i) for i in numa.device_ids(GPU)}
        assert indices <= {0, 1, 3} or indices <= {4, 6, 7}


async def test_preferred_allocation_honours_must_include_and_rejects_impossible(workdir: Path) -> None:
    """GetPreferredAllocation keeps must-include IDs, returns exactly the size, and refuses impossible sizes."""
    async with node(workdir) as n:
        ids = n.ids()
        stub = n.kubelet.stub(GPU)
        request = api.ContainerPreferredAllocationRequest(
            available_deviceIDs=ids, must_include_deviceIDs=[ids[6]], allocation_size=3
        )
        answer = await stub.get_preferred_allocation(api.PreferredAllocationRequest(container_requests=[request]))
        chosen = answer.container_responses[0].device_i_ds
        assert len(chosen) == 3 and ids[6] in chosen and set(chosen) <= set(ids)
        request.allocation_size = 9
        with pytest.raises(GRPCError) as caught:
            await stub.get_preferred_allocation(api.PreferredAllocationRequest(container_requests=[request]))
        assert caught.value.status is Status.INVALID_ARGUMENT


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
async def test_kubelet_restart_reregisters_within_a_second(workdir: Path, inotify: bool) -> None:
    """After a kubelet restart the plugin serves a new socket and registers again within one second."""
    async with node(workdir, inotify=inotify) as n:
        earlier = await n.kubelet.admit("before", [{GPU: 1}])
        before = len(n.kubelet.registrations)
        old_socket = n.manager.servers[GPU].socket_path
        restart = await n.kubelet.restart()
        again = await n.kubelet.wait_registered(GPU, after=before, timeout=5)
        assert again.monotonic_s - restart.served_monotonic_s < NOTICE_S
        assert again.endpoint != (old_socket.name if old_socket else None)
        assert (workdir / "kubelet_internal_checkpoint").exists()
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 8, timeout=2)
        admission = await n.kubelet.admit("after", [{GPU: 1}])
        assert len(admission.device_ids(GPU)) == 1
        assert admission.device_ids(GPU) != earlier.device_ids(GPU)


async def test_socket_deleted_under_us_serves_again(workdir: Path) -> None:
    """Deleting our socket makes the plugin serve a new one and register it within one second."""
    async with node(workdir) as n:
        before = len(n.kubelet.registrations)
        old = n.manager.servers[GPU].socket_path
        assert old is not None
        deleted = time.monotonic()
        old.unlink()
        again = await n.kubelet.wait_registered(GPU, after=before, timeout=5)
        assert again.monotonic_s - deleted < NOTICE_S
        assert (workdir / again.endpoint).is_socket()


async def test_twenty_restarts_in_a_row(workdir: Path) -> None:
    """Twenty kubelet restarts in a row each end with the resource registered and allocatable."""
    async with node(workdir) as n:
        for _ in range(20):
            before = len(n.kubelet.registrations)
            await n.kubelet.restart()
            await n.kubelet.wait_registered(GPU, after=before, timeout=5)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 8, timeout=2)
        sockets = [p for p in workdir.iterdir() if p.name.startswith("gpuplugin-")]
        assert len(sockets) == 1


async def test_unplugged_gpu_leaves_the_list_and_returns(workdir: Path) -> None:
    """An inventory change (a GPU unplugged, then plugged) reaches the kubelet's device list."""
    async with node(workdir) as n:
        n.backend.unplug(7)
        await n.kubelet.wait_for(lambda: len(n.kubelet.devices(GPU)) == 7, timeout=2)
        n.backend.plug(7)
        await n.kubelet.wait_for(lambda: len(n.kubelet.devices(GPU)) == 8, timeout=2)


async def test_stop_zeroes_allocatable_and_removes_socket(workdir: Path) -> None:
    """A deliberate stop sends an empty list first, then removes our socket."""
    async with KubeletSimulator(workdir) as kubelet:
        manager = make_manager(workdir)
        await manager.start()
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=5)
        socket = manager.servers[GPU].socket_path
        await manager.aclose()
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 0, timeout=2)
        assert socket is not None and not socket.exists()


async def test_lost_gpu_does_not_stall_others(workdir: Path) -> None:
    """A GPU fallen off the bus is Unhealthy while pods still get the other GPUs."""
    async with node(workdir) as n:
        n.backend.lose(4)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 7, timeout=2)
        admission = await n.kubelet.admit("p", [{GPU: 7}])
        assert n.ids()[4] not in admission.device_ids(GPU)


async def test_ready_once_registered_and_streaming(workdir: Path) -> None:
    """The manager is ready only when every resource is registered and has a stream open."""
    async with node(workdir) as n:
        await n.kubelet.wait_for(lambda: n.kubelet.stream_open(GPU), timeout=2)
        assert n.manager.ready


async def test_oversized_request_refused_before_decoding(workdir: Path) -> None:
    """A request over 4 MiB (gRPC's default limit) gets INVALID_ARGUMENT naming its size, and serving goes on."""
    async with node(workdir) as n:
        huge = [f"GPU-{i:036d}" for i in range(120_000)]
        with pytest.raises(GRPCError) as caught:
            await allocate(n, huge)
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert "bytes; at most 4194304" in str(caught.value.message)
        response = await allocate(n, [n.ids()[0]])
        assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == n.ids()[0]


class _CustomSpecs(StaticBackend):
    """A StaticBackend that builds every container spec itself, marked with its own name."""

    def __init__(self, tree: DeviceTree, mark: str) -> None:
        super().__init__(tree)
        self.mark = mark

    def container_spec(self, resource: str, device_ids: Sequence[str]) -> ContainerSpec | None:
        return ContainerSpec(env={"BACKEND": self.mark})


async def test_a_new_backend_answers_allocate_with_its_own_specs_not_the_cached_ones(workdir: Path) -> None:
    """After use_backend (a reload), Allocate of a device set answered before comes from the new backend."""
    tree = gpu_tree(2)
    ((resource, devices),) = tree.by_resource().items()
    server = ResourceServer(resource, _CustomSpecs(tree, "old"), ServerSettings(kubelet_dir=workdir))
    await server.update(devices, tree)
    device = devices[0].id
    request = wire.AllocateRequest.FromString(
        bytes(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[device])]))
    )

    def envs() -> dict[str, str]:
        (container,) = api.AllocateResponse.parse(server.allocator.allocate(request)).container_responses
        return dict(container.envs)

    assert envs() == {"BACKEND": "old"}
    server.use_backend(_CustomSpecs(tree, "new"))
    assert envs() == {"BACKEND": "new"}
