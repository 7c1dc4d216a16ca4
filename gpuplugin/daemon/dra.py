"""The daemon behind ``gpuplugin serve --kubelet-api dra``: the backend served through DRA instead of the device
plugin API, until SIGTERM or SIGINT.

The same backends, config file and state directory as the device plugin, the same one-instance-per-node lock (both
APIs would hand out the same GPUs), and the same process set-up (``node_process``, ``stop_signals``). What DRA mode
does not do is refused at start with one line: sharing (time-slicing, MPS) and device-list strategies, which DRA
expresses through claims instead.

Operated as the device plugin is: ``--metrics-address`` serves ``/healthz`` (red when a supervised task keeps failing
or the event loop lags), ``/readyz`` (ready once the kubelet has registered the plugin and the node's ResourceSlices
are published) and ``/metrics`` (``gpuplugin_dra_*``: claims, prepare latency, devices, slices, registrations). The
config file is reloaded when it changes and on SIGHUP, which also rediscovers the devices: a change of the backend or
health sections restarts the backend (its devices discovered and the slices published again); a change of anything
else is refused with one line, and the running config keeps serving.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gpuplugin.core.backend import BackendUnavailable
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.instance import InstanceLock
from gpuplugin.core.model import DeviceTree
from gpuplugin.daemon.agent import BACKEND_REFUSED, SupervisedDaemon, changed_settings, make_backend, stop_signals
from gpuplugin.daemon.reload import ConfigWatcher
from gpuplugin.daemon.settings import Overrides, PluginSettings
from gpuplugin.devices.strategies import DeviceListStrategy
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.node import DraDriver
from gpuplugin.dra.slices import NO_REASONS, Reasons

if TYPE_CHECKING:
    from lightkube import AsyncClient

    from gpuplugin.daemon.metrics import DraReadings, Metrics
    from gpuplugin.daemon.probes import ProbeServer
    from gpuplugin.dra.apiserver import SlicePublisher

log = structlog.get_logger("gpuplugin")

#: What a reload applies in DRA mode, by a new backend: the health policy is the backend's too.
LIVE_SETTINGS = ("backend", "backend_options", "health")
#: The rest are read once, at start; derived, so that a new setting is named when a reload refuses it.
_RESTART_SETTINGS = tuple(f.name for f in fields(PluginSettings) if f.name not in LIVE_SETTINGS)


def check_dra_settings(settings: PluginSettings) -> None:
    """Refuse, naming the section, what the config asks for that DRA mode does not do."""
    if settings.sharing is not None:
        raise ConfigError("sharing.timeSlicing: not available with --kubelet-api dra (claims share devices there)")
    if settings.mps is not None:
        raise ConfigError("sharing.mps: not available with --kubelet-api dra")
    if settings.strategies != DeviceListStrategy():
        raise ConfigError(
            "flags.plugin.deviceListStrategy: not used with --kubelet-api dra (it always names CDI devices)"
        )


class CountedPublisher:
    """The slice publisher, with the publications of a new tree (and the checks) that left the slices unpublished
    counted; a ``Publisher``. Its own retries in between are not counted: they end in a publication or go on."""

    def __init__(self, publisher: SlicePublisher) -> None:
        self.publisher = publisher
        self.failures = 0

    async def publish(self, tree: DeviceTree, reasons: Reasons = NO_REASONS) -> None:
        await self.publisher.publish(tree, reasons)
        self._count()

    async def reconcile(self) -> None:
        await self.publisher.reconcile()
        self._count()

    def _count(self) -> None:
        if self.publisher.problem is not None:
            self.failures += 1

    async def aclose(self) -> None:
        await self.publisher.aclose()


class DraDaemon(SupervisedDaemon):
    """Runs the DRA driver of the node on the configured backend; ``failure`` is set when a task kept failing."""

    sighup_event = "SIGHUP: reloading and rediscovering the devices"

    def __init__(
        self,
        settings: PluginSettings,
        driver: DriverSettings,
        *,
        api_server: str | None = None,
        config: Path | None = None,
        config_text: str | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        """``config_text``: the text of ``config`` that ``settings`` come from; the watcher reloads on any other."""
        check_dra_settings(settings)
        super().__init__(
            settings, config=config, config_text=config_text, overrides=overrides or Overrides(), tasks="dra-daemon"
        )
        self.driver_settings = driver
        self.api_server = api_server
        self.driver: DraDriver | None = None
        """Set once the driver is made (the instance lock is ours)."""
        self.publisher: CountedPublisher | None = None
        self._instance: InstanceLock | None = None
        self.metrics: Metrics | None = None
        self.probes: ProbeServer | None = None
        if settings.probes.address is not None:
            # Here, as in device-plugin mode: prometheus_client and h11 load only where probes are served.
            from gpuplugin.daemon.metrics import Metrics
            from gpuplugin.daemon.probes import ProbeServer

            self.metrics = Metrics()
            self.metrics.watch_tasks(self.supervisor)
            self.metrics.attach_dra(self.readings)
            self.probes = ProbeServer(self.not_ready_reasons, self.metrics, settings.probes, supervisor=self.supervisor)

    async def _serve(self, stop: asyncio.Event) -> None:
        watcher = self._watcher()
        instance = self._instance = InstanceLock(self.settings.state_dir)
        client: AsyncClient | None = None
        log.info("starting", backend=self.settings.backend, kubelet_api="dra", node=self.driver_settings.node_name)
        try:
            with stop_signals(stop) as loop:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup, watcher)
                if self.probes is not None:
                    # First: /healthz answers and /readyz says why not ready while we start.
                    await self.probes.start()
                # Here, not at the top: `serve` in device-plugin mode never loads the API client.
                from gpuplugin.dra.apiserver import api_client

                client = await asyncio.to_thread(api_client, self.api_server)
                if await instance.acquire(self.settings.instance_wait_s, stop=stop):
                    await self._start(client, watcher)
                await stop.wait()
        finally:
            log.info("stopping")
            await self._tasks.aclose()
            if self.driver is not None:
                await self.driver.aclose()
            if client is not None:
                await client.close()
            instance.release()
            if self.probes is not None:
                await self.probes.aclose()
            self.supervisor.close()
        log.info("stopped")

    async def _start(self, client: AsyncClient, watcher: ConfigWatcher | None) -> None:
        from gpuplugin.dra.apiserver import ApiClaimSource, SlicePublisher

        claims = ApiClaimSource(client)
        self.publisher = CountedPublisher(SlicePublisher(self.driver_settings, client))
        driver = self.driver = DraDriver(make_backend(self.settings), self.driver_settings, claims, self.publisher)
        if self.metrics is not None:
            # The preparer tells the metrics of every NodePrepareResources and NodeUnprepareResources.
            driver.plugin.preparer.observer = self.metrics.claims
        await driver.start()
        if watcher is not None:
            self._tasks.supervise(watcher.run, "config watcher")

    def not_ready_reasons(self) -> list[str]:
        """Why the node is not ready, one short line each: ready once the kubelet has registered the plugin and
        the node's ResourceSlices are published."""
        reasons = []
        lock = self._instance
        if lock is not None and lock.waiting_for is not None:
            reasons.append(f"another gpuplugin ({lock.waiting_for}) holds {lock.path}; waiting for it to stop")
        if self.driver is None or self.publisher is None:
            return reasons or ["DRA driver not started"]
        registration = self.driver.plugin.registration
        if registration.error is not None:
            reasons.append(f"kubelet refused the DRA plugin: {registration.error}")
        elif not registration.registered.is_set():
            registry = self.driver_settings.plugins_registry_dir
            reasons.append(f"DRA plugin not registered by the kubelet yet (plugin watcher in {registry})")
        problem = self.publisher.publisher.problem
        if problem is not None:
            reasons.append(problem)
        elif self.publisher.publisher.publications == 0:
            reasons.append("ResourceSlices not published yet")
        return reasons

    def readings(self) -> DraReadings:
        """The state ``/metrics`` reports, read now."""
        from gpuplugin.daemon.metrics import DraReadings

        driver, publisher = self.driver, self.publisher
        if driver is None or publisher is None:
            return DraReadings()
        return DraReadings(
            devices=Counter(str(device.health) for device in driver.tree.devices),
            prepared_claims=len(driver.plugin.checkpoint.claims),
            registered=driver.plugin.registration.registered.is_set(),
            registrations=driver.registrations,
            slices_current=publisher.publisher.problem is None and publisher.publisher.publications > 0,
            slice_publications=publisher.publisher.publications,
            slice_failures=publisher.failures,
            ready=not self.not_ready_reasons(),
            backend=driver.backend,
        )

    async def _rediscover(self) -> None:
        # Not while a reload replaces the backend: the one rediscovered would be the one being closed.
        async with self._reloading:
            if self.driver is not None:
                await self.driver.rediscover()

    async def reload(self, text: str) -> None:
        """Apply a new config text: a new backend where the backend or health sections changed. A bad config, or
        one that changes what only a restart applies, is refused with one log line and the current one keeps
        serving."""
        async with self._reloading:
            old = self.settings
            try:
                new = await self._parse(text)
                check_dra_settings(new)
                fixed = changed_settings(new, old, _RESTART_SETTINGS)
                if fixed:
                    raise ConfigError(f"{', '.join(fixed)}: cannot change while serving in DRA mode; restart to apply")
                backend = make_backend(new) if changed_settings(new, old, LIVE_SETTINGS) else None
            except (LookupError, ValueError) as exc:  # a ConfigError, an unknown backend, options it refuses
                self._refuse(exc)
                return
            if backend is None:
                log.info("config reloaded; nothing changed")
                return
            if self.driver is not None:
                try:
                    await self.driver.replace_backend(backend)
                except (BackendUnavailable, ValueError) as exc:
                    self._refuse(exc, BACKEND_REFUSED)
                    await self.driver.replace_backend(make_backend(old))
                    return
            # Without a driver yet (waiting for the instance lock), it starts on the new settings.
            self.settings = new
            self.reloads += 1
            log.info("config reloaded", backend_restarted=self.driver is not None)
