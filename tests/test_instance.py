"""One instance per node: the state directory's lock, socket names unique across PID namespaces, sockets removed
only by whoever made them, and the sockets of killed instances cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gpuplugin.backends.mock import MockBackend
from gpuplugin.backends.mock.control import ControlServer, control
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import BackendUnavailable
from gpuplugin.core.instance import InstanceLock, InstanceLocked, SocketIdentity, dead_sockets_removed, remove_if_ours
from gpuplugin.kubelet.server import ResourceServer, ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import StaticBackend, gpu_tree, until
from tests.test_reliability import serve

GPU = "nvidia.com/gpu"


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    """A unix socket listening at ``path``, as a live instance's would be."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        yield listener


def dead_socket(path: Path) -> None:
    """A socket file nobody listens on, as a SIGKILLed instance leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def plugin_sockets(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("gpuplugin-"))


async def test_a_second_lock_waits_and_gets_it_once_the_first_is_released(workdir: Path) -> None:
    """A second InstanceLock waits while the first is held and takes it within a retry interval of its release."""
    first, second = InstanceLock(workdir), InstanceLock(workdir)
    assert await first.acquire(0)
    waiting = asyncio.create_task(second.acquire(None))
    await until(lambda: second.waiting_for == f"PID {os.getpid()}")
    assert not waiting.done()
    first.release()
    assert await asyncio.wait_for(waiting, 2)
    assert second.held and second.waiting_for is None
    second.release()


async def test_a_lock_held_past_the_wait_raises_one_line_naming_the_holder(workdir: Path) -> None:
    """With a bounded wait, a held lock raises InstanceLocked: one line naming the holder's PID and the lock file."""
    first = InstanceLock(workdir)
    assert await first.acquire(0)
    try:
        with pytest.raises(InstanceLocked) as raised:
            await InstanceLock(workdir).acquire(0.3)
    finally:
        first.release()
    message = str(raised.value)
    assert "\n" not in message
    assert f"PID {os.getpid()}" in message and str(workdir / "gpuplugin.lock") in message
    assert "after waiting 0.3 s" in message


async def test_stop_while_waiting_for_the_lock_returns_false(workdir: Path) -> None:
    """SIGTERM (the stop event) during the wait ends it at once: acquire returns False and holds nothing."""
    first = InstanceLock(workdir)
    assert await first.acquire(0)
    stop = asyncio.Event()
    second = InstanceLock(workdir)
    waiting = asyncio.create_task(second.acquire(None, stop=stop))
    await until(lambda: second.waiting_for is not None)
    stop.set()
    assert await asyncio.wait_for(waiting, 2) is False
    assert not second.held
    first.release()


def test_socket_names_differ_between_processes_with_the_same_pid() -> None:
    """Two processes that are both PID 1 (two containers) still name their sockets differently."""
    code = (
        "import os; os.getpid = lambda: 1\n"
        "from gpuplugin.kubelet.server import socket_name\n"
        "print(socket_name('gpuplugin', 'nvidia.com/gpu'))\n"
    )
    names = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    }
    assert len(names) == 2
    assert all(n.startswith("gpuplugin-nvidia.com_gpu-1-") and n.endswith(".sock") for n in names)


def test_remove_if_ours_leaves_a_file_that_replaced_ours(workdir: Path) -> None:
    """A socket path re-created by someone else (another inode) is not removed; our own file is."""
    path = workdir / "gpuplugin-x.sock"
    dead_socket(path)
    ours = SocketIdentity.of(path)
    path.unlink()
    dead_socket(path)
    assert not remove_if_ours(path, ours)
    assert path.exists()
    assert remove_if_ours(path, SocketIdentity.of(path))
    assert not path.exists()


def test_dead_sockets_with_our_prefix_are_removed_live_and_foreign_ones_kept(workdir: Path) -> None:
    """Start-up cleanup removes our prefix's sockets nobody listens on; a live one and other files stay."""
    dead_socket(workdir / "gpuplugin-nvidia.com_gpu-1-0.sock")
    dead_socket(workdir / "other-plugin.sock")
    (workdir / "gpuplugin-notes.sock").write_text("not a socket")
    with listening(workdir / "gpuplugin-nvidia.com_gpu-7-1.sock"):
        removed = dead_sockets_removed(workdir, "gpuplugin")
        assert removed == ["gpuplugin-nvidia.com_gpu-1-0.sock"]
        assert sorted(p.name for p in workdir.iterdir()) == [
            "gpuplugin-notes.sock",
            "gpuplugin-nvidia.com_gpu-7-1.sock",
            "other-plugin.sock",
        ]


async def test_a_resource_server_never_removes_a_socket_it_did_not_create(workdir: Path) -> None:
    """Stopping removes our socket only if the file at its path is still ours; a replacement stays."""
    tree = gpu_tree(2)
    server = ResourceServer(GPU, StaticBackend(tree), ServerSettings(kubelet_dir=workdir))
    await server.start(tree.devices, tree)
    path = server.socket_path
    assert path is not None and not server.socket_missing()
    # Someone else's socket under our name, made while ours was out of the way.
    path.unlink()
    with listening(path):
        assert server.socket_missing()
        await server.stop()
        assert path.exists()


async def test_the_mock_control_server_neither_takes_over_nor_removes_a_live_socket(workdir: Path) -> None:
    """A second mock backend on a control socket that answers fails to start and leaves that socket in place."""
    path = workdir / "mock.sock"
    first = ControlServer(path, lambda _: {})
    await first.start()
    try:
        backend = MockBackend(BackendContext(options={"control_socket": str(path)}, state_dir=workdir))
        with pytest.raises(BackendUnavailable, match="another mock backend listens on"):
            await backend.start()
        await backend.aclose()
        # The first still answers; the round trip also lets it finish the connection the check made.
        assert await control(path, {"op": "status"}) == {"ok": True}
    finally:
        await first.aclose()
    assert not path.exists()


async def test_the_mock_control_server_leaves_a_socket_that_replaced_its_own(workdir: Path) -> None:
    """Closing the control server removes its socket only while the file is still the one it created."""
    path = workdir / "mock.sock"
    server = ControlServer(path, lambda _: {})
    await server.start()
    path.unlink()
    with listening(path):
        await server.aclose()
        assert path.exists()


async def test_a_second_serve_with_no_wait_exits_with_one_line_and_the_first_keeps_serving(workdir: Path) -> None:
    """`serve --instance-wait 0` while another serves the node: exit 1, one line; the first's sockets untouched."""
    async with KubeletSimulator(workdir) as kubelet, serve(workdir, "--backend", "mock") as first:
        await kubelet.wait_registered(GPU, timeout=20)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=5)
        before = plugin_sockets(workdir)
        async with serve(workdir, "--backend", "mock", "--instance-wait", "0") as second:
            returncode = await asyncio.wait_for(second.process.wait(), 20)
        assert returncode == 1
        assert len(second.other) == 1, second.other
        assert second.other[0].startswith(f"gpuplugin: another gpuplugin (PID {first.process.pid}) serves this node")
        assert plugin_sockets(workdir) == before and (workdir / "mock.sock").exists()
        assert len(kubelet.registrations) == 1 and kubelet.allocatable(GPU) == 8
        assert await first.terminate() == 0


async def test_a_second_serve_waits_and_takes_over_when_the_first_stops(workdir: Path) -> None:
    """A second `serve` waits without registering, /readyz naming the holder; once the first stops it registers
    and serves every GPU."""
    port = free_port()
    async with KubeletSimulator(workdir) as kubelet, serve(workdir, "--backend", "mock") as first:
        await kubelet.wait_registered(GPU, timeout=20)
        async with serve(workdir, "--backend", "mock", "--metrics-address", f"127.0.0.1:{port}") as second:
            await second.wait_log(lambda e: e["event"] == "another gpuplugin serves this node; waiting for it to stop")
            await asyncio.sleep(0.5)
            assert len(kubelet.registrations) == 1
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 503
                assert f"another gpuplugin (PID {first.process.pid}) holds {workdir}/gpuplugin.lock" in (
                    await response.text()
                )
            assert await first.terminate() == 0
            await kubelet.wait_registered(GPU, after=1, timeout=20)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8 and kubelet.stream_open(GPU), timeout=5)
            assert len(plugin_sockets(workdir)) == 1 and (workdir / "mock.sock").exists()
            assert await second.terminate() == 0
        assert plugin_sockets(workdir) == [] and not (workdir / "mock.sock").exists()


async def test_a_killed_instances_socket_is_removed_by_the_next_start(workdir: Path) -> None:
    """After SIGKILL the dead instance's socket stays; the next `serve` removes it and serves on its own."""
    async with KubeletSimulator(workdir) as kubelet:
        async with serve(workdir, "--backend", "mock") as killed:
            await kubelet.wait_registered(GPU, timeout=20)
            killed.process.send_signal(signal.SIGKILL)
            await killed.process.wait()
        (left,) = plugin_sockets(workdir)
        async with serve(workdir, "--backend", "mock") as plugin:
            registration = await kubelet.wait_registered(GPU, after=1, timeout=20)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=5)
            assert plugin_sockets(workdir) == [registration.endpoint] != [left]
            await plugin.wait_log(lambda e: e["event"] == "removed the socket of a stopped instance")
            assert await plugin.terminate() == 0


async def test_concurrent_reserves_leave_exactly_one_socket(workdir: Path) -> None:
    """Two reserves at once (our socket deleted and kubelet.sock created, seen together) leave one socket, ours."""
    tree = gpu_tree(2)
    server = ResourceServer(GPU, StaticBackend(tree), ServerSettings(kubelet_dir=workdir))
    await server.start(tree.devices, tree)
    try:
        await asyncio.gather(server.reserve(), server.reserve(), server.reserve())
        assert server.socket_path is not None
        assert plugin_sockets(workdir) == [server.socket_path.name]
        assert not server.socket_missing()
    finally:
        await server.stop()
    assert plugin_sockets(workdir) == []


async def test_a_killed_instances_plugin_watcher_socket_is_removed_by_the_next_start(workdir: Path) -> None:
    """A dead plugin-watcher socket of ours in the plugins registry is removed at start; other plugins' stay."""
    registry = workdir / "registry"
    registry.mkdir()
    dead_socket(registry / "gpuplugin-nvidia.com_gpu-1-0a1b2c3d-0.sock")
    dead_socket(registry / "csi-driver.sock")
    # In a directory: the simulator clears the files of its directory when it starts.
    (workdir / "etc").mkdir()
    config = workdir / "etc" / "config.yaml"
    config.write_text(f"version: v1\nplugin:\n  pluginsRegistryDir: {registry}\n")
    async with (
        KubeletSimulator(workdir) as kubelet,
        serve(workdir, "--backend", "mock", "--config", str(config)) as plugin,
    ):
        await kubelet.wait_registered(GPU, timeout=20)
        assert sorted(p.name for p in registry.iterdir()) == ["csi-driver.sock"]
        assert await plugin.terminate() == 0
