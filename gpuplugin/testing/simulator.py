"""A kubelet device manager that runs in-process: a real unix-socket gRPC peer for tests, the demo, the benchmarks
and ``gpuplugin kubelet``.

It mirrors upstream ``pkg/kubelet/cm/devicemanager`` where a plugin can tell the difference, in one module per
part: ``registration_server`` (Register validates, dials and asks for the options before it answers),
``plugin_streams`` (one ListAndWatch stream per resource is held open and its end zeroes allocatable),
``admission`` (free healthy devices, GetPreferredAllocation as a hint, Allocate one container at a time, a
checkpoint), ``plugin_watcher`` (registration through the kubelet's plugin watcher) and ``node`` (the state they
share). A restart wipes the socket directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.admission import Admission, Admitter
from gpuplugin.testing.node import (
    CHECKPOINT_FILE,
    DEPRECATION_FILE,
    DeviceState,
    KubeletEvent,
    NodeState,
    Registration,
    Rejection,
    Restart,
    SimulatorSettings,
    StreamEnd,
)
from gpuplugin.testing.plugin_streams import PluginStreams
from gpuplugin.testing.plugin_watcher import PluginWatcher
from gpuplugin.testing.registration_server import RegistrationServer

log = structlog.get_logger("gpuplugin.testing.simulator")


class KubeletSimulator:
    """Serves ``v1beta1.Registration`` on ``directory / "kubelet.sock"`` and plays the kubelet's device manager.

    ``on_event`` hears each registration, rejection, device list, stream end and restart as it happens.
    """

    def __init__(
        self,
        directory: Path,
        settings: SimulatorSettings | None = None,
        *,
        on_event: Callable[[KubeletEvent], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings or SimulatorSettings()
        self._state = NodeState(self.directory, self.settings, on_event)
        self._streams = PluginStreams(self._state)
        self._registration = RegistrationServer(self._state, self._streams)
        self._watcher = PluginWatcher(self._state, self._registration)
        self._admitter = Admitter(self._state)
        self._closed = False

    @property
    def socket_path(self) -> Path:
        return self._registration.socket_path

    @property
    def checkpoint_path(self) -> Path:
        return self._state.checkpoint_path

    @property
    def plugin_watcher(self) -> bool:
        """Whether this kubelet asks for plugin-watcher registration (it writes ``DEPRECATION``)."""
        return self._state.plugin_watcher

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the directory, wipe stale sockets (unless configured not to) and serve ``kubelet.sock``."""
        if self._registration.serving:
            raise RuntimeError("kubelet simulator already started")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        if self.settings.wipe_on_start:
            async with self._state.checkpoint_lock:
                await asyncio.to_thread(self._wipe_directory)
        await asyncio.to_thread(self._watcher.write_deprecation)
        await self._registration.serve()
        self._watcher.start()

    async def aclose(self) -> None:
        """Drop every plugin connection and stream, stop serving and remove ``kubelet.sock``."""
        if self._closed:
            return
        self._closed = True
        # Server first: a Register still in flight is cancelled before it can install an endpoint.
        await self._registration.stop()
        await self._watcher.stop()
        await self._streams.drop_all()
        await self._state.tasks.aclose()
        # Go's unix listener unlinks its socket on close; a plugin watching the directory sees the kubelet go.
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.socket_path.unlink)
        await self._state.notify()

    async def restart(self) -> Restart:
        """Simulate a kubelet restart; pods keep their devices, device lists stay empty until plugins re-register."""
        started = time.monotonic()
        await self._registration.stop()
        await self._watcher.stop()
        await self._streams.drop_all()
        self._state.devices.clear()
        async with self._state.checkpoint_lock:
            await asyncio.to_thread(self._wipe_directory)
        await self._registration.serve()
        # A new plugin watcher registers every socket it finds, those of plugins that have not noticed too.
        self._watcher.start()
        restart = Restart(started_monotonic_s=started, served_monotonic_s=time.monotonic())
        self._state.restarts.append(restart)
        self._state.emit(restart)
        log.info("kubelet restarted", directory=str(self.directory))
        await self._state.notify()
        return restart

    # State a test can read.

    @property
    def registrations(self) -> list[Registration]:
        return list(self._state.registrations)

    @property
    def rejections(self) -> list[Rejection]:
        return list(self._state.rejections)

    @property
    def stream_ends(self) -> list[StreamEnd]:
        return list(self._state.stream_ends)

    @property
    def restarts(self) -> list[Restart]:
        return list(self._state.restarts)

    @property
    def warnings(self) -> list[str]:
        """Plugin misbehaviour the kubelet tolerates (a bad preferred allocation, an over-long ID)."""
        return list(self._state.warnings)

    def resources(self) -> list[str]:
        return sorted(self._state.devices)

    def devices(self, resource: str) -> dict[str, str]:
        """Device ID to health string, as last reported (all Unhealthy once the stream has ended)."""
        return {i: d.health for i, d in self._state.devices.get(resource, {}).items()}

    def device_states(self, resource: str) -> dict[str, DeviceState]:
        return dict(self._state.devices.get(resource, {}))

    def capacity(self, resource: str) -> int:
        return len(self._state.devices.get(resource, {}))

    def allocatable(self, resource: str) -> int:
        """Healthy devices, allocated or not: what the kubelet reports as the node's allocatable."""
        return self._state.allocatable(resource)

    def in_use(self, resource: str) -> set[str]:
        return self._state.in_use(resource)

    def free(self, resource: str) -> int:
        """Healthy devices not held by any pod: what the next admission may take."""
        return len(self._state.available(resource))

    def pod_devices(self, pod: str) -> dict[str, dict[str, tuple[str, ...]]]:
        return {c: dict(r) for c, r in self._state.pods.get(pod, {}).items()}

    def pods(self) -> list[str]:
        return sorted(self._state.pods)

    def stream_open(self, resource: str) -> bool:
        endpoint = self._state.endpoints.get(resource)
        return endpoint is not None and endpoint.stream_open

    def options(self, resource: str) -> v1beta1.DevicePluginOptions | None:
        endpoint = self._state.endpoints.get(resource)
        return None if endpoint is None else endpoint.options

    def endpoint_path(self, resource: str) -> Path:
        """The current endpoint's socket, for another client to dial (the benchmark's Go client)."""
        return self.directory / self._streams.connected(resource).endpoint

    def stub(self, resource: str) -> v1beta1.DevicePluginStub:
        """A client on the current endpoint's connection, for tests that call RPCs directly."""
        return self._streams.connected(resource).stub

    # A mandatory timeout on purpose (ASYNC109): a test that waits on the simulator must fail, never hang.
    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` holds, re-checked on every state change; TimeoutError after ``timeout`` s."""
        async with asyncio.timeout(timeout), self._state.changed:
            await self._state.changed.wait_for(predicate)

    async def wait_registered(self, resource: str, *, after: int = 0, timeout: float) -> Registration:  # noqa: ASYNC109
        """The first registration of ``resource`` whose index is at least ``after`` (pass ``len(registrations)``)."""

        def found() -> Registration | None:
            return next((r for r in self._state.registrations[after:] if r.resource == resource), None)

        await self.wait_for(lambda: found() is not None, timeout)
        registration = found()
        assert registration is not None
        return registration

    def _wipe_directory(self) -> None:
        """The kubelet's start-up cleanup: every non-directory entry but the checkpoint goes, sockets included.

        ``DEPRECATION`` stays when this kubelet wants it: the kubelet writes it again at once, and a plugin that
        serves again in between must not take it for a kubelet that wants ``Register``.
        """
        for entry in os.scandir(self.directory):
            if entry.name == CHECKPOINT_FILE or entry.is_dir(follow_symlinks=True):
                continue
            if entry.name == DEPRECATION_FILE and self.plugin_watcher:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)

    # Admission.

    async def admit(self, pod: str, containers: Sequence[Mapping[str, int]]) -> Admission:
        """Admit ``pod`` whose containers ask for ``{resource: count}``; raises AdmissionError, freeing the pod."""
        return await self._admitter.admit(pod, containers)

    async def remove_pod(self, pod: str) -> None:
        """Free the pod's devices and update the checkpoint; a pod that is not there is ignored, as upstream."""
        await self._admitter.remove_pod(pod)
