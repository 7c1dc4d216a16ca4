"""Plugin-watcher registration (the kubelet's ``DEPRECATION`` file), over real unix sockets.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from grpclib.client import Channel

from gpuplugin.daemon.manager import Manager
from gpuplugin.kubelet.api import pluginregistration as watcher_api
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.pluginwatcher import DEVICE_PLUGIN_TYPE, WatcherSocket, plugin_info
from gpuplugin.kubelet.registration import DEPRECATION_FILE
from gpuplugin.kubelet.server import ResourceServer
from gpuplugin.testing.node import SimulatorSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import mock_manager

GPU = "nvidia.com/gpu"
TIMEOUT_S = 5.0


def registry_of(directory: Path) -> Path:
    return directory / "plugins_registry"


def sockets_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_socket()) if directory.is_dir() else []


def make_manager(directory: Path) -> Manager:
    return mock_manager(directory, plugins_registry_dir=registry_of(directory))


@asynccontextmanager
async def running(manager: Manager) -> AsyncIterator[ResourceServer]:
    await manager.start()
    try:
        yield manager.servers[GPU]
    finally:
        await manager.aclose()


async def eventually(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (sockets and counters have no event to wait on)
            await asyncio.sleep(0.01)


@asynccontextmanager
async def watcher_client(socket: Path) -> AsyncIterator[watcher_api.RegistrationStub]:
    channel = Channel(path=str(socket))
    try:
        yield watcher_api.RegistrationStub(channel)
    finally:
        channel.close()


async def test_get_info_describes_the_device_plugin_and_register_is_skipped(workdir: Path) -> None:
    """With DEPRECATION, GetInfo names the resource and its socket path, v1beta1, and Register is never called."""
    (workdir / DEPRECATION_FILE).touch()
    registry = registry_of(workdir)
    async with (
        KubeletSimulator(workdir, SimulatorSettings(wipe_on_start=False)) as kubelet,
        running(make_manager(workdir)) as server,
    ):
        await eventually(lambda: len(sockets_in(registry)) == 1)
        (socket,) = sockets_in(registry)
        assert server.socket_path is not None
        assert socket.name == server.socket_path.name
        async with watcher_client(socket) as stub:
            info = await stub.get_info(watcher_api.InfoRequest(), timeout=TIMEOUT_S)
        assert info.type == DEVICE_PLUGIN_TYPE == "DevicePlugin"
        assert info.name == GPU
        assert info.endpoint == str(server.socket_path)
        assert Path(info.endpoint).is_absolute() and Path(info.endpoint).is_socket()
        assert info.supported_versions == ["v1beta1"]
        await asyncio.sleep(0.3)
        assert kubelet.registrations == [] and kubelet.rejections == []
        assert server.registrations == 0 and not server.registered


async def test_notify_registration_status_counts_and_logs(workdir: Path) -> None:
    """NotifyRegistrationStatus logs a failure with its error and counts a success as a registration."""
    (workdir / DEPRECATION_FILE).touch()
    registry = registry_of(workdir)
    with structlog.testing.capture_logs() as logs:
        async with running(make_manager(workdir)) as server:
            await eventually(lambda: len(sockets_in(registry)) == 1)
            (socket,) = sockets_in(registry)
            async with watcher_client(socket) as stub:
                failed = watcher_api.RegistrationStatus(plugin_registered=False, error="no handler for you")
                await stub.notify_registration_status(failed, timeout=TIMEOUT_S)
                assert server.registrations == 0 and not server.registered
                await stub.notify_registration_status(
                    watcher_api.RegistrationStatus(plugin_registered=True), timeout=TIMEOUT_S
                )
            await eventually(lambda: server.registered)
            assert server.registrations == 1
    failures = [e for e in logs if e["event"] == "plugin watcher registration failed"]
    assert [e["error"] for e in failures] == ["no handler for you"]
    assert any(e["event"] == "registered" and e.get("via") == "plugin watcher" for e in logs)


async def test_simulated_plugin_watcher_completes_registration(workdir: Path) -> None:
    """The simulator as plugin watcher: GetInfo, dial the endpoint, options, ListAndWatch, Notify; devices served."""
    registry = registry_of(workdir)
    settings = SimulatorSettings(plugins_registry_dir=registry)
    async with KubeletSimulator(workdir, settings) as kubelet, running(make_manager(workdir)) as server:
        registration = await kubelet.wait_registered(GPU, timeout=TIMEOUT_S)
        assert (workdir / DEPRECATION_FILE).exists()
        assert registration.endpoint == str(server.socket_path)
        assert registration.options.get_preferred_allocation_available
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=TIMEOUT_S)
        assert kubelet.stream_open(GPU)
        await eventually(lambda: server.registered)
        assert server.registrations == 1
        assert kubelet.rejections == []
        (device, *_) = kubelet.devices(GPU)
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[device])])
        response = await kubelet.stub(GPU).allocate(request)
        assert len(response.container_responses) == 1
        admission = await kubelet.admit("pod-a", [{GPU: 2}])
        assert len(admission.device_ids(GPU)) == 2


async def test_plugin_watcher_socket_removed_on_stop(workdir: Path) -> None:
    """Stopping the plugin removes its plugin-watcher socket as well as its device-plugin socket."""
    registry = registry_of(workdir)
    async with KubeletSimulator(workdir, SimulatorSettings(plugins_registry_dir=registry)) as kubelet:
        async with running(make_manager(workdir)) as server:
            await kubelet.wait_registered(GPU, timeout=TIMEOUT_S)
            socket_path = server.socket_path
            assert socket_path is not None
            assert sockets_in(registry) == [registry / socket_path.name]
        assert sockets_in(registry) == []
        assert not socket_path.exists()


async def test_kubelet_restart_registers_again_through_plugin_watcher(workdir: Path) -> None:
    """After a kubelet restart the plugin serves a fresh socket pair and the plugin watcher registers it again."""
    registry = registry_of(workdir)
    async with (
        KubeletSimulator(workdir, SimulatorSettings(plugins_registry_dir=registry)) as kubelet,
        running(make_manager(workdir)) as server,
    ):
        first = await kubelet.wait_registered(GPU, timeout=TIMEOUT_S)
        await kubelet.restart()
        again = await kubelet.wait_registered(GPU, after=first.index + 1, timeout=TIMEOUT_S)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=TIMEOUT_S)
        assert server.socket_path is not None
        assert again.endpoint == str(server.socket_path) != first.endpoint
        await eventually(lambda: sockets_in(registry) == [registry / Path(again.endpoint).name])
        await eventually(lambda: server.registered and server.registrations >= 2)


async def test_simulated_plugin_watcher_reports_rejection(workdir: Path) -> None:
    """A plugin the kubelet refuses hears why through NotifyRegistrationStatus."""
    registry = registry_of(workdir)
    statuses: list[watcher_api.RegistrationStatus] = []
    async with KubeletSimulator(workdir, SimulatorSettings(plugins_registry_dir=registry)) as kubelet:
        watcher = await WatcherSocket.serve(
            registry / "bad.sock", plugin_info("gpu", workdir / "x.sock"), statuses.append
        )
        try:
            await eventually(lambda: len(statuses) == 1)
        finally:
            await watcher.close()
        assert not statuses[0].plugin_registered
        assert "ResourceName 'gpu' is invalid" in statuses[0].error
        assert [r.resource for r in kubelet.rejections] == ["gpu"]
        assert kubelet.registrations == []


async def test_without_deprecation_registers_with_register(workdir: Path) -> None:
    """Without DEPRECATION the plugin calls Register with its socket's name and serves no plugin-watcher socket."""
    async with KubeletSimulator(workdir) as kubelet, running(make_manager(workdir)) as server:
        registration = await kubelet.wait_registered(GPU, timeout=TIMEOUT_S)
        assert server.socket_path is not None
        assert registration.endpoint == server.socket_path.name
        await eventually(lambda: server.registered)
        assert not (workdir / DEPRECATION_FILE).exists()
        assert sockets_in(registry_of(workdir)) == []
