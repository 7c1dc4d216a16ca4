"""Wire compatibility with grpcio, a second gRPC stack: its client calls every RPC, its server takes our Register.

The grpcio code is generated from proto/v1beta1/api.proto at test time, so the test also proves the committed
betterproto2 code and the proto agree on the wire.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import grpc
import pytest

from gpuplugin.core.backend import HealthChanged
from gpuplugin.core.model import Health
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.kubelet.protogen import PROTO_DIR
from gpuplugin.kubelet.server import ServerSettings
from tests.fakes import GPU_RESOURCE, SHARED_RESOURCE, PreStartBackend, StaticBackend, gpu_tree, short_tmp_dir


@dataclass(frozen=True)
class GrpcioApi:
    """The grpcio modules generated from the proto."""

    pb2: Any
    pb2_grpc: Any


@pytest.fixture(scope="module")
def grpcio_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcioApi]:
    """grpcio code generated from proto/v1beta1/api.proto, importable while the module's tests run."""
    out = tmp_path_factory.mktemp("grpcio_api")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "v1beta1/api.proto",
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(out))
    try:
        import v1beta1.api_pb2 as pb2  # type: ignore[import-not-found]
        import v1beta1.api_pb2_grpc as pb2_grpc  # type: ignore[import-not-found]

        yield GrpcioApi(cast(ModuleType, pb2), cast(ModuleType, pb2_grpc))
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == "v1beta1" or n.startswith("v1beta1.")]:
            del sys.modules[name]


class GrpcioKubelet:
    """The kubelet's Registration service on grpcio, recording every request."""

    def __init__(self, api: GrpcioApi) -> None:
        self._api = api
        self.requests: list[Any] = []
        self._arrived = asyncio.Condition()

    async def Register(self, request: Any, context: Any) -> Any:
        async with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()
        return self._api.pb2.Empty()

    async def wait_for(self, count: int) -> list[Any]:
        async with asyncio.timeout(5), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)


@dataclass
class Plugin:
    """A running Manager registered with a grpcio kubelet in ``directory``."""

    api: GrpcioApi
    manager: Manager
    backend: StaticBackend
    kubelet: GrpcioKubelet
    directory: Path

    def target(self, resource: str = GPU_RESOURCE) -> str:
        endpoint = next(r.endpoint for r in reversed(self.kubelet.requests) if r.resource_name == resource)
        return f"unix:{self.directory / endpoint}"

    async def wait_for_unhealthy(self, resource: str, device_ids: set[str]) -> None:
        """Wait until the resource server serves exactly ``device_ids`` as unhealthy."""
        async with asyncio.timeout(5):
            # Polling: the manager offers no event to wait on, and a poll cannot miss a state.
            while (view := self.manager.servers[resource].view) is None or view.unhealthy != device_ids:  # noqa: ASYNC110
                await asyncio.sleep(0.005)


@asynccontextmanager
async def running_plugin(api: GrpcioApi, backend: StaticBackend) -> AsyncIterator[Plugin]:
    """Serve ``backend`` with a Manager that registers with a grpcio Registration server."""
    with short_tmp_dir() as directory:
        kubelet = GrpcioKubelet(api)
        server = grpc.aio.server()
        api.pb2_grpc.add_RegistrationServicer_to_server(kubelet, server)
        server.add_insecure_port(f"unix:{directory / 'kubelet.sock'}")
        await server.start()
        try:
            manager = Manager(backend, ManagerSettings(server=ServerSettings(kubelet_dir=directory)))
            await manager.start()
            try:
                await kubelet.wait_for(len(backend.tree.resources))
                yield Plugin(api, manager, backend, kubelet, directory)
            finally:
                await manager.aclose()
        finally:
            await server.stop(None)


@asynccontextmanager
async def device_plugin_stub(plugin: Plugin, resource: str = GPU_RESOURCE) -> AsyncIterator[Any]:
    """grpcio's DevicePlugin client on the resource's socket."""
    async with grpc.aio.insecure_channel(plugin.target(resource)) as channel:
        yield plugin.api.pb2_grpc.DevicePluginStub(channel)


@pytest.fixture
async def plugin(grpcio_api: GrpcioApi) -> AsyncIterator[Plugin]:
    """Four GPUs (NVLink pairs 0-1 and 2-3, NUMA nodes 0 and 1), each also served as two replicas."""
    async with running_plugin(grpcio_api, StaticBackend(gpu_tree(4, replicas=2))) as running:
        yield running


@pytest.fixture
async def stub(plugin: Plugin) -> AsyncIterator[Any]:
    """grpcio's DevicePlugin client for the whole GPUs."""
    async with device_plugin_stub(plugin) as client:
        yield client


def allocate_request(pb2: Any, *containers: list[str]) -> Any:
    return pb2.AllocateRequest(container_requests=[pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers])


def preferred_request(pb2: Any, available: list[str], must_include: list[str], size: int) -> Any:
    return pb2.PreferredAllocationRequest(
        container_requests=[
            pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size
            )
        ]
    )


async def test_register_reaches_grpcio_server(plugin: Plugin) -> None:
    """Our Register call reaches a grpcio kubelet with version v1beta1, a socket file name, the name and options."""
    by_resource = {r.resource_name: r for r in plugin.kubelet.requests}
    assert set(by_resource) == {GPU_RESOURCE, SHARED_RESOURCE}
    for resource, request in by_resource.items():
        assert request.version == "v1beta1"
        assert "/" not in request.endpoint
        assert (plugin.directory / request.endpoint).is_socket()
        assert request.endpoint == plugin.manager.servers[resource].socket_path.name  # type: ignore[union-attr]
        assert request.HasField("options")
        assert request.options.get_preferred_allocation_available
        assert not request.options.pre_start_required
    assert by_resource[GPU_RESOURCE].endpoint != by_resource[SHARED_RESOURCE].endpoint


async def test_get_device_plugin_options(plugin: Plugin, stub: Any) -> None:
    """GetDevicePluginOptions advertises preferred allocation and, without a PreStart backend, no pre-start."""
    options = await stub.GetDevicePluginOptions(plugin.api.pb2.Empty())
    assert options.get_preferred_allocation_available
    assert not options.pre_start_required


def listed(response: Any) -> list[tuple[str, str, list[int]]]:
    return [(d.ID, d.health, [n.ID for n in d.topology.nodes]) for d in response.devices]


async def test_list_and_watch_sends_full_lists_on_health_changes(plugin: Plugin, stub: Any) -> None:
    """ListAndWatch sends the full list with NUMA nodes, then a full list on a fault and again on recovery."""
    healthy = [
        ("GPU-0", "Healthy", [0]),
        ("GPU-1", "Healthy", [0]),
        ("GPU-2", "Healthy", [1]),
        ("GPU-3", "Healthy", [1]),
    ]
    call = stub.ListAndWatch(plugin.api.pb2.Empty())
    try:
        async with asyncio.timeout(5):
            assert listed(await call.read()) == healthy
            plugin.backend.push(HealthChanged(gpu="GPU-1", health=Health.UNHEALTHY, reason="XID 79", xid=79))
            assert listed(await call.read()) == [healthy[0], ("GPU-1", "Unhealthy", [0]), *healthy[2:]]
            plugin.backend.push(HealthChanged(gpu="GPU-1", health=Health.HEALTHY, reason="reset"))
            assert listed(await call.read()) == healthy
    finally:
        call.cancel()


async def test_list_and_watch_fans_gpu_health_out_to_replicas(plugin: Plugin) -> None:
    """A GPU's fault reaches the ListAndWatch stream of its replicas, and so does its recovery."""
    async with device_plugin_stub(plugin, SHARED_RESOURCE) as shared:
        call = shared.ListAndWatch(plugin.api.pb2.Empty())
        try:
            async with asyncio.timeout(5):
                first = listed(await call.read())
                assert [d[0] for d in first] == [f"GPU-{i}::{r}" for i in range(4) for r in range(2)]
                assert {d[1] for d in first} == {"Healthy"}
                plugin.backend.push(HealthChanged(gpu="GPU-2", health=Health.UNHEALTHY, reason="XID 48", xid=48))
                unhealthy = {d[0] for d in listed(await call.read()) if d[1] == "Unhealthy"}
                assert unhealthy == {"GPU-2::0", "GPU-2::1"}
                plugin.backend.push(HealthChanged(gpu="GPU-2", health=Health.HEALTHY, reason="reset"))
                assert listed(await call.read()) == first
        finally:
            call.cancel()


async def test_list_and_watch_omits_unknown_numa_topology(grpcio_api: GrpcioApi) -> None:
    """A device without a NUMA node is listed without a topology."""
    async with (
        running_plugin(grpcio_api, StaticBackend(gpu_tree(2, numa_nodes=0))) as running,
        device_plugin_stub(running) as client,
    ):
        call = client.ListAndWatch(grpcio_api.pb2.Empty())
        try:
            async with asyncio.timeout(5):
                first = await call.read()
        finally:
            call.cancel()
    assert [d.ID for d in first.devices] == ["GPU-0", "GPU-1"]
    assert not any(d.HasField("topology") for d in first.devices)


async def test_preferred_allocation_obeys_the_contract(plugin: Plugin, stub: Any) -> None:
    """GetPreferredAllocation answers each container with exactly its size, from available, with must-include."""
    pb2 = plugin.api.pb2
    everything = ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    request = pb2.PreferredAllocationRequest(
        container_requests=[
            pb2.ContainerPreferredAllocationRequest(available_deviceIDs=everything, allocation_size=2),
            pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=everything, must_include_deviceIDs=["GPU-2"], allocation_size=2
            ),
            pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=["GPU-3", "GPU-1", "GPU-0"], must_include_deviceIDs=["GPU-3"], allocation_size=3
            ),
            pb2.ContainerPreferredAllocationRequest(available_deviceIDs=["GPU-1", "GPU-2"], allocation_size=1),
        ]
    )
    response = await stub.GetPreferredAllocation(request)
    chosen = [list(c.deviceIDs) for c in response.container_responses]
    assert len(chosen) == 4
    for ids, container in zip(chosen, request.container_requests, strict=True):
        assert len(ids) == container.allocation_size
        assert len(set(ids)) == len(ids)
        assert set(ids) <= set(container.available_deviceIDs)
        assert set(container.must_include_deviceIDs) <= set(ids)
    # The topology policy prefers an NVLink pair: GPU-2's partner is GPU-3.
    assert sorted(chosen[0]) in (["GPU-0", "GPU-1"], ["GPU-2", "GPU-3"])
    assert sorted(chosen[1]) == ["GPU-2", "GPU-3"]


async def test_allocate_merges_container_specs(plugin: Plugin, stub: Any) -> None:
    """Allocate merges the devices' specs per container: list env in request order, shared nodes and mounts once."""
    response = await stub.Allocate(allocate_request(plugin.api.pb2, ["GPU-2", "GPU-0"], ["GPU-1"]))
    first, second = response.container_responses
    assert dict(first.envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-2,GPU-0", "FAKE_DRIVER": "1"}
    assert sorted((d.container_path, d.host_path, d.permissions) for d in first.devices) == [
        ("/dev/nvidia-uvm", "/dev/null", "rw"),
        ("/dev/nvidia0", "/dev/null", "rw"),
        ("/dev/nvidia2", "/dev/null", "rw"),
        ("/dev/nvidiactl", "/dev/null", "rw"),
    ]
    assert [(m.container_path, m.host_path, m.read_only) for m in first.mounts] == [
        ("/usr/local/nvidia", "/usr/lib/fake-nvidia", True)
    ]
    assert dict(first.annotations) == {"example.com/GPU-2": "index=2", "example.com/GPU-0": "index=0"}
    assert [c.name for c in first.cdi_devices] == ["example.com/gpu=GPU-2", "example.com/gpu=GPU-0"]
    assert dict(second.envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-1", "FAKE_DRIVER": "1"}
    assert sorted(d.container_path for d in second.devices) == ["/dev/nvidia-uvm", "/dev/nvidia1", "/dev/nvidiactl"]
    assert [c.name for c in second.cdi_devices] == ["example.com/gpu=GPU-1"]


async def test_allocate_replicas_name_each_gpu_once(plugin: Plugin) -> None:
    """Replicas of one GPU in one container name that GPU once in NVIDIA_VISIBLE_DEVICES and its node once."""
    async with device_plugin_stub(plugin, SHARED_RESOURCE) as shared:
        response = await shared.Allocate(allocate_request(plugin.api.pb2, ["GPU-3::1", "GPU-0::0", "GPU-3::0"]))
    (container,) = response.container_responses
    assert container.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-3,GPU-0"
    assert sorted(d.container_path for d in container.devices) == [
        "/dev/nvidia-uvm",
        "/dev/nvidia0",
        "/dev/nvidia3",
        "/dev/nvidiactl",
    ]


async def expect_status(call: Any, code: grpc.StatusCode) -> str:
    """Await ``call``, expect it to fail with ``code``, return the status details."""
    # Not pytest.raises: a kept AioRpcError keeps its call, and so its connection, alive past the test.
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        got, details = exc.code(), cast(str, exc.details())
    else:
        pytest.fail(f"expected {code}, the call succeeded")
    assert got == code, details
    return details


async def test_allocate_unknown_ids_are_invalid_argument(plugin: Plugin, stub: Any) -> None:
    """Allocate of unknown IDs fails with INVALID_ARGUMENT naming the IDs."""
    details = await expect_status(
        stub.Allocate(allocate_request(plugin.api.pb2, ["GPU-0", "GPU-9", "no-such-gpu"])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "GPU-9" in details
    assert "no-such-gpu" in details
    assert "'GPU-0'" not in details


async def test_allocate_unhealthy_is_failed_precondition(plugin: Plugin, stub: Any) -> None:
    """Allocate of an unhealthy device fails with FAILED_PRECONDITION naming it, and succeeds after recovery."""
    request = allocate_request(plugin.api.pb2, ["GPU-0", "GPU-3"])
    await stub.Allocate(request)
    plugin.backend.push(HealthChanged(gpu="GPU-3", health=Health.UNHEALTHY, reason="XID 79", xid=79))
    await plugin.wait_for_unhealthy(GPU_RESOURCE, {"GPU-3"})
    details = await expect_status(stub.Allocate(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert "GPU-3" in details
    plugin.backend.push(HealthChanged(gpu="GPU-3", health=Health.HEALTHY, reason="reset"))
    await plugin.wait_for_unhealthy(GPU_RESOURCE, set())
    response = await stub.Allocate(request)
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-0,GPU-3"


@pytest.mark.parametrize(
    "containers",
    [
        pytest.param([["GPU-1", "GPU-1"]], id="duplicate"),
        pytest.param([["GPU-0"], ["GPU-2", "GPU-3", "GPU-2"]], id="duplicate-in-second-container"),
        pytest.param([], id="no-containers"),
        pytest.param([[]], id="empty-container"),
        pytest.param([["GPU-0"], []], id="second-container-empty"),
    ],
)
async def test_allocate_malformed_is_invalid_argument(plugin: Plugin, stub: Any, containers: list[list[str]]) -> None:
    """Allocate with duplicated IDs, no container requests or an empty container fails with INVALID_ARGUMENT."""
    await expect_status(stub.Allocate(allocate_request(plugin.api.pb2, *containers)), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    ("available", "must_include", "size", "named"),
    [
        pytest.param(["GPU-0", "GPU-1"], [], 3, None, id="size-above-available"),
        pytest.param(["GPU-0", "GPU-1"], [], 0, None, id="size-zero"),
        pytest.param(["GPU-0", "GPU-1"], [], -1, None, id="size-negative"),
        pytest.param(["GPU-0", "GPU-1"], ["GPU-2"], 1, "GPU-2", id="must-include-not-available"),
        pytest.param(["GPU-0", "GPU-1", "GPU-2"], ["GPU-0", "GPU-1"], 1, None, id="must-include-above-size"),
        pytest.param(["GPU-0", "GPU-7"], [], 1, "GPU-7", id="unknown-available"),
        pytest.param(["GPU-0"], ["GPU-8"], 1, "GPU-8", id="unknown-must-include"),
    ],
)
async def test_impossible_preferred_allocation_is_invalid_argument(
    plugin: Plugin, stub: Any, available: list[str], must_include: list[str], size: int, named: str | None
) -> None:
    """GetPreferredAllocation that no answer can satisfy fails with INVALID_ARGUMENT, naming offending IDs."""
    details = await expect_status(
        stub.GetPreferredAllocation(preferred_request(plugin.api.pb2, available, must_include, size)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    if named is not None:
        assert named in details


async def test_preferred_allocation_without_containers_is_invalid_argument(plugin: Plugin, stub: Any) -> None:
    """GetPreferredAllocation with no container requests fails with INVALID_ARGUMENT."""
    await expect_status(
        stub.GetPreferredAllocation(plugin.api.pb2.PreferredAllocationRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_pre_start_container(grpcio_api: GrpcioApi) -> None:
    """A PreStart backend makes pre_start_required true and receives PreStartContainer; unknown IDs are refused."""
    pb2 = grpcio_api.pb2
    backend = PreStartBackend(gpu_tree(2))
    async with running_plugin(grpcio_api, backend) as running, device_plugin_stub(running) as client:
        assert running.kubelet.requests[0].options.pre_start_required
        options = await client.GetDevicePluginOptions(pb2.Empty())
        assert options.pre_start_required
        assert options.get_preferred_allocation_available
        response = await client.PreStartContainer(pb2.PreStartContainerRequest(devices_ids=["GPU-1", "GPU-0"]))
        assert response == pb2.PreStartContainerResponse()
        assert backend.pre_started == [(GPU_RESOURCE, ["GPU-1", "GPU-0"])]
        details = await expect_status(
            client.PreStartContainer(pb2.PreStartContainerRequest(devices_ids=["GPU-5"])),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "GPU-5" in details
        assert len(backend.pre_started) == 1


async def test_list_and_watch_follows_inventory_changes(plugin: Plugin, stub: Any) -> None:
    """A new tree from the backend (a GPU gone) reaches the ListAndWatch stream as a new full list."""
    call = stub.ListAndWatch(plugin.api.pb2.Empty())
    try:
        async with asyncio.timeout(5):
            assert [d.ID for d in (await call.read()).devices] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
            plugin.backend.replace_tree(gpu_tree(3, replicas=2))
            assert [d.ID for d in (await call.read()).devices] == ["GPU-0", "GPU-1", "GPU-2"]
    finally:
        call.cancel()
