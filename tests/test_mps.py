"""MPS: ``sharing.mps`` replicas, MPS partitions of GPUs without MIG, and the supervised control daemons
(a stand-in control program, tests/fake_mps_control.py, in place of ``nvidia-cuda-mps-control``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.exceptions import GRPCError

from gpuplugin.backends.mock import MockBackend
from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.fake import FakeMigDevice, FakeNvml, h200_node, write_mig_capabilities
from gpuplugin.backends.partitioned import PartitionedBackend, PartitionedSettings, create
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import InventoryChanged
from gpuplugin.core.errors import ConfigError, DevicesRefuseConfig
from gpuplugin.core.model import DeviceTree, Health, frozen_mapping
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.daemon.settings import Overrides, resolve
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.devices.mps import (
    LOG_DIRECTORY,
    MEMORY_LIMIT,
    MPS_GPU_ATTRIBUTE,
    PIPE_DIRECTORY,
    THREAD_PERCENTAGE,
    ControlDaemons,
    ControlDaemonSettings,
    MpsBackend,
    MpsSharing,
)
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.kubelet.watcher import WatcherSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fake_mps_control import PID_FILE
from tests.fakes import GPU_RESOURCE, gpu_tree, registered_manager, until

FAKE_CONTROL = str(Path(__file__).with_name("fake_mps_control.py"))
SMALL = "nvidia.com/mig-1g.18gb"
LARGE = "nvidia.com/mig-3g.71gb"
HALF = "nvidia.com/mig-4g.71gb"


def daemon_options(root: Path, **extra: Any) -> dict[str, Any]:
    """Partitioned ``mps`` options: the stand-in control program, probed every 50 ms."""
    return {"root": str(root), "command": [sys.executable, FAKE_CONTROL], "probe_interval_s": 0.05, **extra}


def daemon_settings(root: Path) -> ControlDaemonSettings:
    return ControlDaemonSettings.from_mapping(daemon_options(root), "mps")


def daemon_pid(root: Path, uuid: str) -> int:
    return int((root / uuid / "pipe" / PID_FILE).read_text())


# sharing.mps: NVIDIA's config, the replicas and their specs.

NVIDIA_MPS = {"renameByDefault": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}


def nvml_backend(gpus: int = 2) -> NvmlBackend:
    """The NVML backend on the fake H200 node."""
    return NvmlBackend(NvmlSettings(driver_root="/nonexistent"), HealthPolicy(), h200_node(gpus))


def test_daemon_settings_read_in_either_spelling() -> None:
    """``daemon`` keys read as camelCase (``sharing.mps``) or as the settings' names (partitioned), delays included."""
    camel = {"probeIntervalSeconds": 1, "firstRestartDelaySeconds": 2, "maxRestartDelaySeconds": 60, "command": "a b"}
    snake = {"probe_interval_s": 1, "first_restart_delay_s": 2, "max_restart_delay_s": 60, "command": ["a", "b"]}
    expected = ControlDaemonSettings(
        command=("a", "b"), probe_interval_s=1.0, first_restart_delay_s=2.0, max_restart_delay_s=60.0
    )
    assert ControlDaemonSettings.from_mapping(camel, "d") == ControlDaemonSettings.from_mapping(snake, "d") == expected
    with pytest.raises(ConfigError, match=r"^partitioned\.mps\.first_restart_delay_s: must be at most max_restart"):
        ControlDaemonSettings.from_mapping({"first_restart_delay_s": 31}, "partitioned.mps")


def test_nvidia_mps_config_is_accepted_as_it_is() -> None:
    """NVIDIA's ``sharing.mps`` (renameByDefault, resources with replicas) loads into MPS sharing, with mpsRoot."""
    settings = resolve(Overrides(), {"sharing": {"mps": NVIDIA_MPS}, "flags": {"mpsRoot": "/var/mps"}}, {}, "f")
    assert settings.mps is not None and settings.sharing is None
    assert settings.mps.replicas.served_name(settings.mps.replicas.resources[0]) == "nvidia.com/gpu.shared"
    assert settings.mps.daemons.root == Path("/var/mps")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"sharing": {"mps": NVIDIA_MPS, "timeSlicing": NVIDIA_MPS}},
            "f: sharing.mps: cannot be combined with sharing.timeSlicing",
        ),
        (
            {"sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2, "memoryLimitMiB": 0}]}}},
            "f: sharing.mps.resources[0].memoryLimitMiB: must be an integer from 1 to 1048576 (MiB), got 0",
        ),
        (
            {
                "sharing": {
                    "mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2, "activeThreadPercentage": 101}]}
                }
            },
            (
                "f: sharing.mps.resources[0].activeThreadPercentage: "
                "must be an integer from 1 to 100 (percent of the GPU's SMs), got 101"
            ),
        ),
        (
            {"sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 1}]}}},
            "f: sharing.mps.resources[0].replicas",
        ),
        (
            {"sharing": {"mps": NVIDIA_MPS}, "flags": {"mpsRoot": "run/mps"}},
            "f: flags.mpsRoot: must be an absolute path",
        ),
        ({"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"probeIntervalSeconds": 0}}}}, "f: sharing.mps.daemon.probe"),
        (
            {"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"answerTimeoutSeconds": float("inf")}}}},
            "f: sharing.mps.daemon.answerTimeoutSeconds: must be a number above 0 and at most 3600 (seconds), got inf",
        ),
        (
            {"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"maxRestartDelaySeconds": 7200}}}},
            (
                "f: sharing.mps.daemon.maxRestartDelaySeconds: "
                "must be a number above 0 and at most 3600 (seconds), got 7200"
            ),
        ),
        (
            {"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"firstRestartDelaySeconds": 40}}}},
            "f: sharing.mps.daemon.firstRestartDelaySeconds: must be at most maxRestartDelaySeconds (30), got 40",
        ),
        (
            {"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"probeInterval": 5}}}},
            "f: sharing.mps.daemon.probeInterval: unknown setting (known: answerTimeoutSeconds, command, ",
        ),
        (
            {"sharing": {"mps": {**NVIDIA_MPS, "daemon": {"command": []}}}},
            "f: sharing.mps.daemon.command: expected list of length >= 1, got []",
        ),
    ],
)
def test_bad_mps_config_names_the_field(config: Mapping[str, Any], message: str) -> None:
    """A bad ``sharing.mps`` setting fails with one line naming the field."""
    with pytest.raises(ConfigError) as caught:
        resolve(Overrides(), config, {}, "f")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


async def test_replicas_split_memory_and_threads_equally(workdir: Path) -> None:
    """Each MPS replica names its GPU and gets an equal share: memory / N, 100 / N percent, pipe dir mounted."""
    backend = nvml_backend()
    await backend.start()
    try:
        tree = await backend.discover()
    finally:
        await backend.aclose()
    sharing = MpsSharing.from_mapping(NVIDIA_MPS, root=workdir)
    served = sharing.apply(tree)
    replicas = served.of("nvidia.com/gpu.shared")
    assert len(replicas) == 8
    first = replicas[0]
    uuid = first.attributes["uuid"]
    assert first.spec.list_env["NVIDIA_VISIBLE_DEVICES"] == uuid == first.attributes[MPS_GPU_ATTRIBUTE]
    pipe = str(workdir / uuid / "pipe")
    assert dict(first.spec.env) == {
        PIPE_DIRECTORY: pipe,
        LOG_DIRECTORY: str(workdir / uuid / "log"),
        THREAD_PERCENTAGE: "25",
        MEMORY_LIMIT: f"0={143771 // 4}M",
    }
    assert [(m.host_path, m.container_path, m.read_only) for m in first.spec.mounts] == [(pipe, pipe, False)]
    assert served.rules_of("nvidia.com/gpu.shared").max_devices_per_container == 1


def test_explicit_limits_apply_and_oversubscription_is_refused() -> None:
    """Explicit memoryLimitMiB and activeThreadPercentage replace the equal split; more memory than the GPU fails."""
    device = gpu_tree(1).devices[0]
    tree = DeviceTree(devices=(dataclasses.replace(device, attributes=frozen_mapping({"memory_mib": "1000"})),))
    entry = {"name": GPU_RESOURCE, "replicas": 3, "memoryLimitMiB": 300, "activeThreadPercentage": 50}
    served = MpsSharing.from_mapping({"resources": [entry]}).apply(tree)
    assert {(d.spec.env[MEMORY_LIMIT], d.spec.env[THREAD_PERCENTAGE]) for d in served.devices} == {("0=300M", "50")}
    too_much = MpsSharing.from_mapping({"resources": [{**entry, "memoryLimitMiB": 400}]})
    with pytest.raises(
        DevicesRefuseConfig, match=r"sharing\.mps\.resources\[0\]\.memoryLimitMiB: 3 replicas of 400 MiB"
    ):
        too_much.apply(tree)


async def test_mps_backend_supervises_a_daemon_per_shared_gpu(workdir: Path) -> None:
    """sharing.mps starts one control daemon per shared GPU, serves its replicas Healthy, and quits them on close."""
    sharing = MpsSharing.from_mapping({**NVIDIA_MPS, "daemon": daemon_options(workdir)})
    backend = MpsBackend(nvml_backend(), sharing)
    await backend.start()
    try:
        tree = await backend.discover()
        uuids = {d.attributes[MPS_GPU_ATTRIBUTE] for d in tree.devices}
        assert len(uuids) == 2 and all(d.health is Health.HEALTHY for d in tree.devices)
        pids = [daemon_pid(workdir, uuid) for uuid in uuids]
        assert all(s.answering and s.last_start_s is not None for s in backend.daemons.states().values())
    finally:
        await backend.aclose()
    assert not any((workdir / uuid / "pipe" / PID_FILE).exists() for uuid in uuids)
    assert all(not _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_mps_sharing_over_the_mock_starts_no_daemon(workdir: Path) -> None:
    """Over the mock (kind) MPS replicas carry their environment but no control daemon is started."""
    from gpuplugin.backends.mock import create as create_mock

    mock = create_mock(
        BackendContext(options={"gpus": 2, "control_socket": str(workdir / "m.sock")}, state_dir=workdir)
    )
    backend = MpsBackend(mock, MpsSharing.from_mapping({**NVIDIA_MPS, "daemon": daemon_options(workdir)}))
    await backend.start()
    try:
        tree = await backend.discover()
        assert len(tree.devices) == 8 and all(MEMORY_LIMIT in d.spec.env for d in tree.devices)
        assert backend.daemons.daemons == {} and {d.health for d in tree.devices} == {Health.HEALTHY}
    finally:
        await backend.aclose()


async def test_daemon_that_cannot_start_leaves_its_devices_unhealthy(workdir: Path) -> None:
    """A control program that is missing does not stop the start: the GPU's MPS devices are served Unhealthy."""
    options = {**daemon_options(workdir), "command": str(workdir / "missing")}
    backend = MpsBackend(nvml_backend(1), MpsSharing.from_mapping({**NVIDIA_MPS, "daemon": options}))
    await backend.start()
    try:
        tree = await backend.discover()
        assert {d.health for d in tree.devices} == {Health.UNHEALTHY}
        assert "missing" in str(next(iter(backend.daemons.states().values())).last_error)
    finally:
        await backend.aclose()


# Partitions of GPUs without MIG: MPS partitions.


def nvml_partitioned(fake: FakeNvml, root: Path, **options: Any) -> PartitionedBackend:
    settings = PartitionedSettings.from_options({"parent": "nvml", "mps": daemon_options(root), **options})
    nvml = NvmlSettings(report_mig_devices=True, driver_root=str(root), event_wait_timeout_ms=50)
    return PartitionedBackend(settings, NvmlBackend(nvml, HealthPolicy(), fake))


@asynccontextmanager
async def started(backend: PartitionedBackend) -> AsyncIterator[PartitionedBackend]:
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_partitions_without_mig_are_mps_partitions_of_the_real_gpu(workdir: Path) -> None:
    """Over NVML a GPU without MIG is sliced into MPS partitions: its UUID, profile memory and compute share, no
    MIG UUIDs and no capability nodes."""
    fake = h200_node(1)
    uuid = fake.gpus[0].uuid
    async with started(nvml_partitioned(fake, workdir, layout=["3g.71gb", "4g.71gb"])) as backend:
        tree = await backend.discover()
    assert tree.resources == (HALF, LARGE)
    large, half = tree.of(LARGE)[0], tree.of(HALF)[0]
    for device, memory, threads in ((large, 71424, "42"), (half, 71424, "57")):
        assert device.id.startswith(f"{uuid}::mps") and not device.id.startswith("MIG-")
        assert device.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": uuid}
        assert device.spec.env[MEMORY_LIMIT] == f"0={memory}M"
        assert device.spec.env[THREAD_PERCENTAGE] == threads
        assert device.spec.env[PIPE_DIRECTORY] == str(workdir / uuid / "pipe")
        assert not any("nvidia-caps" in n.container_path for n in device.spec.device_nodes)
        assert "simulated" not in device.attributes and device.attributes["isolation"] == "mps"
        assert device.health is Health.HEALTHY
    assert tree.rules_of(LARGE).max_devices_per_container == 1


async def test_seven_small_partitions_each_get_a_seventh(workdir: Path) -> None:
    """``all-1g.18gb`` over a GPU without MIG gives 7 MPS partitions of 16384 MiB and 14 % each, one daemon."""
    fake = h200_node(1)
    async with started(nvml_partitioned(fake, workdir)) as backend:
        tree = await backend.discover()
        assert len(backend.daemons.daemons) == 1
    assert len(tree.of(SMALL)) == 7
    assert {(d.spec.env[MEMORY_LIMIT], d.spec.env[THREAD_PERCENTAGE]) for d in tree.devices} == {("0=16384M", "14")}


async def test_real_mig_stays_beside_mps_partitions(workdir: Path) -> None:
    """A MIG-enabled GPU keeps its real MIG devices (UUIDs, caps nodes); the GPU without MIG gets MPS partitions."""
    fake = h200_node(2)
    gpu = fake.gpus[0]
    gpu.mig_mode = FakeNvml.NVML_DEVICE_MIG_ENABLE
    mig = "MIG-aaaaaaaa-1111-5111-8111-000000000001"
    gpu.mig_devices = [FakeMigDevice(mig, 1, 0, 3, 71424)]
    write_mig_capabilities(workdir, gpu)
    async with started(nvml_partitioned(fake, workdir, layout=["3g.71gb"])) as backend:
        tree = await backend.discover()
        assert list(backend.daemons.daemons) == [fake.gpus[1].uuid]
    real, mps = tree.of(LARGE)
    assert (
        real.id == mig and real.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": mig} and MEMORY_LIMIT not in real.spec.env
    )
    assert any("nvidia-caps" in n.container_path for n in real.spec.device_nodes)
    assert mps.spec.list_env == {"NVIDIA_VISIBLE_DEVICES": fake.gpus[1].uuid} and MEMORY_LIMIT in mps.spec.env


async def test_mock_parent_keeps_simulating(workdir: Path) -> None:
    """Over the mock (kind clusters) partitions stay simulated MIG devices and no daemon is started."""
    backend = create(
        BackendContext(options={"parent_options": {"gpus": 1}, "mps": daemon_options(workdir)}, state_dir=workdir)
    )
    async with started(backend):
        tree = await backend.discover()
        assert backend.daemons.daemons == {}
    assert all(d.id.startswith("MIG-") and d.attributes["simulated"] == "true" for d in tree.devices)
    assert all(MEMORY_LIMIT not in d.spec.env for d in tree.devices)


async def test_killed_daemon_makes_partitions_unhealthy_until_restarted(workdir: Path) -> None:
    """A control daemon that dies turns its GPU's MPS partitions Unhealthy; restarted, they come back Healthy."""
    fake = h200_node(1)
    uuid = fake.gpus[0].uuid
    async with started(nvml_partitioned(fake, workdir)) as backend:
        os.kill(daemon_pid(workdir, uuid), signal.SIGKILL)
        stream = backend.events()
        try:
            down = await anext(stream)
            assert isinstance(down, InventoryChanged)
            assert {d.health for d in down.tree.devices} == {Health.UNHEALTHY}
            up = await anext(stream)
            assert isinstance(up, InventoryChanged)
            assert {d.health for d in up.tree.devices} == {Health.HEALTHY}
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        assert backend.daemons.states()[uuid].starts == 2


# End to end: the manager and the kubelet simulator over the mock parent with MPS isolation.


@dataclass
class Node:
    kubelet: KubeletSimulator
    manager: Manager
    mock: MockBackend


@asynccontextmanager
async def mps_node(directory: Path) -> AsyncIterator[Node]:
    backend = create(
        BackendContext(
            options={
                "parent_options": {"gpus": 2},
                "isolation": "mps",
                "layouts": {0: ["3g.71gb", "4g.71gb"]},
                "mps": daemon_options(directory),
            },
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=directory,
        )
    )
    async with registered_manager(backend, directory, (SMALL, LARGE, HALF)) as (kubelet, manager):
        assert isinstance(backend.parent, MockBackend)
        yield Node(kubelet, manager, backend.parent)


async def test_xid_reaches_every_mps_partition_on_the_gpu(workdir: Path) -> None:
    """An XID on a GPU marks every MPS partition on it Unhealthy, in every resource, and none on the other GPU."""
    async with mps_node(workdir) as n:
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 7, timeout=5)
        n.mock.xid(0, 62)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(LARGE) == 0 and n.kubelet.allocatable(HALF) == 0, 2)
        assert n.kubelet.allocatable(SMALL) == 7
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(LARGE) == 1 and n.kubelet.allocatable(HALF) == 1, 5)


async def test_allocate_of_an_mps_partition_returns_limits_and_pipe_mount(workdir: Path) -> None:
    """A pod given an MPS partition gets its GPU, its limits, the pipe directory and its mount; a second partition
    in one container is refused."""
    async with mps_node(workdir) as n:
        admission = await n.kubelet.admit("pod", [{LARGE: 1}])
        response = admission.containers[0].allocations[LARGE].response
        uuid = n.mock.status()[0].uuid
        pipe = str(workdir / uuid / "pipe")
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == uuid
        assert (response.envs[MEMORY_LIMIT], response.envs[THREAD_PERCENTAGE]) == ("0=71424M", "42")
        assert response.envs[PIPE_DIRECTORY] == pipe
        assert [(m.host_path, m.container_path, m.read_only) for m in response.mounts] == [(pipe, pipe, False)]
        request = api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=[d.id for d in n.manager.tree.of(SMALL)][:2])]
        )
        with pytest.raises(GRPCError, match=r"allows at most 1 device\(s\) per container"):
            await n.kubelet.stub(SMALL).allocate(request)


async def test_daemon_killed_under_the_kubelet_goes_unhealthy_and_back(workdir: Path) -> None:
    """Killing a GPU's control daemon shows its partitions Unhealthy to the kubelet, and Healthy once restarted."""
    async with mps_node(workdir) as n:
        uuid = n.mock.status()[1].uuid
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 7, timeout=5)
        os.kill(daemon_pid(workdir, uuid), signal.SIGKILL)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 0, timeout=5)
        assert n.kubelet.allocatable(LARGE) == 1
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(SMALL) == 7, timeout=10)


async def test_control_daemons_quit_on_close(workdir: Path) -> None:
    """Closing the daemons quits each one through its own pipe directory."""
    daemons = ControlDaemons(daemon_settings(workdir), "test")
    sharing = MpsSharing.from_mapping({"resources": [{"name": GPU_RESOURCE, "replicas": 2}]}, root=workdir)
    await daemons.ensure(sharing.apply(gpu_tree(2)))
    assert len(daemons.daemons) == 2
    uuids = list(daemons.daemons)
    pids = [daemon_pid(workdir, uuid) for uuid in uuids]
    await daemons.aclose()
    await until(lambda: not any(_alive(pid) for pid in pids))


def test_config_with_sharing_mps_builds_the_mps_backend(workdir: Path) -> None:
    """``serve`` with ``sharing.mps`` wraps the configured backend in MPS sharing; a change of it restarts it."""
    from gpuplugin.daemon.agent import _BACKEND_SETTINGS, make_backend

    settings = resolve(
        Overrides(state_dir=workdir), {"backend": {"name": "nvml"}, "sharing": {"mps": NVIDIA_MPS}}, {}, "f"
    )
    backend = make_backend(settings)
    assert isinstance(backend, MpsBackend) and isinstance(backend.inner, NvmlBackend) and backend.supervise
    assert "mps" in _BACKEND_SETTINGS


async def test_xid_reaches_every_mps_replica_on_the_gpu(workdir: Path) -> None:
    """An XID on a GPU marks all its MPS replicas Unhealthy to the kubelet, and none of another GPU's."""
    from gpuplugin.backends.mock import create as create_mock

    mock = create_mock(
        BackendContext(
            options={"gpus": 2, "control_socket": str(workdir / "m.sock")},
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=workdir,
        )
    )
    assert isinstance(mock, MockBackend)
    backend = MpsBackend(mock, MpsSharing.from_mapping(NVIDIA_MPS, root=workdir))
    settings = ManagerSettings(
        server=ServerSettings(kubelet_dir=workdir), watcher=WatcherSettings(poll_interval_s=0.05)
    )
    shared = "nvidia.com/gpu.shared"
    async with KubeletSimulator(workdir) as kubelet:
        manager = Manager(backend, settings)
        await manager.start()
        try:
            await kubelet.wait_registered(shared, timeout=5)
            await kubelet.wait_for(lambda: kubelet.allocatable(shared) == 8, timeout=5)
            mock.xid(0, 62)
            await kubelet.wait_for(lambda: kubelet.allocatable(shared) == 4, timeout=2)
            gpu0 = mock.status()[0].uuid
            states = kubelet.devices(shared)
            assert {s for i, s in states.items() if i.startswith(gpu0)} == {"Unhealthy"}
            assert {s for i, s in states.items() if not i.startswith(gpu0)} == {"Healthy"}
            await kubelet.wait_for(lambda: kubelet.allocatable(shared) == 8, timeout=5)
        finally:
            await manager.aclose()
