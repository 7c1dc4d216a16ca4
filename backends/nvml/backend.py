"""The NVML backend: whole NVIDIA GPUs, discovered through NVML, watched by one health thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import structlog

from gpuplugin.backends.nvml import discovery
from gpuplugin.backends.nvml.events import (
    EccObserved,
    GpuLost,
    HealthWatcher,
    MigConfigChanged,
    Observation,
    WaitFailing,
    WaitRecovered,
    XidObserved,
)
from gpuplugin.backends.nvml.library import LibraryLoader, initialize, preload_library, unavailable_message
from gpuplugin.backends.nvml.mig import GpuInstanceProfile
from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.backends.nvml.timeslice import ComputePolicy
from gpuplugin.core.backend import BackendEvent, BackendUnavailable, HealthChanged, InventoryChanged
from gpuplugin.core.clock import REAL_CLOCK, Backoff, Clock, wait_at_most
from gpuplugin.core.model import DeviceTree
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.health import HealthPolicy, HealthTracker, XidAction

log = structlog.get_logger("gpuplugin.nvml")


class NvmlBackend:
    """Serves every whole GPU NVML finds and turns NVML events into health; MIG-enabled GPUs are skipped, or with
    ``report_mig_devices`` served as their MIG devices (the partitioned backend names those).

    ``nvml`` is the NVML module: ``pynvml`` by default, ``gpuplugin.backends.nvml.fake.FakeNvml`` in tests. Errors are
    caught through its attributes (``nvml.NVMLError_Timeout``), so a fake only has to offer the same names.
    ``library_loader`` makes ``libnvidia-ml.so.1`` loadable from ``driver_root`` first; it defaults to
    ``preload_library`` with the real pynvml and to nothing with an injected module. ``clock``: what health quiet
    periods and NVML retries wait on.
    """

    name = "nvml"

    def __init__(
        self,
        settings: NvmlSettings,
        health_policy: HealthPolicy,
        nvml: Any = None,
        *,
        library_loader: LibraryLoader | None = None,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
            library_loader = library_loader or preload_library
        self.settings = settings
        self._nvml = nvml
        self._library_loader = library_loader
        self._clock = clock
        self._queue: asyncio.Queue[BackendEvent] = asyncio.Queue()
        self._tracker = HealthTracker(health_policy, emit=self._emit_health, probe=self._probe, clock=clock)
        self._tasks = TaskSet("nvml")
        self._inventory = discovery.Inventory()
        self._watcher: HealthWatcher | None = None
        self._stopping: list[HealthWatcher] = []
        self._rediscover_wanted = asyncio.Event()
        self._watcher_ended = asyncio.Event()
        """Set on the loop when a health thread ends (its ``on_end``): the follower looks at the current watcher."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_followed = False
        """Whether the health thread's follower has run once: a death it finds on its first run is still counted."""
        # Held around init, discovery and shutdown, so that shutdown never races a discovery still in a thread.
        self._nvml_lock = threading.Lock()
        self._initialized = False
        self._closed = False
        self._wait_failed: set[str] = set()
        self.xid_counts: Counter[tuple[int, XidAction]] = Counter()
        """XIDs seen, per (XID, action the policy took): for metrics."""
        self.fault_counts: Counter[str] = Counter()
        """Other health observations by kind (``ecc-double-bit``, ``gpu-lost``, ``wait-failing``, …)."""
        self.compute_policy = ComputePolicy((settings.nvidia_smi,), settings.nvidia_smi_timeout_s)
        self.timeslices: dict[str, int] = {}
        """The intervals set through this backend, by GPU UUID (0: set back to Default)."""

    async def set_timeslice(self, gpu: str, interval: int) -> None:
        """A TimeSliceControl: ``nvidia-smi compute-policy -i <gpu> --set-timeslice=<interval>``."""
        await self.compute_policy.set_timeslice(gpu, interval)
        self.timeslices[gpu] = interval
        log.info("time-slice interval set", gpu=gpu, interval=interval)

    async def timeslice(self, gpu: str) -> int | None:
        return await self.compute_policy.timeslice(gpu)

    async def start(self) -> None:
        """Initialise NVML and discover the GPUs; raises BackendUnavailable unless ``fail_on_init_error`` is off."""
        self._loop = asyncio.get_running_loop()
        try:
            inventory = await asyncio.to_thread(self._init_and_discover)
        except BackendUnavailable as error:
            if self.settings.fail_on_init_error:
                raise
            log.warning("nvml unavailable; serving no gpus and retrying in the background", error=str(error))
            self._tasks.supervise(self._retry_init, "retry init", expect_end=True)
            return
        self._adopt(inventory)

    async def discover(self) -> DeviceTree:
        """The tree of the last discovery (at start, or after a MIG change or a failed GPU): no NVML call."""
        return self._inventory.tree

    def gpu_instance_profiles(self) -> Mapping[str, tuple[GpuInstanceProfile, ...]]:
        """Per ``gpu`` ID, the GPU-instance profiles last discovered (with ``report_mig_devices``); no NVML call."""
        return self._inventory.instance_profiles

    async def events(self) -> AsyncGenerator[BackendEvent, None]:
        """Health and inventory changes, in order, until cancelled; each waits on a queue, nothing polls."""
        while True:
            yield await self._queue.get()

    async def aclose(self) -> None:
        """Stop the background tasks and the health thread, free the event set and shut NVML down; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._tasks.aclose()
        await self._tracker.aclose()
        watchers = [w for w in (self._watcher, *self._stopping) if w is not None]
        self._watcher = None
        self._stopping.clear()
        for watcher in watchers:
            watcher.request_stop()
        stopped = await asyncio.to_thread(_join_all, watchers)
        if not stopped:
            log.warning("health thread did not stop in time; leaving nvml initialised for it")
            return
        await asyncio.to_thread(self._shutdown)

    # Called from the health thread: everything else happens on the loop.
    def post_from_thread(self, observation: Observation) -> None:
        """Hand an observation from the health thread to the event loop; the thread's only way in."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the NVML backend is not started")
        # A closed loop means the process is shutting down: nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._observe, observation)

    def _watcher_ended_from_thread(self) -> None:
        """A health thread ended (called from it): wake the follower on the loop; never blocks the thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._watcher_ended.set)

    def _init_and_discover(self) -> discovery.Inventory:
        with self._nvml_lock:
            if self._closed:
                raise BackendUnavailable("the NVML backend is closed")
            if not self._initialized:
                initialize(self._nvml, self.settings, self._library_loader)
                self._initialized = True
            try:
                return discovery.discover(self._nvml, self.settings)
            except self._nvml.NVMLError as error:
                raise BackendUnavailable(
                    unavailable_message(self.settings.driver_root, f"NVML started but cannot count GPUs ({error})")
                ) from error

    def _discover(self) -> discovery.Inventory:
        with self._nvml_lock:
            return discovery.discover(self._nvml, self.settings)

    def _shutdown(self) -> None:
        with self._nvml_lock:
            if not self._initialized:
                return
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as error:
                log.warning("nvml shutdown failed", error=str(error))

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.retry_backoff_initial_s, self.settings.rediscover_backoff_max_s)

    async def _retry_init(self) -> None:
        backoff = self._backoff()
        while True:
            await self._clock.sleep(backoff.next())
            try:
                inventory = await asyncio.to_thread(self._init_and_discover)
            except BackendUnavailable as error:
                log.debug("nvml still unavailable", error=str(error), attempts=backoff.attempts)
                continue
            log.info("nvml available; serving gpus", gpus=len(inventory.tree.devices))
            self._adopt(inventory)
            self._queue.put_nowait(InventoryChanged(inventory.tree))
            return

    def _adopt(self, inventory: discovery.Inventory, *, recovering: bool = False) -> None:
        """Serve a new inventory: watch its GPUs' health; the first time, also start the rediscovery worker and the
        health thread's follower.

        A watcher started while GPUs are down because health went unwatched (``_wait_failed``), or in place of one
        that died (``recovering``: its ``WaitFailing`` may not have reached the loop yet), brings them back after its
        first good wait.
        """
        first = self._watcher is None and not self._stopping
        self._inventory = inventory
        self._watcher = HealthWatcher(
            self._nvml,
            self.settings,
            inventory.watched,
            inventory.mig_watched,
            self.post_from_thread,
            on_end=self._watcher_ended_from_thread,
            recovering=recovering or bool(self._wait_failed),
        )
        self._watcher.start()
        if first:
            self._tasks.supervise(self._rediscovery_worker, "rediscovery")
            self._tasks.supervise(self._follow_health_thread, "health thread")

    async def _follow_health_thread(self) -> None:
        """Follow the current health thread and raise when it dies, so that the supervisor restarts it (counted,
        with backoff) and reports it failing when it keeps dying; on a restart, watch the current inventory with a
        new thread. A thread asked to stop (shutdown, or replaced by a rediscovery) is no failure."""
        dead = self._watcher
        first_run, self._health_followed = not self._health_followed, True
        if dead is not None and dead.died and first_run:
            # Died before this follower first ran: a failure like any other, counted before the new thread.
            raise RuntimeError(f"nvml health thread died: {dead.failure!r}")
        if dead is not None and dead.died:
            log.info("starting a new health thread", after=repr(dead.failure))
            self._adopt(self._inventory, recovering=True)
            # It has ended already (it said so as its last act): the join is only the thread's exit.
            await asyncio.to_thread(dead.join)
        while True:
            self._watcher_ended.clear()
            watcher = self._watcher
            if watcher is not None and watcher.died:
                failure = watcher.failure
                raise RuntimeError(f"nvml health thread died: {failure!r}" if failure else "nvml health thread ended")
            await self._watcher_ended.wait()

    async def _rediscovery_worker(self) -> None:
        """Discovers again when asked (a MIG change) or, while some GPU failed discovery (or discovery itself
        failed), after a backoff, or sooner when asked."""
        backoff = self._backoff()
        # None: nothing to retry, wait to be asked.
        retry_in_s = backoff.next() if self._inventory.incomplete else None
        while True:
            if retry_in_s is None:
                await self._rediscover_wanted.wait()
            else:
                await wait_at_most(self._clock, self._rediscover_wanted, retry_in_s)
            self._rediscover_wanted.clear()
            try:
                inventory = await asyncio.to_thread(self._discover)
            except self._nvml.NVMLError as error:
                retry_in_s = backoff.next()
                log.warning("rediscovery failed; retrying", error=str(error), retry_in_s=round(retry_in_s, 3))
                continue
            if inventory.incomplete:
                retry_in_s = backoff.next()
            else:
                backoff.reset()
                retry_in_s = None
            await self._replace(inventory)

    async def _replace(self, inventory: discovery.Inventory) -> None:
        old_tree = self._inventory.tree
        if (
            inventory.tree == old_tree
            and inventory.watched.keys() == self._inventory.watched.keys()
            and inventory.mig_watched.keys() == self._inventory.mig_watched.keys()
        ):
            # Nothing changed (a GPU still failing, say): keep the running health thread.
            self._inventory = inventory
            return
        old = self._watcher
        if old is not None:
            old.request_stop()
            self._stopping.append(old)
        self._adopt(inventory)
        if old is not None:
            await asyncio.to_thread(old.join)
            self._stopping.remove(old)
        if inventory.tree != old_tree:
            log.info("inventory changed", gpus=len(inventory.tree.devices))
            self._queue.put_nowait(InventoryChanged(inventory.tree))

    def _observe(self, observation: Observation) -> None:
        """Apply one observation of the health thread, on the loop."""
        if self._closed:
            return
        match observation:
            case XidObserved(uuid=uuid, xid=xid, instance=instance):
                gpu = self._gpu(uuid, observation)
                if gpu is not None:
                    self.xid_counts[(xid, self._tracker.xid(gpu, xid, instance))] += 1
            case EccObserved(uuid=uuid, double_bit=True):
                self.fault_counts["ecc-double-bit"] += 1
                gpu = self._gpu(uuid, observation)
                if gpu is not None:
                    self._tracker.lost(gpu, "double-bit ECC error (uncorrectable memory error)")
            case EccObserved(uuid=uuid, double_bit=False):
                self.fault_counts["ecc-single-bit"] += 1
                log.info("single-bit ecc error corrected", uuid=uuid)
            case GpuLost(uuid=uuid, reason=reason):
                self.fault_counts["gpu-lost"] += 1
                gpu = self._gpu(uuid, observation)
                if gpu is not None:
                    self._tracker.lost(gpu, reason)
            case MigConfigChanged(uuid=uuid):
                self.fault_counts["mig-config-change"] += 1
                log.info("mig configuration changed; rediscovering", uuid=uuid)
                self._rediscover_wanted.set()
            case WaitFailing(reason=reason):
                self.fault_counts["wait-failing"] += 1
                for uuid in self._inventory.watched:
                    gpu = self._inventory.gpu_by_uuid[uuid]
                    if not self._tracker.is_faulted(gpu):
                        self._wait_failed.add(gpu)
                        self._tracker.lost(gpu, reason)
            case WaitRecovered():
                for gpu in sorted(self._wait_failed):
                    self._tracker.recovered(gpu)
                self._wait_failed.clear()

    def _gpu(self, uuid: str, observation: Observation) -> str | None:
        gpu = self._inventory.gpu_by_uuid.get(uuid)
        if gpu is None:
            log.warning("health event for a gpu not served", uuid=uuid, observation=repr(observation))
        return gpu

    def _emit_health(self, change: HealthChanged) -> None:
        if not self._closed:
            self._queue.put_nowait(change)

    async def _probe(self, gpu: str) -> bool:
        """Whether a GPU answers again: found by UUID and its memory readable. Runs in a worker thread."""
        uuid = self._inventory.uuid_by_gpu.get(gpu)
        if uuid is None:
            return False
        return await asyncio.to_thread(self._probe_blocking, uuid)

    def _probe_blocking(self, uuid: str) -> bool:
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml.nvmlDeviceGetMemoryInfo(handle)
        except self._nvml.NVMLError as error:
            log.info("probe failed", uuid=uuid, error=str(error))
            return False
        return True


def _join_all(watchers: list[HealthWatcher]) -> bool:
    """Join every watcher (not stopping at the first that hangs); True when all have ended. Blocks."""
    joined = [watcher.join() for watcher in watchers]
    return all(joined)
