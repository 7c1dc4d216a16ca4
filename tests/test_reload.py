"""Hot reload end to end: the daemon in-process, its config file edited, swapped or re-read on SIGHUP, the kubelet
simulated on real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gpuplugin.backends.mock import MockBackend
from gpuplugin.core.model import DeviceTree
from gpuplugin.daemon.agent import Daemon, settings_from_text
from gpuplugin.daemon.reload import ConfigWatcher
from gpuplugin.daemon.settings import Overrides
from gpuplugin.kubelet.server import ResourceServer
from gpuplugin.testing.simulator import KubeletSimulator

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
TIMEOUT_S = 5.0
#: Two mock GPUs keep every start and every list small.
BASE = "version: v1\nbackend: {name: mock, mock: {gpus: 2}}\n"


def config(*, replicas: int | None = None, rename: bool = False, extra: str = "") -> str:
    """A config of two mock GPUs, time-sliced ``replicas`` times (None: not shared), plus ``extra`` sections."""
    text = BASE + extra
    if replicas is not None:
        text += (
            f"sharing:\n  timeSlicing:\n    renameByDefault: {str(rename).lower()}\n"
            f"    resources: [{{name: {GPU}, replicas: {replicas}}}]\n"
        )
    return text


def write_atomically(path: Path, text: str) -> None:
    """Replace the file's content in one step, as editors and kubectl cp do."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@dataclass
class Node:
    daemon: Daemon
    kubelet: KubeletSimulator
    config: Path

    def server(self, resource: str = GPU) -> ResourceServer:
        return self.daemon.manager.servers[resource]

    def registrations(self, resource: str = GPU) -> int:
        return sum(r.resource == resource for r in self.kubelet.registrations)

    def stream_ends(self, resource: str = GPU) -> int:
        return sum(e.resource == resource for e in self.kubelet.stream_ends)

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Wait for a condition of the daemon (reload counters), polled; TimeoutError if it never holds."""
        async with asyncio.timeout(timeout):
            # The daemon's counters have no event to wait on; a 10 ms poll is well inside every bound tested.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def settled(self, resource: str, count: int) -> None:
        """The kubelet holds ``count`` healthy devices of ``resource`` on an open stream."""
        await self.kubelet.wait_for(
            lambda: self.kubelet.stream_open(resource) and self.kubelet.allocatable(resource) == count, TIMEOUT_S
        )


async def config_watch_armed() -> None:
    """Until the daemon's config watcher runs: the manager can be ready before it starts, and an edit made
    before it arms its inotify watch is not seen (see test_watcher_started_after_an_edit_applies_it)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not any(t.get_name() == "daemon:config watcher" for t in asyncio.all_tasks()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # Its first step, which arms the watch, runs before this sleep ends.
    await asyncio.sleep(0.05)


@asynccontextmanager
async def running(workdir: Path, text: str, *, config_path: Path | None = None) -> AsyncIterator[Node]:
    """The daemon serving ``text`` (written to ``config_path`` unless it exists) to a simulated kubelet."""
    path = config_path or workdir / "etc" / "config.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    overrides = Overrides(kubelet_dir=workdir / "k", state_dir=workdir / "s")
    (workdir / "s").mkdir()
    settings = settings_from_text(text, str(path), overrides)
    async with KubeletSimulator(workdir / "k") as kubelet:
        daemon = Daemon(settings, config=path, overrides=overrides, config_text=text)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="daemon")
        try:
            await kubelet.wait_for(lambda: daemon.manager.ready, TIMEOUT_S)
            await config_watch_armed()
            yield Node(daemon, kubelet, path)
        finally:
            stop.set()
            await task


def reloaded(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "config reloaded"]


async def test_sharing_a_resource_that_is_not_there_keeps_server_and_stream(workdir: Path) -> None:
    """A reload that changes nothing served (time-slicing of an absent resource) keeps the server and its stream."""
    async with running(workdir, config()) as node:
        await node.settled(GPU, 2)
        server, registrations = node.server(), node.registrations()
        extra = "sharing: {timeSlicing: {resources: [{name: nvidia.com/mig-1g.18gb, replicas: 2}]}}\n"
        with capture_logs() as logs:
            write_atomically(node.config, config(extra=extra))
            await node.until(lambda: node.daemon.reloads == 1)
        assert [e["backend_restarted"] for e in reloaded(logs)] == [False]
        assert node.daemon.settings.sharing is not None
        assert node.server() is server
        assert node.registrations() == registrations
        assert node.kubelet.stream_open(GPU) and node.stream_ends() == 0
        assert node.kubelet.allocatable(GPU) == 2


async def test_health_change_restarts_backend_but_keeps_unchanged_servers(workdir: Path) -> None:
    """A health change restarts the backend; the resource, whose devices are the same, keeps server and stream."""
    async with running(workdir, config()) as node:
        await node.settled(GPU, 2)
        server, registrations = node.server(), node.registrations()
        old_backend = node.daemon.manager.backend
        with capture_logs() as logs:
            write_atomically(node.config, config(extra="health: {recoveryQuietPeriodSeconds: 0.05}\n"))
            await node.until(lambda: node.daemon.reloads == 1)
        assert [e["backend_restarted"] for e in reloaded(logs)] == [True]
        backend = node.daemon.manager.backend
        assert backend is not old_backend and isinstance(backend, MockBackend)
        assert node.server() is server
        assert node.registrations() == registrations
        assert node.kubelet.stream_open(GPU) and node.stream_ends() == 0
        # The new backend's health policy is the one in force: a recoverable XID now clears in 0.05 s.
        backend.xid(1, 63)
        await node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 1, TIMEOUT_S)
        await node.settled(GPU, 2)


async def test_more_replicas_update_the_same_server(workdir: Path) -> None:
    """Time-slicing replicas 2 → 4: the kubelet's device list grows from 4 to 8 through the same server and stream."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        server, registrations = node.server(), node.registrations()
        write_atomically(node.config, config(replicas=4))
        await node.settled(GPU, 8)
        assert node.daemon.reloads == 1
        assert node.server() is server
        assert node.registrations() == registrations and node.stream_ends() == 0
        assert all(i.count("::") == 1 for i in node.kubelet.devices(GPU))


async def test_renamed_resource_stops_the_old_name_and_registers_the_new(workdir: Path) -> None:
    """renameByDefault on: nvidia.com/gpu stops with an empty list and nvidia.com/gpu.shared registers."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        old_socket = node.server().socket_path
        assert old_socket is not None and old_socket.exists()
        write_atomically(node.config, config(replicas=2, rename=True))
        await node.kubelet.wait_registered(SHARED, timeout=TIMEOUT_S)
        await node.settled(SHARED, 4)
        # An empty list before the stream closed: the kubelet keeps no device of the old name at all.
        await node.kubelet.wait_for(lambda: node.kubelet.capacity(GPU) == 0, TIMEOUT_S)
        assert set(node.daemon.manager.servers) == {SHARED}
        assert not old_socket.exists()


async def test_change_of_a_setting_read_at_start_is_named_and_the_rest_applies(workdir: Path) -> None:
    """A reload changing settings read only at start (the metrics address, the log level) warns naming each one."""
    async with running(workdir, config()) as node:
        await node.settled(GPU, 2)
        extra = "plugin: {metricsAddress: '127.0.0.1:0', logLevel: debug}\n"
        with capture_logs() as logs:
            write_atomically(node.config, config(replicas=2, extra=extra))
            await node.settled(GPU, 4)
        warned = [e["setting"] for e in logs if e["event"] == "config change needs a restart to apply"]
        assert warned == ["log_level", "probes"]
        assert node.daemon.reloads == 1


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        pytest.param("health: {recoveryQuietPeriodSeconds: soon}\n", "health.recoveryQuietPeriodSeconds", id="value"),
        pytest.param(
            "sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1}]}}\n",
            "sharing.timeSlicing.resources[0].replicas",
            id="replicas",
        ),
        pytest.param("plugin: {logLevl: debug}\n", "plugin.logLevl", id="unknown"),
        pytest.param("health: [\n", "not valid YAML", id="yaml"),
    ],
)
async def test_bad_file_is_refused_naming_the_field_and_old_config_serves(
    workdir: Path, extra: str, field: str
) -> None:
    """A bad file is refused with one log line naming the field; the running config keeps serving and allocating."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        before, server = node.daemon.settings, node.server()
        with capture_logs() as logs:
            write_atomically(node.config, config(extra=extra))
            await node.until(lambda: node.daemon.refused == 1)
        refused = [e for e in logs if e["event"].startswith("config refused")]
        assert len(refused) == 1 and refused[0]["log_level"] == "error"
        assert field in refused[0]["error"] and str(node.config) in refused[0]["error"]
        assert node.daemon.settings is before and node.daemon.reloads == 0
        assert node.server() is server and node.kubelet.allocatable(GPU) == 4
        admission = await node.kubelet.admit("after-refusal", [{GPU: 1}])
        assert len(admission.device_ids(GPU)) == 1


async def test_configmap_symlink_swap_is_applied_within_a_second(workdir: Path) -> None:
    """A ConfigMap update (..data swapped to a new timestamped directory) is applied within about a second."""
    mount = workdir / "cm"
    first = mount / "..2026_11_28_00_00_00.000000001"
    first.mkdir(parents=True)
    (first / "config.yaml").write_text(config(replicas=2), encoding="utf-8")
    (mount / "..data").symlink_to(first.name)
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    async with running(workdir, config(replicas=2), config_path=mount / "config.yaml") as node:
        await node.settled(GPU, 4)
        server = node.server()
        # What the kubelet's atomic writer does: new directory, new symlink, renamed over ..data, old one removed.
        second = mount / "..2026_11_28_00_01_00.000000002"
        second.mkdir()
        (second / "config.yaml").write_text(config(replicas=3), encoding="utf-8")
        (mount / "..data_tmp").symlink_to(second.name)
        swapped = time.monotonic()
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(first)
        await node.settled(GPU, 6)
        assert time.monotonic() - swapped < 1.0
        assert node.daemon.reloads == 1 and node.server() is server


async def test_edit_before_the_daemon_runs_is_applied(workdir: Path) -> None:
    """The file edited between loading the settings and starting the daemon: the watcher applies the edit."""
    path = workdir / "etc" / "config.yaml"
    path.parent.mkdir()
    path.write_text(config(replicas=3), encoding="utf-8")
    async with running(workdir, config(replicas=2), config_path=path) as node:
        await node.settled(GPU, 6)
        assert node.daemon.reloads == 1


async def test_sighup_rereads_the_file_and_rediscovers(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP re-reads a config file whose change no watch could see, and asks the backend for its devices again."""
    # The config path is a symlink into a directory the watcher does not watch: only SIGHUP can notice an edit.
    target = workdir / "elsewhere" / "real.yaml"
    target.parent.mkdir()
    target.write_text(config(replicas=2), encoding="utf-8")
    link = workdir / "etc" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    async with running(workdir, config(replicas=2), config_path=link) as node:
        await node.settled(GPU, 4)
        backend = node.daemon.manager.backend
        discoveries = 0
        discover = backend.discover

        async def counting_discover() -> DeviceTree:
            nonlocal discoveries
            discoveries += 1
            return await discover()

        monkeypatch.setattr(backend, "discover", counting_discover)
        target.write_text(config(replicas=3), encoding="utf-8")
        await asyncio.sleep(0.2)
        assert node.daemon.reloads == 0, "the watcher was not meant to see this edit"
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGHUP)
            await node.settled(GPU, 6)
            await node.until(lambda: discoveries == 1)
        assert [e["event"] for e in logs if "SIGHUP" in e["event"]] == ["SIGHUP: reloading"]
        assert node.daemon.reloads == 1


async def test_backend_that_fails_to_start_is_refused_and_previous_backend_serves(workdir: Path) -> None:
    """A reload whose backend cannot start (mock gpus: 0) is refused; the previous backend config serves again."""
    async with running(workdir, config()) as node:
        await node.settled(GPU, 2)
        before, server = node.daemon.settings, node.server()
        bad = "version: v1\nbackend: {name: mock, mock: {gpus: 0}}\n"
        with capture_logs() as logs:
            write_atomically(node.config, bad)
            await node.until(lambda: node.daemon.refused == 1)
        refused = [e for e in logs if e["event"].startswith("config refused")]
        assert len(refused) == 1 and "mock.gpus" in refused[0]["error"]
        assert "backend does not start" in refused[0]["event"]
        assert node.daemon.settings is before and node.daemon.reloads == 0
        backend = node.daemon.manager.backend
        assert isinstance(backend, MockBackend) and backend.settings.gpus == 2
        assert node.server() is server and node.kubelet.stream_open(GPU)
        await node.settled(GPU, 2)
        admission = await node.kubelet.admit("after-refusal", [{GPU: 2}])
        assert len(admission.device_ids(GPU)) == 2
        # The restored backend is live: its control socket is back and its faults reach the kubelet.
        assert (workdir / "s" / "mock.sock").exists()
        backend.xid(0, 79)
        await node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 1, TIMEOUT_S)


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        pytest.param(5_000_000, "must be an integer from 2 to 24672", id="refused-when-read"),
        pytest.param(20_000, "2 GPUs with 20000 replicas each make 40000 devices", id="refused-when-counted"),
    ],
)
async def test_too_many_replicas_are_refused_on_reload_and_a_later_edit_applies(
    workdir: Path, replicas: int, message: str
) -> None:
    """Replicas the kubelet could not receive are refused at once; the old config serves and the watcher lives."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        before, server = node.daemon.settings, node.server()
        with capture_logs() as logs:
            started = time.perf_counter()
            write_atomically(node.config, config(replicas=replicas))
            await node.until(lambda: node.daemon.refused == 1)
            assert time.perf_counter() - started < 2.0
        refused = [e for e in logs if e["event"].startswith("config refused")]
        assert len(refused) == 1 and refused[0]["log_level"] == "error"
        assert refused[0]["error"].startswith(("sharing.timeSlicing.resources[0].replicas: ", str(node.config)))
        assert "sharing.timeSlicing.resources[0].replicas" in refused[0]["error"] and message in refused[0]["error"]
        assert node.daemon.settings is before and node.daemon.reloads == 0
        assert node.server() is server and node.kubelet.stream_open(GPU) and node.stream_ends() == 0
        assert len(node.daemon.manager.tree.devices) == 4
        await node.settled(GPU, 4)
        write_atomically(node.config, config(replicas=3))
        await node.settled(GPU, 6)
        assert node.daemon.reloads == 1 and node.server() is server


async def test_a_config_that_is_not_utf8_is_refused_and_a_later_edit_applies(workdir: Path) -> None:
    """An edit that leaves bytes that are not UTF-8 is refused with one line; the watcher applies the next one."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        with capture_logs() as logs:
            temporary = node.config.with_name(".bad.tmp")
            temporary.write_bytes(b"version: v1\n\xff\xfe: 1\n")
            os.replace(temporary, node.config)
            await node.until(lambda: any(e["event"].startswith("config refused") for e in logs))
        refused = [e for e in logs if e["event"].startswith("config refused")]
        assert len(refused) == 1 and "not UTF-8" in refused[0]["error"] and str(node.config) in refused[0]["error"]
        assert node.daemon.reloads == 0
        write_atomically(node.config, config(replicas=3))
        await node.settled(GPU, 6)
        assert node.daemon.reloads == 1


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        pytest.param("backend: {name: partitioned, partitioned: {layout: all-9g.99gb}}\n", "9g.99gb", id="layout"),
        pytest.param("backend: {name: nvm}\n", "nvm", id="unknown-backend"),
    ],
)
async def test_bad_backend_section_is_refused_and_reload_keeps_working(workdir: Path, bad: str, field: str) -> None:
    """A backend section its factory rejects is refused with one log line; a later good file still reloads."""
    async with running(workdir, config()) as node:
        await node.settled(GPU, 2)
        with capture_logs() as logs:
            write_atomically(node.config, "version: v1\n" + bad)
            await node.until(lambda: node.daemon.refused == 1, timeout=1.0)
        refused = [e for e in logs if e["event"].startswith("config refused")]
        assert len(refused) == 1 and field in refused[0]["error"]
        write_atomically(node.config, config(replicas=2))
        await node.settled(GPU, 4)


async def test_reload_keeps_unchanged_cdi_spec_files_in_place(workdir: Path) -> None:
    """A reload that leaves the CDI devices unchanged never removes their spec file, so no pod start misses it."""
    from asyncinotify import Inotify, Mask

    specs = workdir / "cdi"
    extra = f"flags: {{plugin: {{deviceListStrategy: cdi-cri, cdiSpecDir: {specs}}}}}\n"
    async with running(workdir, config(extra=extra)) as node:
        await node.settled(GPU, 2)
        spec = specs / "k8s.device-plugin.nvidia.com-gpu.json"
        assert spec.exists()
        with Inotify() as inotify:
            inotify.add_watch(specs, Mask.DELETE | Mask.MOVED_FROM)
            write_atomically(node.config, config(extra=extra + "health: {recoveryQuietPeriodSeconds: 5}\n"))
            await node.until(lambda: node.daemon.reloads == 1)
            deleted = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    async for event in inotify:
                        deleted.append(str(event.name))
        assert spec.exists()
        assert spec.name not in deleted


async def test_watcher_started_after_an_edit_applies_it(workdir: Path) -> None:
    """A watcher whose initial text is already outdated when it starts reports the file's current content."""
    path = workdir / "config.yaml"
    path.write_text(config(replicas=3), encoding="utf-8")
    seen: list[str] = []
    changed = asyncio.Event()

    async def on_change(text: str) -> None:
        seen.append(text)
        changed.set()

    watcher = ConfigWatcher(path, on_change, initial_text=config(replicas=2))
    task = asyncio.create_task(watcher.run(), name="config watcher")
    try:
        async with asyncio.timeout(1.0):
            await changed.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert seen == [config(replicas=3)]


async def test_a_big_config_is_parsed_off_the_event_loop(workdir: Path) -> None:
    """A reload of a big file keeps the event loop answering while its YAML is parsed, then refuses it."""
    async with running(workdir, config(replicas=2)) as node:
        await node.settled(GPU, 4)
        # 120,000 values, 480 kB: seconds of parsing in pure Python, then over the 100,000-value bound.
        big = config(replicas=3, extra="health: {ignoredXids: [" + "13, " * 120_000 + "13]}\n")
        longest_s = 0.0
        with capture_logs() as logs:
            write_atomically(node.config, big)
            async with asyncio.timeout(60):
                while node.daemon.refused == 0:
                    started = time.perf_counter()
                    await asyncio.sleep(0.01)
                    longest_s = max(longest_s, time.perf_counter() - started)
        assert any("more than 100000 values" in e.get("error", "") for e in logs)
        assert longest_s < 0.5, f"the event loop was blocked for {longest_s:.2f} s"
        await node.settled(GPU, 4)
