"""The daemon behind ``gpuplugin serve``: the manager, signals, and the config file's hot reload.

A reload (file change, ConfigMap swap, SIGHUP) re-reads the config; a bad file is refused and the running
config keeps serving. A change of the backend or health sections restarts the backend; any other change only
re-applies the transforms and sinks, so resources whose devices did not change keep their server and stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gpuplugin.backends.registry import BackendContext, load_factory
from gpuplugin.core.backend import Backend, BackendUnavailable
from gpuplugin.core.errors import DevicesRefuseConfig
from gpuplugin.core.instance import InstanceLock, remove_dead_sockets
from gpuplugin.core.limits import check_tree
from gpuplugin.core.model import DeviceTree
from gpuplugin.core.tasks import Supervisor, TaskFailing, TaskSet, supervising
from gpuplugin.daemon.manager import Manager, ServerFactory, TreeSink, TreeTransform
from gpuplugin.daemon.reload import ConfigWatcher
from gpuplugin.daemon.settings import Overrides, PluginSettings, parse_config, resolve
from gpuplugin.devices.cdi import spec_writer_for
from gpuplugin.devices.strategies import DeviceListStrategy
from gpuplugin.kubelet.server import ResourceServer

if TYPE_CHECKING:
    from gpuplugin.daemon.metrics import Metrics
    from gpuplugin.daemon.probes import ProbeServer

log = structlog.get_logger("gpuplugin")

#: Worker threads for blocking calls; asyncio's default is one per CPU plus four, up to 32 on big nodes.
IO_THREADS = 4


@contextlib.contextmanager
def node_process(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> Iterator[asyncio.Runner]:
    """The event loop of a node agent's process (``serve``, in either mode), from ``loop_factory`` (None: asyncio's):
    NVML, file I/O and the API client's set-up go to at most ``IO_THREADS`` threads, and each idle thread costs memory
    (its malloc arena). The bound belongs to the loop and goes with it: the daemons never set an executor on the loop
    they run on, which may be someone else's (a test's, where an executor left behind outlives the daemon)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.get_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="gpuplugin-io")
        )
        yield runner


#: What a daemon handles while it runs; SIGHUP's handler is each daemon's own.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED_SIGNALS = (*_STOP_SIGNALS, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals(stop: asyncio.Event) -> Iterator[asyncio.AbstractEventLoop]:
    """SIGTERM and SIGINT set ``stop`` while the block runs, on the running loop (given to the block). On the way
    out, whatever the block raised, the handlers of those and of SIGHUP are removed before the daemon closes
    anything (a second SIGTERM or Ctrl-C during a slow shutdown then acts at once, and a SIGHUP starts no reload in
    a daemon that is closing), and the ones found at the start are back: the loop's removal would otherwise leave
    the defaults in place of its runner's own SIGINT handler, on a loop that may outlive the daemon (a test's)."""
    loop = asyncio.get_running_loop()
    found = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    try:
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        yield loop
    finally:
        for sig, handler in found.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


def make_backend(settings: PluginSettings) -> Backend:
    factory = load_factory(settings.backend)
    backend = factory(
        BackendContext(options=settings.backend_options, health_policy=settings.health, state_dir=settings.state_dir)
    )
    if settings.mps is not None:
        # Here, not at the top: a node without MPS sharing never loads the MPS daemon's control code.
        from gpuplugin.devices.mps import MpsBackend

        backend = MpsBackend(backend, settings.mps)
    return backend


def pipeline(settings: PluginSettings) -> tuple[list[TreeTransform], list[TreeSink]]:
    """The transforms and sinks a config asks for, in the order they apply."""
    transforms: list[TreeTransform] = []
    if settings.sharing is not None:
        transforms.append(settings.sharing.apply)
    if settings.strategies != DeviceListStrategy():
        transforms.append(settings.strategies.apply)
    # Last: a resource the kubelet could not receive is refused before any server or sink sees it.
    transforms.append(check_tree)
    writer = spec_writer_for(settings.strategies, settings.cdi)
    return transforms, [] if writer is None else [writer]


async def served_tree(settings: PluginSettings) -> DeviceTree:
    """What the kubelet would be served: the backend's discovery through the config's transforms (no sink runs)."""
    backend = make_backend(settings)
    await backend.start()
    try:
        tree = await backend.discover()
    finally:
        await backend.aclose()
    for transform in pipeline(settings)[0]:
        tree = transform(tree)
    return tree


def settings_from_text(
    text: str | None, source: str, overrides: Overrides, env: Mapping[str, str] = os.environ
) -> PluginSettings:
    data: dict[str, Any] = {} if text is None else parse_config(text, source)
    return resolve(overrides, data, env, source)


#: The settings a reload applies: a change of these four by a new backend (MPS sharing owns control daemons), of the
#: others by re-applying the transforms and sinks.
_BACKEND_SETTINGS = ("backend", "backend_options", "health", "mps")
_RELOADED_SETTINGS = {*_BACKEND_SETTINGS, "sharing", "strategies", "cdi"}
#: The rest are read once, at start; derived, so that a new setting is named when a reload cannot apply it.
_RESTART_SETTINGS = tuple(f.name for f in fields(PluginSettings) if f.name not in _RELOADED_SETTINGS)


#: The log line of a reload whose new backend does not start.
BACKEND_REFUSED = "config refused: its backend does not start; back to the current config"


def changed_settings(new: PluginSettings, old: PluginSettings, names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose value differs between ``new`` and ``old``."""
    return [name for name in names if getattr(new, name) != getattr(old, name)]


class SupervisedDaemon:
    """What the daemons of both modes share: the supervisor every task of the process reports to; ``run``, which
    ends, once everything is closed, with the failure of a task that kept failing; and the config file's reload
    (its watcher, SIGHUP, the parsing of a new text), each mode applying a new config its own way."""

    #: The log line of a SIGHUP.
    sighup_event = "SIGHUP: reloading"

    def __init__(
        self,
        settings: PluginSettings,
        *,
        config: Path | None,
        config_text: str | None,
        overrides: Overrides,
        tasks: str,
    ) -> None:
        """``config_text``: the text of ``config`` that ``settings`` come from; the watcher reloads on any other.
        Not read again here: an edit made since would then pass for the text being served, and never apply.
        ``tasks``: the name the daemon's own tasks carry."""
        self.supervisor = Supervisor(settings.manager.supervision, on_give_up=self._give_up)
        self._stop: asyncio.Event | None = None
        self.failure: TaskFailing | None = None
        """The task that kept failing and ended the daemon, if one did."""
        self.settings = settings
        self._config = config
        self._config_text = config_text
        self._overrides = overrides
        self._tasks = TaskSet(tasks)
        # One reload at a time, and no rediscovery while one replaces the backend.
        self._reloading = asyncio.Lock()
        self.reloads = 0
        self.refused = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Start serving; return once ``stop`` is set and everything is closed. Raises TaskFailing, once everything
        is closed, when a supervised task kept failing past its grace period."""
        self._stop = stop
        # Around everything, signal handlers too: a task a SIGHUP reload starts reports to this supervisor as well.
        with supervising(self.supervisor):
            await self._serve(stop)
        if self.failure is not None:
            raise self.failure

    async def _serve(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def reload(self, text: str) -> None:
        """Apply a new config text; a bad one is refused with one log line and the current config keeps serving."""
        raise NotImplementedError

    async def _rediscover(self) -> None:
        raise NotImplementedError

    def _watcher(self) -> ConfigWatcher | None:
        """The config file's watcher, where there is a file."""
        if self._config is None:
            return None
        return ConfigWatcher(self._config, self.reload, initial_text=self._config_text)

    async def _parse(self, text: str) -> PluginSettings:
        """The settings of a new config text, from the same overrides; raises ConfigError."""
        # In a thread: a megabyte of YAML takes seconds to parse, and /healthz must answer meanwhile.
        return await asyncio.to_thread(settings_from_text, text, str(self._config), self._overrides)

    def _refuse(self, exc: Exception, event: str = "config refused; the current config keeps serving") -> None:
        self.refused += 1
        log.error(event, error=str(exc))

    def _on_sighup(self, watcher: ConfigWatcher | None) -> None:
        log.info(self.sighup_event)
        self._tasks.spawn(self._sighup(watcher), "sighup", expect_end=True)

    async def _sighup(self, watcher: ConfigWatcher | None) -> None:
        if watcher is not None:
            await watcher.check()
        await self._rediscover()

    def _give_up(self, failure: TaskFailing) -> None:
        log.critical("stopping: a task keeps failing", task=failure.task, reason=failure.reason)
        self.failure = failure
        if self._stop is not None:
            self._stop.set()


class Daemon(SupervisedDaemon):
    """Serves until stopped; reloads its config file when it changes or on SIGHUP."""

    def __init__(
        self, settings: PluginSettings, *, config: Path | None, overrides: Overrides, config_text: str | None = None
    ) -> None:
        super().__init__(settings, config=config, config_text=config_text, overrides=overrides, tasks="daemon")
        transforms, sinks = pipeline(settings)
        # Metrics and the probe server exist only where an address is set: prometheus_client and h11 cost memory
        # and start-up time.
        self.metrics: Metrics | None = None
        server_factory: ServerFactory = ResourceServer
        if settings.probes.address is not None:
            from gpuplugin.daemon.metrics import Metrics
            from gpuplugin.daemon.probes import ProbeServer

            self.metrics = Metrics()
            server_factory = self.metrics.server_factory
        self.manager = Manager(
            make_backend(settings),
            settings.manager,
            transforms=transforms,
            sinks=sinks,
            server_factory=server_factory,
        )
        self.probes: ProbeServer | None = None
        if self.metrics is not None:
            self.metrics.attach(self.manager)
            self.metrics.watch_tasks(self.supervisor)
            self.probes = ProbeServer(self.manager, self.metrics, settings.probes, supervisor=self.supervisor)

    async def _serve(self, stop: asyncio.Event) -> None:
        watcher = self._watcher()
        instance = InstanceLock(self.settings.state_dir)
        # /readyz names the holder while we wait for it.
        self.manager.instance_lock = instance
        log.info("starting", backend=self.settings.backend, kubelet_dir=str(self.settings.manager.server.kubelet_dir))
        try:
            with stop_signals(stop) as loop:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup, watcher)
                await self._start(stop, instance, watcher)
                await stop.wait()
        finally:
            log.info("stopping")
            await self._tasks.aclose()
            await self.manager.aclose()
            # After the manager: our sockets are gone before the next instance takes over.
            instance.release()
            if self.probes is not None:
                await self.probes.aclose()
            self.supervisor.close()
        log.info("stopped")

    async def _start(self, stop: asyncio.Event, instance: InstanceLock, watcher: ConfigWatcher | None) -> None:
        if self.probes is not None:
            # Before the manager: /healthz answers and /readyz says why not ready while we start.
            await self.probes.start()
        # One instance per node: wait for (or refuse) another one's lock; nothing is served until it is ours.
        if await instance.acquire(self.settings.instance_wait_s, stop=stop):
            server = self.settings.manager.server
            await remove_dead_sockets(server.kubelet_dir, server.socket_prefix)
            # And the plugin-watcher sockets (same names) a killed instance left where the kubelet looks.
            await remove_dead_sockets(server.plugins_registry_dir, server.socket_prefix)
            await self.manager.start()
            if watcher is not None:
                self._tasks.supervise(watcher.run, "config watcher")

    async def _rediscover(self) -> None:
        await self.manager.rediscover()

    async def reload(self, text: str) -> None:
        """Apply a new config text; a bad one is refused with one log line and the current config keeps serving."""
        async with self._reloading:
            old = self.settings
            try:
                new = await self._parse(text)
                backend = make_backend(new) if changed_settings(new, old, _BACKEND_SETTINGS) else None
            except (LookupError, ValueError) as exc:  # a ConfigError, an unknown backend, options it refuses
                self._refuse(exc)
                return
            if new == old:
                log.info("config reloaded; nothing changed")
                return
            for name in changed_settings(new, old, _RESTART_SETTINGS):
                log.warning("config change needs a restart to apply", setting=name)
            transforms, sinks = pipeline(new)
            # Unchanged CDI settings keep their writer: a new one would delete and rewrite the same spec files.
            keep_sinks = (new.strategies, new.cdi) == (old.strategies, old.cdi)
            try:
                await self.manager.reconfigure(
                    transforms=transforms, sinks=None if keep_sinks else sinks, backend=backend
                )
            except DevicesRefuseConfig as exc:  # found once the devices are known: too many replicas for the kubelet
                self._refuse(exc, "config refused; back to the current config")
                await self._restore(old, backend_replaced=backend is not None, sinks_replaced=not keep_sinks)
                return
            except (BackendUnavailable, ValueError) as exc:
                self._refuse(exc, BACKEND_REFUSED)
                await self._restore(old, backend_replaced=backend is not None, sinks_replaced=not keep_sinks)
                return
            self.settings = new
            self.reloads += 1
            log.info("config reloaded", backend_restarted=backend is not None)

    async def _restore(self, old: PluginSettings, *, backend_replaced: bool, sinks_replaced: bool) -> None:
        transforms, sinks = pipeline(old)
        await self.manager.reconfigure(
            transforms=transforms,
            sinks=sinks if sinks_replaced else None,
            backend=make_backend(old) if backend_replaced else None,
        )
