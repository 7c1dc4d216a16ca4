"""The kubelet simulator against a tiny in-test device plugin, over real unix sockets."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpclib
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.server import Server

from gpuplugin.core.model import is_extended_resource_name
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.admission import AdmissionError
from gpuplugin.testing.node import CHECKPOINT_FILE, KUBELET_SOCKET, SimulatorSettings
from gpuplugin.testing.simulator import KubeletSimulator

RESOURCE = "example.com/gpu"
TIMEOUT_S = 5.0


class FakePlugin(v1beta1.DevicePluginBase):
    """Serves a fixed set of devices; health changes and stream ends are pushed through a condition."""

    def __init__(
        self,
        devices: Sequence[str],
        *,
        preferred: bool = True,
        pre_start: bool = False,
        numa: int | None = None,
    ) -> None:
        self.health = dict.fromkeys(devices, "Healthy")
        self.options = v1beta1.DevicePluginOptions(
            pre_start_required=pre_start, get_preferred_allocation_available=preferred
        )
        self.numa = numa
        self.calls: list[str] = []
        self.preferred_answer: list[str] | None = None
        """When set, GetPreferredAllocation answers this instead of the last ``allocation_size`` available IDs."""
        self.allocate_error: grpclib.GRPCError | None = None
        self.allocated: list[list[str]] = []
        self.pre_started: list[list[str]] = []
        self._changed = asyncio.Condition()
        self._version = 0
        self._ended = False
        self._stream_error: grpclib.GRPCError | None = None
        self.server: Server | None = None

    async def serve(self, path: Path) -> None:
        self.server = Server([self])
        await self.server.start(path=str(path))

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def set_health(self, device: str, health: str) -> None:
        async with self._changed:
            self.health[device] = health
            self._version += 1
            self._changed.notify_all()

    async def end_streams(self) -> None:
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def fail_streams(self, error: grpclib.GRPCError) -> None:
        async with self._changed:
            self._stream_error = error
            self._changed.notify_all()

    def _stream_changed(self, sent: int) -> bool:
        return self._ended or self._stream_error is not None or self._version != sent

    async def get_device_plugin_options(self, message: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        self.calls.append("GetDevicePluginOptions")
        return self.options

    async def list_and_watch(self, message: v1beta1.Empty) -> AsyncIterator[v1beta1.ListAndWatchResponse]:
        self.calls.append("ListAndWatch")
        sent = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._stream_changed, sent))
                if self._stream_error is not None:
                    raise self._stream_error
                if self._ended:
                    return
                sent = self._version
                topology = None if self.numa is None else v1beta1.TopologyInfo(nodes=[v1beta1.NumaNode(id=self.numa)])
                response = v1beta1.ListAndWatchResponse(
                    devices=[v1beta1.Device(id=i, health=h, topology=topology) for i, h in self.health.items()]
                )
            yield response

    async def get_preferred_allocation(
        self, message: v1beta1.PreferredAllocationRequest
    ) -> v1beta1.PreferredAllocationResponse:
        self.calls.append("GetPreferredAllocation")
        answers = []
        for request in message.container_requests:
            ids = self.preferred_answer
            if ids is None:
                # The last IDs, so a test can tell a followed hint from the kubelet's first-N fallback.
                ids = request.available_deviceIDs[-request.allocation_size :]
            answers.append(v1beta1.ContainerPreferredAllocationResponse(device_i_ds=ids))
        return v1beta1.PreferredAllocationResponse(container_responses=answers)

    async def allocate(self, message: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        self.calls.append("Allocate")
        if self.allocate_error is not None:
            raise self.allocate_error
        responses = []
        for request in message.container_requests:
            self.allocated.append(list(request.devices_ids))
            responses.append(v1beta1.ContainerAllocateResponse(envs={"DEVICES": ",".join(request.devices_ids)}))
        return v1beta1.AllocateResponse(container_responses=responses)

    async def pre_start_container(self, message: v1beta1.PreStartContainerRequest) -> v1beta1.PreStartContainerResponse:
        self.calls.append("PreStartContainer")
        self.pre_started.append(list(message.devices_ids))
        return v1beta1.PreStartContainerResponse()


async def register(
    directory: Path,
    endpoint: str,
    resource: str = RESOURCE,
    *,
    version: str = "v1beta1",
    options: v1beta1.DevicePluginOptions | None = None,
) -> None:
    """What a plugin does once it serves: call Register on kubelet.sock."""
    channel = Channel(path=str(directory / KUBELET_SOCKET))
    try:
        request = v1beta1.RegisterRequest(version=version, endpoint=endpoint, resource_name=resource, options=options)
        await v1beta1.RegistrationStub(channel).register(request, timeout=TIMEOUT_S)
    finally:
        channel.close()


PluginFactory = Callable[..., Awaitable[FakePlugin]]


@pytest.fixture
async def simulator(workdir: Path) -> AsyncIterator[KubeletSimulator]:
    async with KubeletSimulator(workdir, SimulatorSettings(dial_timeout_s=0.5)) as simulator:
        yield simulator


@pytest.fixture
async def plugins(workdir: Path) -> AsyncIterator[PluginFactory]:
    """Start fake plugins on sockets in the directory; all are closed at the end."""
    started: list[FakePlugin] = []

    async def start(
        endpoint: str, devices: Sequence[str] = ("gpu-0", "gpu-1", "gpu-2"), **kwargs: object
    ) -> FakePlugin:
        plugin = FakePlugin(devices, **kwargs)  # type: ignore[arg-type]
        await plugin.serve(workdir / endpoint)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        await plugin.aclose()


async def registered(
    simulator: KubeletSimulator, plugins: PluginFactory, endpoint: str = "plugin-a.sock", **kwargs: object
) -> FakePlugin:
    """A plugin that serves, registers, and whose first device list the simulator has seen."""
    plugin = await plugins(endpoint, **kwargs)
    count = len(simulator.registrations)
    await register(simulator.directory, endpoint)
    await simulator.wait_registered(RESOURCE, after=count, timeout=TIMEOUT_S)
    await simulator.wait_for(lambda: len(simulator.devices(RESOURCE)) == len(plugin.health), TIMEOUT_S)
    return plugin


def test_extended_resource_names() -> None:
    """Only domain/name outside kubernetes.io counts as an extended resource, as in v1helper."""
    assert is_extended_resource_name("nvidia.com/gpu")
    assert is_extended_resource_name("nvidia.com/mig-1g.18gb")
    assert not is_extended_resource_name("gpu")
    assert not is_extended_resource_name("kubernetes.io/gpu")
    assert not is_extended_resource_name("foo.kubernetes.io/gpu")
    assert not is_extended_resource_name("Example.com/gpu")
    assert not is_extended_resource_name("example.com/a/b")
    assert not is_extended_resource_name("/gpu")
    assert not is_extended_resource_name("example.com/" + "x" * 64)


async def test_register_asks_options_first(simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path) -> None:
    """Register returns only after GetDevicePluginOptions was answered, then ListAndWatch opens."""
    plugin = await plugins("plugin-a.sock", pre_start=True)
    await register(workdir, "plugin-a.sock")
    assert plugin.calls[0] == "GetDevicePluginOptions"
    [registration] = simulator.registrations
    assert registration.resource == RESOURCE
    assert registration.endpoint == "plugin-a.sock"
    assert registration.options.pre_start_required
    assert registration.options.get_preferred_allocation_available
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 3, TIMEOUT_S)
    assert simulator.stream_open(RESOURCE)
    assert plugin.calls[:2] == ["GetDevicePluginOptions", "ListAndWatch"]
    assert simulator.devices(RESOURCE) == {"gpu-0": "Healthy", "gpu-1": "Healthy", "gpu-2": "Healthy"}


@pytest.mark.parametrize(
    ("version", "resource", "reason"),
    [
        ("v1alpha", RESOURCE, "not supported"),
        ("v1beta1", "gpu", "is invalid"),
        ("v1beta1", "kubernetes.io/gpu", "is invalid"),
    ],
)
async def test_bad_registration_rejected(
    simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path, version: str, resource: str, reason: str
) -> None:
    """A wrong version or a non-extended resource name gets a gRPC error and no connection."""
    plugin = await plugins("plugin-a.sock")
    with pytest.raises(grpclib.GRPCError) as caught:
        await register(workdir, "plugin-a.sock", resource, version=version)
    assert caught.value.status is Status.UNKNOWN
    assert reason in (caught.value.message or "")
    assert simulator.registrations == []
    assert [r.resource for r in simulator.rejections] == [resource]
    assert plugin.calls == []


async def test_unreachable_endpoint_rejected(simulator: KubeletSimulator, workdir: Path) -> None:
    """Register fails when the plugin's socket cannot be dialled within the dial timeout."""
    with pytest.raises(grpclib.GRPCError, match="failed to dial"):
        await register(workdir, "missing.sock")
    assert simulator.registrations == []


async def test_list_and_watch_tracks_health(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """Health changes pushed on the stream update allocatable, recovery included, and carry NUMA topology."""
    plugin = await registered(simulator, plugins, numa=1)
    assert simulator.device_states(RESOURCE)["gpu-0"].numa_nodes == (1,)
    await plugin.set_health("gpu-1", "Unhealthy")
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 2, TIMEOUT_S)
    assert simulator.devices(RESOURCE)["gpu-1"] == "Unhealthy"
    assert simulator.capacity(RESOURCE) == 3
    await plugin.set_health("gpu-1", "Healthy")
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 3, TIMEOUT_S)


async def test_admit_prefers_then_allocates(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """Admission asks GetPreferredAllocation, follows its hint in Allocate and marks the devices in use."""
    plugin = await registered(simulator, plugins)
    admission = await simulator.admit("pod-a", [{RESOURCE: 2}])
    assert plugin.calls[-2:] == ["GetPreferredAllocation", "Allocate"]
    [container] = admission.containers
    allocation = container.allocations[RESOURCE]
    assert allocation.device_ids == ("gpu-1", "gpu-2")
    assert allocation.preferred == ("gpu-1", "gpu-2")
    assert plugin.allocated == [["gpu-1", "gpu-2"]]
    assert allocation.response.envs == {"DEVICES": "gpu-1,gpu-2"}
    assert allocation.preferred_allocation_s is not None
    assert allocation.preferred_allocation_s >= 0
    assert allocation.allocate_s >= 0
    assert simulator.in_use(RESOURCE) == {"gpu-1", "gpu-2"}
    assert simulator.free(RESOURCE) == 1
    assert simulator.allocatable(RESOURCE) == 3
    assert simulator.warnings == []


async def test_admit_without_preferred_takes_first(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """Without the option, GetPreferredAllocation is not called and the first free devices are taken."""
    plugin = await registered(simulator, plugins, preferred=False)
    admission = await simulator.admit("pod-a", [{RESOURCE: 1}, {RESOURCE: 1}])
    assert "GetPreferredAllocation" not in plugin.calls
    assert [c.device_ids(RESOURCE) for c in admission.containers] == [("gpu-0",), ("gpu-1",)]
    assert admission.containers[0].allocations[RESOURCE].preferred_allocation_s is None


async def test_bad_preferred_answer_falls_back(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """A preferred answer of the wrong size or with unknown IDs is only a hint: recorded, and filled from free."""
    plugin = await registered(simulator, plugins)
    plugin.preferred_answer = ["gpu-9", "gpu-2"]
    admission = await simulator.admit("pod-a", [{RESOURCE: 2}])
    assert admission.device_ids(RESOURCE) == ("gpu-2", "gpu-0")
    assert len(simulator.warnings) == 1


async def test_pre_start_called(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """With pre_start_required, PreStartContainer gets each container's devices after Allocate."""
    plugin = await registered(simulator, plugins, pre_start=True)
    admission = await simulator.admit("pod-a", [{RESOURCE: 1}])
    assert plugin.calls[-1] == "PreStartContainer"
    assert plugin.pre_started == [list(admission.device_ids(RESOURCE))]
    assert admission.containers[0].allocations[RESOURCE].pre_start_s is not None


async def test_not_enough_devices(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """Asking for more free healthy devices than there are fails admission without calling the plugin."""
    plugin = await registered(simulator, plugins)
    await plugin.set_health("gpu-0", "Unhealthy")
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 2, TIMEOUT_S)
    await simulator.admit("pod-a", [{RESOURCE: 1}])
    calls = len(plugin.calls)
    with pytest.raises(AdmissionError, match="Requested: 2, Available: 1") as caught:
        await simulator.admit("pod-b", [{RESOURCE: 2}])
    assert caught.value.status is None
    assert len(plugin.calls) == calls
    assert simulator.pods() == ["pod-a"]


async def test_unregistered_resource(simulator: KubeletSimulator) -> None:
    """A resource no plugin registered fails admission."""
    with pytest.raises(AdmissionError, match="unregistered"):
        await simulator.admit("pod-a", [{RESOURCE: 1}])


async def test_allocate_error_frees_pod(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """A gRPC error from Allocate fails admission with the plugin's status and frees what the pod took."""
    plugin = await registered(simulator, plugins)
    plugin.allocate_error = grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, "no memory on gpu")
    with pytest.raises(AdmissionError) as caught:
        await simulator.admit("pod-a", [{RESOURCE: 1}, {RESOURCE: 1}])
    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert "no memory on gpu" in caught.value.message
    assert simulator.in_use(RESOURCE) == set()
    assert simulator.pods() == []


async def test_remove_pod_frees(simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path) -> None:
    """Removing a pod frees its devices and rewrites the checkpoint."""
    await registered(simulator, plugins)
    await simulator.admit("pod-a", [{RESOURCE: 3}])
    assert simulator.free(RESOURCE) == 0
    await simulator.remove_pod("pod-a")
    assert simulator.free(RESOURCE) == 3
    assert json.loads((workdir / CHECKPOINT_FILE).read_text()) == {}
    await simulator.remove_pod("pod-a")


async def test_checkpoint_written(simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path) -> None:
    """After admission the checkpoint maps pod to container to resource to device IDs."""
    await registered(simulator, plugins, preferred=False)
    await simulator.admit("pod-a", [{RESOURCE: 2}, {}])
    checkpoint = json.loads((workdir / CHECKPOINT_FILE).read_text())
    # As upstream, only containers that got devices appear.
    assert checkpoint == {"pod-a": {"container-0": {RESOURCE: ["gpu-0", "gpu-1"]}}}
    assert [n for n in await asyncio.to_thread(os.listdir, workdir) if n.startswith(".")] == []


async def test_newest_registration_wins(simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path) -> None:
    """A second registration for a resource replaces the first; the old stream is closed without zeroing anything."""
    await registered(simulator, plugins, "plugin-a.sock")
    newer = await plugins("plugin-b.sock", ("gpu-x",))
    await register(workdir, "plugin-b.sock")
    await simulator.wait_for(lambda: simulator.devices(RESOURCE) == {"gpu-x": "Healthy"}, TIMEOUT_S)
    assert [r.endpoint for r in simulator.registrations] == ["plugin-a.sock", "plugin-b.sock"]
    assert simulator.stream_ends == []
    admission = await simulator.admit("pod-a", [{RESOURCE: 1}])
    assert admission.device_ids(RESOURCE) == ("gpu-x",)
    assert newer.allocated == [["gpu-x"]]


async def test_stream_end_zeroes_allocatable(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """When ListAndWatch ends every device counts as unhealthy and the end is recorded."""
    plugin = await registered(simulator, plugins)
    await plugin.end_streams()
    await simulator.wait_for(lambda: not simulator.stream_open(RESOURCE), TIMEOUT_S)
    assert simulator.allocatable(RESOURCE) == 0
    assert simulator.capacity(RESOURCE) == 3
    [end] = simulator.stream_ends
    assert end.resource == RESOURCE
    assert end.error is None
    with pytest.raises(AdmissionError):
        await simulator.admit("pod-a", [{RESOURCE: 1}])


async def test_stream_error_zeroes_allocatable(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """A ListAndWatch that fails with a gRPC error is recorded with the status and allocatable drops to 0."""
    plugin = await registered(simulator, plugins)
    await plugin.fail_streams(grpclib.GRPCError(Status.UNAVAILABLE, "driver gone"))
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 0, TIMEOUT_S)
    [end] = simulator.stream_ends
    assert end.error is not None
    assert "UNAVAILABLE" in end.error
    with pytest.raises(LookupError):
        simulator.stub(RESOURCE)


async def test_restart(simulator: KubeletSimulator, plugins: PluginFactory, workdir: Path) -> None:
    """A restart wipes sockets but not the checkpoint, keeps pods' devices, and accepts re-registration."""
    await registered(simulator, plugins, "plugin-a.sock", preferred=False)
    await simulator.admit("pod-a", [{RESOURCE: 1}])
    (workdir / "subdir").mkdir()
    (workdir / "stale-file").write_text("x")
    count = len(simulator.registrations)

    restart = await simulator.restart()

    names = sorted(await asyncio.to_thread(os.listdir, workdir))
    assert names == sorted([CHECKPOINT_FILE, KUBELET_SOCKET, "subdir"])
    assert simulator.devices(RESOURCE) == {}
    assert simulator.allocatable(RESOURCE) == 0
    assert simulator.in_use(RESOURCE) == {"gpu-0"}
    assert not simulator.stream_open(RESOURCE)
    with pytest.raises(AdmissionError):
        await simulator.admit("pod-b", [{RESOURCE: 1}])

    await plugins("plugin-a-2.sock", preferred=False)
    await register(workdir, "plugin-a-2.sock")
    registration = await simulator.wait_registered(RESOURCE, after=count, timeout=TIMEOUT_S)
    assert registration.endpoint == "plugin-a-2.sock"
    assert registration.monotonic_s >= restart.served_monotonic_s >= restart.started_monotonic_s
    assert simulator.restarts == [restart]
    await simulator.wait_for(lambda: simulator.allocatable(RESOURCE) == 3, TIMEOUT_S)
    assert simulator.free(RESOURCE) == 2
    admission = await simulator.admit("pod-b", [{RESOURCE: 1}])
    assert admission.device_ids(RESOURCE) == ("gpu-1",)


async def test_stub_calls_plugin(simulator: KubeletSimulator, plugins: PluginFactory) -> None:
    """stub() reaches the registered plugin directly over the simulator's connection."""
    await registered(simulator, plugins, pre_start=True)
    options = await simulator.stub(RESOURCE).get_device_plugin_options(timeout=TIMEOUT_S)
    assert options.pre_start_required
    with pytest.raises(LookupError):
        simulator.stub("example.com/other")


async def test_wait_for_times_out(simulator: KubeletSimulator) -> None:
    """wait_for raises TimeoutError rather than hanging when the condition never holds."""
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await simulator.wait_for(lambda: False, 0.05)
    assert time.monotonic() - began < 1.0


async def test_aclose_removes_socket(workdir: Path, plugins: PluginFactory) -> None:
    """Closing the simulator drops plugin streams, stops serving and removes kubelet.sock."""
    simulator = KubeletSimulator(workdir, SimulatorSettings(dial_timeout_s=0.5))
    await simulator.start()
    plugin = await registered(simulator, plugins)
    await simulator.aclose()
    assert not (workdir / KUBELET_SOCKET).exists()
    assert plugin.calls.count("ListAndWatch") == 1
    await simulator.aclose()
