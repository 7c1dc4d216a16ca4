"""Test doubles shared by the tests: a static backend, an N-GPU device tree, a recording kubelet, and waiting on a
backend."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

from grpclib.server import Server

from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import AllocationPolicyKind, Backend, BackendEvent, InventoryChanged
from gpuplugin.core.model import (
    ContainerSpec,
    Device,
    DeviceNode,
    DeviceTree,
    Health,
    Link,
    Mount,
    PCIeLevel,
    frozen_mapping,
    links_from_pairs,
)
from gpuplugin.daemon.manager import Manager, ManagerSettings, ServerFactory, TreeSink, TreeTransform
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import ResourceServer, ServerSettings
from gpuplugin.kubelet.watcher import WatcherSettings
from gpuplugin.testing.simulator import KubeletSimulator

GPU_RESOURCE = "example.com/gpu"
SHARED_RESOURCE = "example.com/gpu.shared"
#: Device nodes and mounts every GPU's container needs; a merge must list them once.
SHARED_NODES = (DeviceNode("/dev/null", "/dev/nvidiactl"), DeviceNode("/dev/null", "/dev/nvidia-uvm"))
SHARED_MOUNT = Mount("/usr/lib/fake-nvidia", "/usr/local/nvidia")


def gpu_spec(gpu: str, index: int) -> ContainerSpec:
    """What a container needs for GPU number ``index`` (whose ID is ``gpu``)."""
    return ContainerSpec(
        env=frozen_mapping({"FAKE_DRIVER": "1"}),
        list_env=frozen_mapping({"NVIDIA_VISIBLE_DEVICES": gpu}),
        device_nodes=(DeviceNode("/dev/null", f"/dev/nvidia{index}", "rw"), *SHARED_NODES),
        mounts=(SHARED_MOUNT,),
        annotations=frozen_mapping({f"example.com/{gpu}": f"index={index}"}),
        cdi_devices=(f"example.com/gpu={gpu}",),
    )


def gpu_tree(count: int, *, numa_nodes: int = 2, replicas: int = 0, unhealthy: Sequence[int] = ()) -> DeviceTree:
    """``count`` GPUs ``GPU-<i>`` under GPU_RESOURCE, spread over ``numa_nodes`` NUMA nodes (0: none reported).

    GPUs 2k and 2k+1 share two NVLinks; other GPUs on one NUMA node share a host bridge, the rest only the
    SMP interconnect. With ``replicas`` > 0, each GPU is also served ``replicas`` times as ``GPU-<i>::<r>``
    under SHARED_RESOURCE.
    """
    gpus = [f"GPU-{i}" for i in range(count)]

    def numa(i: int) -> int | None:
        return i * numa_nodes // count if numa_nodes else None

    devices = [
        Device(
            id=gpu,
            resource=GPU_RESOURCE,
            gpu=gpu,
            spec=gpu_spec(gpu, i),
            numa_node=numa(i),
            attributes=frozen_mapping({"index": str(i)}),
        )
        for i, gpu in enumerate(gpus)
    ]
    devices += [
        Device(id=f"{gpu}::{r}", resource=SHARED_RESOURCE, gpu=gpu, spec=gpu_spec(gpu, i), numa_node=numa(i))
        for i, gpu in enumerate(gpus)
        for r in range(replicas)
    ]
    devices = [d if int(d.gpu.split("-")[1]) not in unhealthy else _unhealthy(d) for d in devices]
    pairs = []
    for i in range(count):
        for j in range(i + 1, count):
            if i // 2 == j // 2:
                link = Link(nvlinks=2, pcie=PCIeLevel.HOSTBRIDGE)
            elif numa(i) is not None and numa(i) == numa(j):
                link = Link(pcie=PCIeLevel.HOSTBRIDGE)
            else:
                link = Link(pcie=PCIeLevel.SYSTEM)
            pairs.append((gpus[i], gpus[j], link))
    return DeviceTree(devices=tuple(devices), links=links_from_pairs(pairs))


def _unhealthy(device: Device) -> Device:
    return replace(device, health=Health.UNHEALTHY)


class StaticBackend:
    """A backend serving a fixed tree (replaceable with ``replace_tree``) and the events tests ``push``."""

    name = "static"

    def __init__(
        self,
        tree: DeviceTree,
        policies: Mapping[str, AllocationPolicyKind] | None = None,
    ) -> None:
        self.tree = tree
        self.policies = dict(policies or {SHARED_RESOURCE: AllocationPolicyKind.DISTRIBUTED})
        self._events: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self.started = 0
        self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def discover(self) -> DeviceTree:
        return self.tree

    async def events(self) -> AsyncIterator[BackendEvent]:
        while True:
            yield await self._events.get()

    async def aclose(self) -> None:
        self.closed += 1

    def allocation_policy(self, resource: str) -> AllocationPolicyKind:
        return self.policies.get(resource, AllocationPolicyKind.TOPOLOGY)

    def push(self, event: BackendEvent) -> None:
        """Hand the manager an event, as a real backend's event stream would."""
        self._events.put_nowait(event)

    def replace_tree(self, tree: DeviceTree) -> None:
        """Serve ``tree`` from now on, and tell the manager so."""
        self.tree = tree
        self.push(InventoryChanged(tree))


class PreStartBackend(StaticBackend):
    """A StaticBackend with the PreStart capability; it records every call."""

    def __init__(self, tree: DeviceTree, policies: Mapping[str, AllocationPolicyKind] | None = None) -> None:
        super().__init__(tree, policies)
        self.pre_started: list[tuple[str, list[str]]] = []

    async def pre_start_container(self, resource: str, device_ids: Sequence[str]) -> None:
        self.pre_started.append((resource, list(device_ids)))


class RecordingKubelet(api.RegistrationBase):
    """The kubelet's Registration service, reduced to recording what it is sent."""

    def __init__(self) -> None:
        self.requests: list[api.RegisterRequest] = []
        self._arrived = asyncio.Condition()

    async def register(self, message: api.RegisterRequest) -> api.Empty:
        async with self._arrived:
            self.requests.append(message)
            self._arrived.notify_all()
        return api.Empty()

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> list[api.RegisterRequest]:
        """Wait until ``count`` registrations arrived in all; return them."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    def endpoint(self, resource: str) -> str:
        """The endpoint of the latest registration of ``resource``."""
        return next(r.endpoint for r in reversed(self.requests) if r.resource_name == resource)


@asynccontextmanager
async def serve_kubelet(directory: Path) -> AsyncIterator[RecordingKubelet]:
    """Serve a RecordingKubelet on ``<directory>/kubelet.sock`` while the block runs."""
    kubelet = RecordingKubelet()
    server = Server([kubelet])
    await server.start(path=str(directory / "kubelet.sock"))
    try:
        yield kubelet
    finally:
        server.close()
        await server.wait_closed()


@contextmanager
def short_tmp_dir() -> Iterator[Path]:
    """A fresh directory under /tmp whose path is short enough for unix sockets (107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="gp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def next_event(backend: Backend, timeout_s: float = 2.0) -> BackendEvent:
    """The next event of a fresh ``backend.events()`` stream, closed after it; TimeoutError if none comes in time."""
    stream = backend.events()
    try:
        return await asyncio.wait_for(anext(stream), timeout_s)
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


async def until(predicate: Callable[[], object], timeout_s: float = 2.0) -> None:
    """Poll for state nothing announces (a backend's counters, what a fake NVML has registered)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def mock_manager(
    directory: Path,
    options: Mapping[str, object] | None = None,
    *,
    inotify: bool = True,
    plugins_registry_dir: Path | None = None,
    server_factory: ServerFactory = ResourceServer,
    transforms: Sequence[TreeTransform] = (),
    sinks: Sequence[TreeSink] = (),
) -> Manager:
    """A Manager over the mock backend serving in ``directory`` (its control socket there too): partitions heal
    after 50 ms of quiet, the kubelet directory is polled every 50 ms where inotify is off."""
    backend = create_mock(
        BackendContext(
            options={"control_socket": str(directory / "mock.sock"), **(options or {})},
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=directory,
        )
    )
    server = ServerSettings(kubelet_dir=directory)
    if plugins_registry_dir is not None:
        server = replace(server, plugins_registry_dir=plugins_registry_dir)
    settings = ManagerSettings(server=server, watcher=WatcherSettings(use_inotify=inotify, poll_interval_s=0.05))
    return Manager(backend, settings, server_factory=server_factory, transforms=transforms, sinks=sinks)


@asynccontextmanager
async def registered_manager(
    backend: Backend, directory: Path, resources: Sequence[str]
) -> AsyncIterator[tuple[KubeletSimulator, Manager]]:
    """The manager over ``backend`` beside the kubelet simulator in ``directory``: every resource registered and
    allocatable before it is yielded; the manager closed after."""
    settings = ManagerSettings(
        server=ServerSettings(kubelet_dir=directory), watcher=WatcherSettings(poll_interval_s=0.05)
    )
    async with KubeletSimulator(directory) as kubelet:
        manager = Manager(backend, settings)
        await manager.start()
        try:
            for resource in resources:
                await kubelet.wait_registered(resource, timeout=5)
            await kubelet.wait_for(lambda: all(kubelet.allocatable(r) > 0 for r in resources), timeout=5)
            yield kubelet, manager
        finally:
            await manager.aclose()
