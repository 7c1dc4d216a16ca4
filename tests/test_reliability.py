"""Reliability: what the plugin does when the kubelet, the backend, the config or a client misbehaves.

Each test injects one fault into a real setup (the manager with the mock or a static backend and the kubelet
simulator in-process, or ``gpuplugin serve`` as a subprocess) and checks what must still hold afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import yaml
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.backends.mock import MockBackend
from gpuplugin.core.backend import BackendEvent, BackendUnavailable, HealthChanged
from gpuplugin.core.model import MAX_DEVICE_ID_LENGTH, DeviceTree, Health
from gpuplugin.daemon.agent import Daemon, settings_from_text
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.daemon.settings import ConfigError, Overrides, PluginSettings
from gpuplugin.kubelet.allocate import MAX_CONTAINERS, MAX_IDS_PER_LIST
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.kubelet.watcher import WatcherSettings
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import GPU_RESOURCE, StaticBackend, gpu_tree, mock_manager, until

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
#: The contract allows one second for noticing a kubelet (re)start or a deleted socket.
NOTICE_S = 1.0
#: Connection-level failures a client may see when the plugin goes away under it: clean, not a hang.
CONNECTION_ERRORS = (StreamTerminatedError, ProtocolError, ConnectionError, OSError)


# In-process set-ups.


def manager_settings(directory: Path, *, inotify: bool = True) -> ManagerSettings:
    return ManagerSettings(
        server=ServerSettings(kubelet_dir=directory),
        watcher=WatcherSettings(use_inotify=inotify, poll_interval_s=0.05),
    )


@asynccontextmanager
async def running(kubelet: KubeletSimulator, manager: Manager, resource: str, count: int) -> AsyncIterator[Manager]:
    """Start ``manager``, wait until ``resource`` is registered with ``count`` allocatable, close it afterwards."""
    await manager.start()
    try:
        await kubelet.wait_for(lambda: kubelet.allocatable(resource) == count and kubelet.stream_open(resource), 5)
        yield manager
    finally:
        await manager.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def plugin_sockets(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("gpuplugin-"))


def one_device(device_id: str) -> api.AllocateRequest:
    return api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[device_id])])


def events_at(logs: Sequence[Mapping[str, Any]], *levels: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e.get("log_level") in levels]


# 1. The kubelet absent at start.


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
async def test_kubelet_absent_at_start_registers_within_a_second_of_it_appearing(workdir: Path, inotify: bool) -> None:
    """A plugin started before the kubelet registers within 1 s of kubelet.sock appearing, with one warning line."""
    manager = mock_manager(workdir, inotify=inotify)
    with structlog.testing.capture_logs() as logs:
        await manager.start()
        try:
            # Long enough for the backoff (10 ms doubling) to have grown past a second: only the watcher is fast.
            await asyncio.sleep(1.5)
            assert not manager.servers[GPU].registered
            appearing = time.monotonic()
            async with KubeletSimulator(workdir) as kubelet:
                registration = await kubelet.wait_registered(GPU, timeout=5)
                assert registration.monotonic_s - appearing < NOTICE_S
                await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=2)
        finally:
            await manager.aclose()
    warnings = events_at(logs, "warning", "error", "critical")
    assert [e["event"] for e in warnings] == ["kubelet not reachable; retrying with backoff"]


# 2. Fifty kubelet restarts.


async def test_fifty_kubelet_restarts_leave_one_socket_and_no_leaks(workdir: Path) -> None:
    """After each of 50 kubelet restarts the resource is registered and allocatable, with one socket and no leaks."""
    async with KubeletSimulator(workdir) as kubelet, running(kubelet, mock_manager(workdir), GPU, 8) as manager:
        server = manager.servers[GPU]
        baseline: tuple[int, int] | None = None
        for restart in range(50):
            before = len(kubelet.registrations)
            await kubelet.restart()
            await kubelet.wait_registered(GPU, after=before, timeout=5)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8 and kubelet.stream_open(GPU), timeout=5)
            await until(lambda: server.registered)
            await until(lambda: server.socket_path is not None and plugin_sockets(workdir) == [server.socket_path.name])
            # The new endpoint answers Allocate: a pod is admitted, then removed.
            admitted = await kubelet.admit(f"pod-{restart}", [{GPU: 1}])
            assert len(admitted.device_ids(GPU)) == 1
            await kubelet.remove_pod(f"pod-{restart}")
            if restart == 4:
                # After a warm-up (thread pool, lazily opened files), the resources a restart uses must come back.
                baseline = (open_fds(), len(asyncio.all_tasks()))
        assert baseline is not None
        fds, tasks = baseline
        await until(lambda: len(asyncio.all_tasks()) <= tasks)
        assert open_fds() - fds <= 2, f"{open_fds() - fds} file descriptors more after 45 restarts"
        assert manager.ready


# 3. Our socket deleted under us.


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
async def test_socket_deleted_under_us_served_and_registered_again_within_a_second(
    workdir: Path, inotify: bool
) -> None:
    """Each time our socket is deleted the plugin serves a new one and registers it within 1 s."""
    async with (
        KubeletSimulator(workdir) as kubelet,
        running(kubelet, mock_manager(workdir, inotify=inotify), GPU, 8) as manager,
    ):
        server = manager.servers[GPU]
        for round_ in range(5):
            before = len(kubelet.registrations)
            old = server.socket_path
            assert old is not None
            if not inotify:
                # Let a poll see the new socket first: see the xfail test below for a deletion before that.
                await asyncio.sleep(0.12)
            deleted = time.monotonic()
            old.unlink()
            again = await kubelet.wait_registered(GPU, after=before, timeout=5)
            assert again.monotonic_s - deleted < NOTICE_S
            assert again.endpoint != old.name and (workdir / again.endpoint).is_socket()
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8 and kubelet.stream_open(GPU), timeout=2)
            assert plugin_sockets(workdir) == [again.endpoint]
            await kubelet.admit(f"pod-{round_}", [{GPU: 1}])


async def test_socket_deleted_before_the_next_poll_is_served_again(workdir: Path) -> None:
    """Polling: a socket deleted within one poll interval of being served is still noticed and served again."""
    settings = ManagerSettings(
        server=ServerSettings(kubelet_dir=workdir), watcher=WatcherSettings(use_inotify=False, poll_interval_s=0.5)
    )
    manager = Manager(FaultyBackend(gpu_tree(2)), settings)
    async with KubeletSimulator(workdir) as kubelet, running(kubelet, manager, GPU_RESOURCE, 2):
        server = manager.servers[GPU_RESOURCE]
        await asyncio.sleep(0.6)
        assert server.socket_path is not None
        before = len(kubelet.registrations)
        server.socket_path.unlink()
        await kubelet.wait_registered(GPU_RESOURCE, after=before, timeout=2)
        # The poll that saw the first deletion was a moment ago; the next one is about 0.5 s away.
        assert server.socket_path is not None
        server.socket_path.unlink()
        await kubelet.wait_registered(GPU_RESOURCE, after=before + 1, timeout=1.5)


# 4. The kubelet cancelling ListAndWatch streams.


async def test_cancelled_list_and_watch_streams_are_released_and_others_keep_receiving(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Streams cancelled by the client (aclose, task cancel, RST_STREAM, connection drop) are released quietly."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with KubeletSimulator(workdir) as kubelet, running(kubelet, mock_manager(workdir), GPU, 8) as manager:
            server = manager.servers[GPU]
            assert server.socket_path is not None
            await until(lambda: server.open_streams == 1)
            channel = Channel(path=str(server.socket_path))
            dropped = Channel(path=str(server.socket_path))
            try:
                stub = api.DevicePluginStub(channel)

                def watch(on: api.DevicePluginStub) -> AsyncGenerator[api.ListAndWatchResponse]:
                    return cast(AsyncGenerator[api.ListAndWatchResponse], on.list_and_watch(api.Empty()))

                kept = [watch(stub) for _ in range(2)]
                closed = [watch(stub) for _ in range(3)]
                for stream in [*kept, *closed]:
                    assert len((await anext(stream)).devices) == 8

                # A reader task cancelled mid-wait, as a kubelet's context cancellation does.
                first = asyncio.Event()

                async def reader() -> None:
                    async for _ in watch(stub):
                        first.set()

                task = asyncio.create_task(reader())
                await asyncio.wait_for(first.wait(), 2)
                # A raw stream reset with RST_STREAM, and streams on a connection that is then dropped.
                async with channel.request(
                    "/v1beta1.DevicePlugin/ListAndWatch",
                    Cardinality.UNARY_STREAM,
                    api.Empty,
                    api.ListAndWatchResponse,
                ) as raw:
                    await raw.send_message(api.Empty(), end=True)
                    assert await raw.recv_message() is not None
                    on_dropped = [watch(api.DevicePluginStub(dropped)) for _ in range(2)]
                    for stream in on_dropped:
                        await anext(stream)
                    await until(lambda: server.open_streams == 1 + 2 + 3 + 1 + 1 + 2)
                    await raw.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                for stream in closed:
                    await stream.aclose()
                dropped.close()
                for stream in on_dropped:
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        await stream.aclose()
                # Only the simulator's stream and the two kept ones remain, before any device changes.
                await until(lambda: server.open_streams == 3)

                assert isinstance(manager.backend, MockBackend)
                manager.backend.xid(3, 79)
                await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 7, timeout=2)
                for stream in kept:
                    update = await asyncio.wait_for(anext(stream), 2)
                    assert [d.health for d in update.devices].count(str(Health.UNHEALTHY)) == 1
                    await stream.aclose()
                await until(lambda: server.open_streams == 1)
            finally:
                channel.close()
                dropped.close()
            assert kubelet.stream_ends == []
    assert events_at(logs, "error", "critical") == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# 5. Backend errors mid-run.


class BackendFailure(RuntimeError):
    """What FaultyBackend raises."""


class FaultyBackend(StaticBackend):
    """A StaticBackend whose event stream can be made to raise and whose rediscovery can be made to fail."""

    def __init__(self, tree: DeviceTree) -> None:
        super().__init__(tree)
        self._stream: asyncio.Queue[BackendEvent | Exception] = asyncio.Queue()
        self.discover_error: Exception | None = None
        self.subscriptions = 0

    async def discover(self) -> DeviceTree:
        if self.discover_error is not None:
            raise self.discover_error
        return self.tree

    async def events(self) -> AsyncIterator[BackendEvent]:
        self.subscriptions += 1
        while True:
            item = await self._stream.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def push(self, event: BackendEvent) -> None:
        self._stream.put_nowait(event)

    def break_events(self, error: Exception) -> None:
        """The next thing the event stream does is raise ``error``."""
        self._stream.put_nowait(error)


def unhealthy(gpu: str) -> HealthChanged:
    return HealthChanged(gpu=gpu, health=Health.UNHEALTHY, reason="XID 79: GPU has fallen off the bus", xid=79)


async def check_serves_last_tree(kubelet: KubeletSimulator, resource: str, bad: str, good: str) -> None:
    """The RPCs answer from the last good tree: ``good`` allocates, ``bad`` (unhealthy) does not, streams open."""
    stub = kubelet.stub(resource)
    assert (await stub.allocate(one_device(good))).container_responses
    with pytest.raises(GRPCError) as caught:
        await stub.allocate(one_device(bad))
    assert caught.value.status is Status.FAILED_PRECONDITION
    options = await stub.get_device_plugin_options(api.Empty())
    assert options.get_preferred_allocation_available
    stream = cast(AsyncGenerator[api.ListAndWatchResponse], stub.list_and_watch(api.Empty()))
    listed = await asyncio.wait_for(anext(stream), 2)
    await stream.aclose()
    assert {d.id: d.health for d in listed.devices}[bad] == str(Health.UNHEALTHY)
    assert {d.id: d.health for d in listed.devices}[good] == str(Health.HEALTHY)


async def test_backend_event_stream_raising_keeps_serving_the_last_tree(workdir: Path) -> None:
    """When the backend's events() raises, the error is logged and the last good tree is still served."""
    backend = FaultyBackend(gpu_tree(4))
    with structlog.testing.capture_logs() as logs:
        async with (
            KubeletSimulator(workdir) as kubelet,
            running(kubelet, Manager(backend, manager_settings(workdir)), GPU_RESOURCE, 4),
        ):
            backend.push(unhealthy("GPU-1"))
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 3, timeout=2)
            backend.break_events(BackendFailure("the driver went away"))
            await until(lambda: any(e["event"] == "task failed; restarting" for e in logs))
            await check_serves_last_tree(kubelet, GPU_RESOURCE, bad="GPU-1", good="GPU-0")
            assert kubelet.stream_open(GPU_RESOURCE) and kubelet.allocatable(GPU_RESOURCE) == 3
            # The kubelet's restarts are still followed.
            before = len(kubelet.registrations)
            await kubelet.restart()
            await kubelet.wait_registered(GPU_RESOURCE, after=before, timeout=2)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 3, timeout=2)
    failed = [e for e in logs if e["event"] == "task failed; restarting"]
    assert [(e["task"], e["error"]) for e in failed] == [
        ("manager:backend events", "BackendFailure: the driver went away")
    ]
    assert not [e for e in logs if e["event"] == "task failed"]


async def test_backend_event_stream_is_followed_again_after_it_raises(workdir: Path) -> None:
    """After the backend's events() raised, the manager subscribes again and later health events still apply."""
    backend = FaultyBackend(gpu_tree(4))
    async with (
        KubeletSimulator(workdir) as kubelet,
        running(kubelet, Manager(backend, manager_settings(workdir)), GPU_RESOURCE, 4),
    ):
        backend.break_events(BackendFailure("the driver went away"))
        backend.push(unhealthy("GPU-2"))
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 3, timeout=1.5)
        assert backend.subscriptions == 2


async def test_rediscovery_failing_keeps_serving_the_last_tree(workdir: Path) -> None:
    """When discover() raises on a rediscovery, the error reaches the caller and the last good tree is served."""
    backend = FaultyBackend(gpu_tree(4))
    async with (
        KubeletSimulator(workdir) as kubelet,
        running(kubelet, Manager(backend, manager_settings(workdir)), GPU_RESOURCE, 4) as manager,
    ):
        backend.push(unhealthy("GPU-3"))
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 3, timeout=2)
        backend.discover_error = BackendUnavailable("NVML: driver/library version mismatch")
        with pytest.raises(BackendUnavailable):
            await manager.rediscover()
        await check_serves_last_tree(kubelet, GPU_RESOURCE, bad="GPU-3", good="GPU-2")
        # Once the backend answers again, a rediscovery serves what it finds.
        backend.discover_error = None
        backend.tree = gpu_tree(6)
        await manager.rediscover()
        await kubelet.wait_for(lambda: kubelet.capacity(GPU_RESOURCE) == 6, timeout=2)
        assert kubelet.allocatable(GPU_RESOURCE) == 5


async def test_sighup_rediscovery_failing_is_logged_and_the_daemon_keeps_serving(workdir: Path) -> None:
    """In the daemon, a SIGHUP whose rediscovery raises logs the error and the old tree keeps serving."""
    settings = PluginSettings(
        backend="mock",
        backend_options={"control_socket": str(workdir / "mock.sock")},
        manager=manager_settings(workdir),
        state_dir=workdir,
    )
    daemon = Daemon(settings, config=None, overrides=Overrides())
    # The mock the daemon made was never started: nothing to close. Serve the faulty backend instead.
    backend = FaultyBackend(gpu_tree(4))
    daemon.manager.backend = backend
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        async with KubeletSimulator(workdir) as kubelet:
            run = asyncio.create_task(daemon.run(stop))
            try:
                await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 4, timeout=5)
                backend.push(unhealthy("GPU-0"))
                await kubelet.wait_for(lambda: kubelet.allocatable(GPU_RESOURCE) == 3, timeout=2)
                backend.discover_error = BackendUnavailable("NVML: driver/library version mismatch")
                os.kill(os.getpid(), signal.SIGHUP)
                await until(lambda: any(e["event"] == "task failed" for e in logs))
                await check_serves_last_tree(kubelet, GPU_RESOURCE, bad="GPU-0", good="GPU-1")
            finally:
                stop.set()
                await asyncio.wait_for(run, 10)
    failed = [e for e in logs if e["event"] == "task failed"]
    assert len(failed) == 1 and failed[0]["task"] == "daemon:sighup"
    assert isinstance(failed[0]["exc_info"], BackendUnavailable)


# 6 and 7: ``gpuplugin serve`` as a subprocess.


@dataclass
class Serve:
    """A running ``gpuplugin serve`` and what it logged so far (JSON lines; anything else kept apart)."""

    process: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            async with self.changed:
                if isinstance(event, dict):
                    self.events.append(event)
                elif line.strip():
                    self.other.append(line)
                self.changed.notify_all()

    async def wait_log(self, predicate: Callable[[dict[str, Any]], bool], *, after: int = 0) -> dict[str, Any]:
        """The first event from index ``after`` on that matches; TimeoutError after 10 s."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[after:] if predicate(e)), None)

        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: found() is not None or self.process.returncode is not None)
        event = found()
        assert event is not None, f"serve exited {self.process.returncode}: {self.events[after:]} {self.other}"
        return event

    async def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 10)


def serve_env() -> dict[str, str]:
    """The test's environment without settings that would change what ``serve`` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPLUGIN_", "DP_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


@asynccontextmanager
async def serve(directory: Path, *extra: str) -> AsyncIterator[Serve]:
    """``gpuplugin serve`` on ``directory`` (kubelet and state dir), logging JSON; killed if still running after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuplugin",
        "serve",
        "--kubelet-dir",
        str(directory),
        "--state-dir",
        str(directory),
        "--log-format",
        "json",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=serve_env(),
    )
    served = Serve(process)
    reader = asyncio.create_task(served.read())
    try:
        yield served
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await asyncio.wait_for(reader, 10)


def sockets_left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("gpuplugin-") or p.name == "mock.sock")


async def test_sigterm_during_an_allocate_burst_answers_or_fails_cleanly_and_exits_0(workdir: Path) -> None:
    """SIGTERM mid-burst: every Allocate is answered or fails with a gRPC or connection error, exit 0, no sockets."""
    async with KubeletSimulator(workdir) as kubelet, serve(workdir, "--backend", "mock") as plugin:
        registration = await kubelet.wait_registered(GPU, timeout=20)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=5)
        ids = sorted(kubelet.devices(GPU))
        # The simulator's own connection and three more, each with fewer calls in flight than the 100 streams
        # a connection may have open: grpclib's client never wakes a call queued for a stream slot on a closed
        # connection, which would hang the client, not the plugin.
        channels = [Channel(path=str(workdir / registration.endpoint)) for _ in range(3)]
        stubs = [kubelet.stub(GPU), *(api.DevicePluginStub(c) for c in channels)]
        outcomes: list[str] = []

        async def caller(stub: api.DevicePluginStub, n: int) -> None:
            """Allocate again and again until a call fails; a call is bounded, so a hang fails the test."""
            while True:
                try:
                    async with asyncio.timeout(10):
                        await stub.allocate(one_device(ids[n % len(ids)]))
                except TimeoutError:
                    outcomes.append("hung")
                    return
                except GRPCError as exc:
                    outcomes.append(exc.status.name)
                    return
                except CONNECTION_ERRORS as exc:
                    outcomes.append(type(exc).__name__)
                    return
                outcomes.append("OK")

        try:
            callers = [asyncio.create_task(caller(stub, n)) for stub in stubs for n in range(60)]
            await until(lambda: len(outcomes) >= 500, 20)
            plugin.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await asyncio.gather(*callers)
            returncode = await asyncio.wait_for(plugin.process.wait(), 10)
        finally:
            for channel in channels:
                channel.close()
    failures = Counter(o for o in outcomes if o != "OK")
    assert failures["hung"] == 0 and sum(failures.values()) == len(callers), failures
    assert outcomes.count("OK") >= 500
    assert returncode == 0
    assert sockets_left(workdir) == []
    assert plugin.events[-1]["event"] == "stopped"
    assert [e for e in plugin.events if e.get("level") in ("error", "critical")] == []
    assert not [line for line in plugin.other if "Traceback" in line], plugin.other


@pytest.mark.parametrize(
    ("text", "field_name"),
    [
        ("version: v1\nhealth:\n  recoveryQuietPeriodSeconds: soon\n", "health.recoveryQuietPeriodSeconds"),
        (
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n      - {name: nvidia.com/gpu, replicas: 1}\n",
            "sharing.timeSlicing.resources[0].replicas",
        ),
        ("version: v1\nplugin:\n  logLevel: loud\n", "plugin.logLevel"),
        ("version: v1\nflags:\n  migStrategy: [mixed]\n", "flags.migStrategy"),
    ],
    ids=["health", "sharing", "plugin", "flags"],
)
async def test_bad_config_at_start_exits_2_with_one_line_naming_the_field(
    workdir: Path, text: str, field_name: str
) -> None:
    """``serve --config bad.yaml`` exits 2 with one stderr line naming the bad field."""
    config = workdir / "bad.yaml"
    config.write_text(text)
    async with serve(workdir, "--config", str(config)) as plugin:
        returncode = await asyncio.wait_for(plugin.process.wait(), 20)
    lines = [*plugin.other, *(json.dumps(e) for e in plugin.events)]
    assert returncode == 2
    assert len(lines) == 1 and field_name in lines[0], lines
    assert sockets_left(workdir) == []


GOOD_CONFIG = "version: v1\nbackend:\n  name: mock\n  mock: {gpus: 4}\n"
#: A good config that changes something: every GPU served twice more, as nvidia.com/gpu.shared.
SHARED_CONFIG = GOOD_CONFIG + (
    "sharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n      - {name: nvidia.com/gpu, replicas: 2}\n"
)
BAD_CONFIGS = [
    (GOOD_CONFIG + "health:\n  recoveryQuietPeriodSeconds: soon\n", "health.recoveryQuietPeriodSeconds"),
    (
        GOOD_CONFIG + "sharing:\n  timeSlicing:\n    resources:\n      - {name: nvidia.com/gpu, replicas: 1}\n",
        "sharing.timeSlicing.resources[0].replicas",
    ),
]


def replace_file(path: Path, text: str) -> None:
    """Write a temporary file next to ``path`` and rename it over ``path``, as editors and tools do."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class ConfigMapVolume:
    """A directory laid out as the kubelet mounts a ConfigMap: ``config.yaml -> ..data/config.yaml``, ``..data``
    a symlink to a timestamped directory, swapped atomically on every update."""

    def __init__(self, directory: Path, text: str) -> None:
        self.directory = directory
        directory.mkdir()
        self._generation = 0
        self._current = self._write(text)
        (directory / "..data").symlink_to(self._current.name)
        (directory / "config.yaml").symlink_to("..data/config.yaml")

    @property
    def path(self) -> Path:
        return self.directory / "config.yaml"

    def _write(self, text: str) -> Path:
        self._generation += 1
        stamped = self.directory / f"..2026_01_01_00_00_0{self._generation}.{os.getpid()}"
        stamped.mkdir()
        (stamped / "config.yaml").write_text(text)
        return stamped

    def update(self, text: str) -> None:
        new = self._write(text)
        link = self.directory / "..data_tmp"
        link.symlink_to(new.name)
        os.replace(link, self.directory / "..data")
        (self._current / "config.yaml").unlink()
        self._current.rmdir()
        self._current = new


@pytest.mark.parametrize("swap", ["replace", "configmap"])
async def test_bad_config_on_reload_is_refused_and_the_old_one_keeps_serving(workdir: Path, swap: str) -> None:
    """A bad config written over the served one is refused naming the field; the old serves on; a good one applies."""
    directory = workdir / "cfg"
    volume: ConfigMapVolume | None = None
    if swap == "configmap":
        volume = ConfigMapVolume(directory, GOOD_CONFIG)
        config = volume.path
    else:
        directory.mkdir()
        config = directory / "config.yaml"
        config.write_text(GOOD_CONFIG)

    def write(text: str) -> None:
        if volume is not None:
            volume.update(text)
        else:
            replace_file(config, text)

    async with KubeletSimulator(workdir) as kubelet, serve(workdir, "--config", str(config)) as plugin:
        await kubelet.wait_registered(GPU, timeout=20)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 4 and kubelet.stream_open(GPU), timeout=5)
        registrations = len(kubelet.registrations)
        for text, field_name in BAD_CONFIGS:
            logged = len(plugin.events)
            write(text)
            refused = await plugin.wait_log(lambda e: str(e["event"]).startswith("config refused"), after=logged)
            assert field_name in refused["error"]
            # Give a wrongly applied config time to show before checking that nothing changed.
            await asyncio.sleep(0.3)
            assert kubelet.allocatable(GPU) == 4 and kubelet.stream_open(GPU)
            assert len(kubelet.registrations) == registrations and kubelet.stream_ends == []
            assert (await kubelet.admit(f"after-{field_name}", [{GPU: 1}])).device_ids(GPU)
        logged = len(plugin.events)
        write(SHARED_CONFIG)
        await kubelet.wait_registered(SHARED, after=registrations, timeout=5)
        await kubelet.wait_for(lambda: kubelet.allocatable(SHARED) == 8, timeout=5)
        reloaded = await plugin.wait_log(lambda e: e["event"] == "config reloaded", after=logged)
        assert reloaded["backend_restarted"] is False
        assert await plugin.terminate() == 0
    assert not [e for e in plugin.events if e.get("level") in ("critical",) or "Traceback" in json.dumps(e)]


# Bad input at the RPC level.


@asynccontextmanager
async def mock_node(directory: Path) -> AsyncIterator[tuple[KubeletSimulator, Manager]]:
    async with KubeletSimulator(directory) as kubelet, running(kubelet, mock_manager(directory), GPU, 8) as manager:
        yield kubelet, manager


async def refused_quickly(call: Callable[[], Awaitable[object]], within_s: float) -> GRPCError:
    """Run an RPC that must fail INVALID_ARGUMENT within ``within_s``; return its error."""
    started = time.perf_counter()
    with pytest.raises(GRPCError) as caught:
        await call()
    elapsed = time.perf_counter() - started
    assert caught.value.status is Status.INVALID_ARGUMENT, caught.value
    assert elapsed < within_s, f"refused after {elapsed:.2f} s"
    assert len(str(caught.value.message)) < 500, "the message echoes the request"
    return caught.value


@pytest.mark.parametrize("length", [MAX_DEVICE_ID_LENGTH + 1, 100_000])
async def test_allocate_device_id_too_long_invalid_argument(workdir: Path, length: int) -> None:
    """An Allocate naming a device ID longer than 63 characters fails INVALID_ARGUMENT naming the limit."""
    async with mock_node(workdir) as (kubelet, _):
        stub = kubelet.stub(GPU)
        error = await refused_quickly(lambda: stub.allocate(one_device("G" * length)), 1.0)
        assert str(MAX_DEVICE_ID_LENGTH) in str(error.message) and str(length) in str(error.message)
        # The plugin still answers a good request afterwards.
        assert (await stub.allocate(one_device(sorted(kubelet.devices(GPU))[0]))).container_responses


def allocate_request(*containers: list[str]) -> api.AllocateRequest:
    return api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=c) for c in containers])


def preferred_request(available: list[str]) -> api.PreferredAllocationRequest:
    container = api.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=1
    )
    return api.PreferredAllocationRequest(container_requests=[container])


@pytest.mark.parametrize(
    "case", ["distinct-ids", "copies-of-one-id", "containers", "preferred-available"], ids=lambda case: case
)
async def test_huge_requests_refused_quickly_naming_the_bound(workdir: Path, case: str) -> None:
    """100,000 IDs in a container, copies of one ID, 10,000 containers: INVALID_ARGUMENT at once, naming the bound."""
    async with mock_node(workdir) as (kubelet, _):
        stub = kubelet.stub(GPU)
        known = sorted(kubelet.devices(GPU))[0]
        call: Callable[[], Awaitable[object]]
        if case == "distinct-ids":
            request = allocate_request([f"g{i}" for i in range(100_000)])
            call, bound = lambda: stub.allocate(request), MAX_IDS_PER_LIST
        elif case == "copies-of-one-id":
            # A duplicate check quadratic in the list length would block the event loop for minutes here.
            request = allocate_request([known] * 20_000)
            call, bound = lambda: stub.allocate(request), MAX_IDS_PER_LIST
        elif case == "containers":
            request = allocate_request(*([known] for _ in range(10_000)))
            call, bound = lambda: stub.allocate(request), MAX_CONTAINERS
        else:
            preferred = preferred_request([f"g{i}" for i in range(20_000)])
            call, bound = lambda: stub.get_preferred_allocation(preferred), MAX_IDS_PER_LIST
        # Most of the time goes to encoding and decoding the message (pure Python protobuf, about 6 µs per ID
        # on each side); the bound itself is checked before any per-ID work.
        error = await refused_quickly(call, 5.0)
        assert str(bound) in str(error.message)
        assert (await stub.allocate(one_device(known))).container_responses


# Fuzzing the config loader.


@dataclass(frozen=True)
class ListOf:
    """In SCHEMA: a list whose items have this shape."""

    item: Any


def good(*values: Any) -> tuple[Any, ...]:
    """In SCHEMA: a leaf, with values that are right for it (so that documents get past it often)."""
    return values


XIDS = good([13, 31], [], [48, 79], [0], [2**40])
PATHS = good("/var/lib/kubelet/device-plugins", "/run/gpuplugin", "/", "relative/dir")
POLICIES = good("distributed", "packed", "topology")
#: The config file's known keys, nested as in the file, with good values at the leaves. The unsupported NVIDIA
#: sections (``resources``, ``imex``, ``sharing.mps``) are left out: any document with them is refused at once.
SCHEMA: dict[str, Any] = {
    "version": good("v1"),
    "plugin": {
        "kubeletDir": PATHS,
        "logFormat": good("auto", "json", "console"),
        "logLevel": good("info", "DEBUG", "warning"),
        "stateDir": PATHS,
        "metricsAddress": good(":9100", "[::1]:9100", "127.0.0.1:0", "localhost:65536", "[::1"),
    },
    "backend": {
        "name": good("mock", "nvml", "partitioned"),
        "mock": {"gpus": good(1, 8, 0, -1), "numa_nodes": good(1, 2), "nvlink_groups": good([[0, 1]], [])},
        "nvml": {"device_id_strategy": good("uuid", "index"), "pass_device_specs": good(True, False)},
        "partitioned": {
            "parent": good("mock", "nvml"),
            "parent_options": good({}, {"gpus": 2}, [], None),
            "strategy": good("single", "mixed"),
            "allocation_policy": POLICIES,
        },
    },
    "health": {
        "ignoredXids": XIDS,
        "fatalXids": XIDS,
        "enabledXids": XIDS,
        "recoveryQuietPeriodSeconds": good(0, 30, 0.5, -1, float("inf")),
        "enabled": good(True, False),
    },
    "allocation": {"policy": POLICIES},
    "flags": {
        "migStrategy": good("none", "single", "mixed"),
        "failOnInitError": good(True, False),
        "nvidiaDriverRoot": PATHS,
        "nvidiaDevRoot": PATHS,
        "plugin": {
            "passDeviceSpecs": good(True, False),
            "deviceListStrategy": good("envvar", ["volume-mounts", "cdi-cri"], "cdi-annotations,envvar", [], "x"),
            "deviceIDStrategy": good("uuid", "index"),
            "cdiAnnotationPrefix": good("cdi.k8s.io/", "bad prefix"),
            "cdiVendor": good("k8s.device-plugin.nvidia.com", "nvidia.com"),
            "cdiSpecDir": good("/var/run/cdi", ""),
            "cdiSpecFormat": good("json", "yaml", "toml"),
        },
    },
    "sharing": {
        "timeSlicing": {
            "renameByDefault": good(True, False),
            "failRequestsGreaterThanOne": good(True, False),
            "allocationPolicy": POLICIES,
            "resources": ListOf(
                {
                    "name": good("nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "kubernetes.io/gpu", "gpu"),
                    "replicas": good(2, 4, 1, 10**6),
                    "rename": good("nvidia.com/gpu.shared", "example.com/x", "no-domain"),
                    "devices": good("all", [0, 1], ["GPU-0"], [-1], "some"),
                    "perGpu": good({0: 2}, {"GPU-1": 1}, {1: 0}, {True: 2}),
                    "allocationPolicy": POLICIES,
                }
            ),
        },
    },
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=4)
    ),
    max_leaves=12,
)


def document(schema: Any, *, top: bool = False) -> st.SearchStrategy[Any]:
    """Documents shaped like ``schema``: any key left out, any value good for it or anything at all."""
    if isinstance(schema, tuple):
        # Twice the good values for each arbitrary one.
        return st.one_of(st.sampled_from(schema), st.sampled_from(schema), anything)
    if isinstance(schema, ListOf):
        return st.one_of(st.lists(document(schema.item), max_size=3), anything)
    shaped = st.fixed_dictionaries({}, optional={key: document(sub) for key, sub in schema.items()})
    return shaped if top else st.one_of(shaped, shaped, anything)


def render(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


#: Text made of YAML's syntax and the config's words, so that much of it parses.
YAML_ISH = st.lists(
    st.sampled_from([*":-[]{}&*!|>'\"%@`#,?\n \t", "  ", "v1", *SCHEMA, "timeSlicing", "resources", "1", "~", "0x1"]),
    max_size=40,
).map("".join)
ENV = st.fixed_dictionaries(
    {},
    optional={
        "DP_DISABLE_HEALTHCHECKS": st.sampled_from(["all", "xids", "13,79", "x", ""]) | st.text(max_size=10),
        "DP_ENABLE_HEALTHCHECKS": st.sampled_from(["79", "48, 63", "y", ""]) | st.text(max_size=10),
    },
)
#: What the command line and the environment may set in free text (click checks the others).
OVERRIDES = st.builds(
    Overrides,
    log_level=st.none() | st.none() | st.sampled_from(["info", "ERROR", "loud"]),
    metrics_address=st.none() | st.none() | st.text(max_size=12) | st.sampled_from([":9100", "[::1]:0"]),
    mig_strategy=st.none() | st.sampled_from(["none", "single", "mixed"]),
    device_list_strategy=st.none() | st.none() | st.text(max_size=12) | st.sampled_from(["envvar", "cdi-cri"]),
)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def load_or_refuse(text: str, overrides: Overrides, env: Mapping[str, str]) -> None:
    """The loader's contract: settings, or ConfigError; anything else (a crash with a traceback) fails."""
    try:
        loaded = settings_from_text(text, "fuzz.yaml", overrides, env)
    except ConfigError:
        return
    assert isinstance(loaded, PluginSettings)


@settings(FUZZ, max_examples=200)
@given(data=document(SCHEMA, top=True), overrides=OVERRIDES, env=ENV)
def test_config_loader_fuzzed_documents_load_or_raise_config_error(
    data: Any, overrides: Overrides, env: dict[str, str]
) -> None:
    """Random documents of the config's known keys and random values give settings or a ConfigError, nothing else."""
    load_or_refuse(render(data), overrides, env)


@FUZZ
@given(text=st.text() | YAML_ISH)
def test_config_loader_fuzzed_text_loads_or_raises_config_error(text: str) -> None:
    """Random text, YAML-ish or not, gives settings or a ConfigError, nothing else."""
    load_or_refuse(text, Overrides(), {})


@pytest.mark.parametrize(
    "text",
    [
        'version: v1\n"a\\nb": 1\n',
        'plugin: {"a\\nb": 1}\n',
        'sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, perGpu: {"x\\ny": 0}}]}}\n',
    ],
    ids=["top-level", "plugin", "perGpu"],
)
def test_config_error_naming_a_key_with_a_newline_is_one_line(text: str) -> None:
    """A ConfigError naming a key that holds a newline is still one line (found by the fuzzer)."""
    with pytest.raises(ConfigError) as caught:
        settings_from_text(text, "config.yaml", Overrides(), {})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("item", ["{a: b}", "[envvar]"], ids=["mapping", "list"])
def test_device_list_strategy_with_a_nested_item_is_refused(item: str) -> None:
    """flags.plugin.deviceListStrategy with a list or mapping as an item is a ConfigError naming it (fuzzer)."""
    with pytest.raises(ConfigError, match=r"flags\.plugin\.deviceListStrategy\[0\]"):
        settings_from_text(f"flags: {{plugin: {{deviceListStrategy: [{item}]}}}}", "config.yaml", Overrides(), {})
