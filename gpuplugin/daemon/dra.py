"""The daemon behind ``gpuplugin serve --kubelet-api dra``: the backend served through DRA instead of the device
plugin API, until SIGTERM or SIGINT.

The same backends, config file and state directory as the device plugin, and the same one-instance-per-node lock
(both APIs would hand out the same GPUs). What DRA mode does not do yet is refused at start with one line: sharing
(time-slicing, MPS) and device-list strategies, which DRA expresses through claims instead. It serves no probes or
metrics and does not reload its config; SIGHUP rediscovers the devices.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import structlog

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.instance import InstanceLock
from gpuplugin.core.tasks import Supervisor, TaskFailing, TaskSet, supervising
from gpuplugin.daemon.agent import make_backend
from gpuplugin.daemon.settings import PluginSettings
from gpuplugin.devices.strategies import DeviceListStrategy
from gpuplugin.dra.driver import DriverSettings

if TYPE_CHECKING:
    from lightkube import AsyncClient

    from gpuplugin.dra.node import DraDriver

log = structlog.get_logger("gpuplugin")


def check_dra_settings(settings: PluginSettings) -> None:
    """Refuse, naming the section, what the config asks for that DRA mode does not do (yet)."""
    if settings.sharing is not None:
        raise ConfigError("sharing.timeSlicing: not available with --kubelet-api dra (claims share devices there)")
    if settings.mps is not None:
        raise ConfigError("sharing.mps: not available with --kubelet-api dra")
    if settings.probes.address is not None:
        raise ConfigError("--metrics-address (plugin.metricsAddress): not served with --kubelet-api dra yet")
    if settings.strategies != DeviceListStrategy():
        raise ConfigError(
            "flags.plugin.deviceListStrategy: not used with --kubelet-api dra (it always names CDI devices)"
        )


class DraDaemon:
    """Runs the DRA driver of the node on the configured backend; ``failure`` is set when a task kept failing."""

    def __init__(self, settings: PluginSettings, driver: DriverSettings, *, api_server: str | None = None) -> None:
        check_dra_settings(settings)
        self.settings = settings
        self.driver_settings = driver
        self.api_server = api_server
        self.failure: TaskFailing | None = None
        self._stop: asyncio.Event | None = None
        self.supervisor = Supervisor(settings.manager.supervision, on_give_up=self._give_up)
        self._tasks = TaskSet("dra-daemon")

    def _give_up(self, failure: TaskFailing) -> None:
        log.critical("stopping: a task keeps failing", task=failure.task, reason=failure.reason)
        self.failure = failure
        if self._stop is not None:
            self._stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then close everything. Raises what the backend's start raises (after
        closing), and TaskFailing when a supervised task kept failing."""
        # Here, not at the top: `serve` in device-plugin mode never loads the API client.
        from gpuplugin.dra.apiserver import ApiClaimSource, SlicePublisher, api_client
        from gpuplugin.dra.node import DraDriver

        self._stop = stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        instance = InstanceLock(self.settings.state_dir)
        client: AsyncClient | None = None
        driver: DraDriver | None = None
        log.info("starting", backend=self.settings.backend, kubelet_api="dra", node=self.driver_settings.node_name)
        try:
            client = await asyncio.to_thread(api_client, self.api_server)
            with supervising(self.supervisor):
                if await instance.acquire(self.settings.instance_wait_s, stop=stop):
                    driver = DraDriver(
                        make_backend(self.settings),
                        self.driver_settings,
                        ApiClaimSource(client),
                        SlicePublisher(self.driver_settings, client),
                    )
                    await driver.start()
                    loop.add_signal_handler(signal.SIGHUP, self._rediscover, driver)
                await stop.wait()
        finally:
            log.info("stopping")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._tasks.aclose()
            if driver is not None:
                await driver.aclose()
            if client is not None:
                await client.close()
            instance.release()
            self.supervisor.close()
        log.info("stopped")
        if self.failure is not None:
            raise self.failure

    def _rediscover(self, driver: DraDriver) -> None:
        log.info("SIGHUP: rediscovering the devices")
        self._tasks.spawn(driver.rediscover(), "rediscover", expect_end=True)
