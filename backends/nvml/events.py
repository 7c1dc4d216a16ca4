"""The health thread: one dedicated thread waits on an NVML event set and hands what it sees to the event loop.

NVML's event wait blocks, so it cannot run on the loop, and it would hold a default-executor worker for as long as
the backend lives, so it gets a thread of its own. The thread decides nothing about health: it turns NVML events
and errors into observations and passes them to ``notify`` (the backend posts them to the loop with
``call_soon_threadsafe``), where the health tracker applies the policy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from gpuplugin.backends.nvml.library import as_str
from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.core.clock import Backoff

log = structlog.get_logger("gpuplugin.nvml")

#: NVML's GPU and compute instance ID in an event that concerns the whole GPU rather than one MIG partition.
WHOLE_GPU = 0xFFFFFFFF
THREAD_NAME = "gpuplugin-nvml-health"


@dataclass(frozen=True, slots=True)
class XidObserved:
    """An XID critical error on a GPU, or on one MIG partition of it (``instance``)."""

    uuid: str
    xid: int
    instance: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class EccObserved:
    """An ECC error: double-bit ones are uncorrectable, single-bit ones were corrected."""

    uuid: str
    double_bit: bool


@dataclass(frozen=True, slots=True)
class MigConfigChanged:
    """A GPU's MIG layout changed: the inventory must be read again."""

    uuid: str


@dataclass(frozen=True, slots=True)
class GpuLost:
    """A GPU answers GPU_IS_LOST (fallen off the bus)."""

    uuid: str
    reason: str


@dataclass(frozen=True, slots=True)
class WaitFailing:
    """Event waits failed ``wait_error_threshold`` times in a row: health can no longer be watched."""

    reason: str


@dataclass(frozen=True, slots=True)
class WaitRecovered:
    """A wait succeeded again after ``WaitFailing``, or the first wait of a watcher started while GPUs were down
    for it (a health thread restarted after it died)."""


Observation = XidObserved | EccObserved | MigConfigChanged | GpuLost | WaitFailing | WaitRecovered


def wanted_event_types(nvml: Any) -> int:
    """The event types a GPU served whole is watched for."""
    return int(
        nvml.nvmlEventTypeXidCriticalError
        | nvml.nvmlEventTypeDoubleBitEccError
        | nvml.nvmlEventTypeSingleBitEccError
        | nvml.nvmlEventMigConfigChange
    )


class HealthWatcher:
    """Owns the health thread and its event set, from ``start`` until ``stop``."""

    def __init__(
        self,
        nvml: Any,
        settings: NvmlSettings,
        watched: Mapping[str, Any],
        mig_watched: Mapping[str, Any],
        notify: Callable[[Observation], None],
        *,
        on_end: Callable[[], None] | None = None,
        recovering: bool = False,
    ) -> None:
        """``on_end`` is called from the thread as its last act, however it ended (the backend posts it to the
        loop); ``recovering``: GPUs are down because health went unwatched, so the first good wait sends
        ``WaitRecovered``."""
        self._nvml = nvml
        self._settings = settings
        self._watched = dict(watched)
        self._mig_watched = dict(mig_watched)
        self._notify = notify
        self._on_end = on_end
        self._recovering = recovering
        self._stop = threading.Event()
        self._ended = threading.Event()
        self.failure: BaseException | None = None
        """What ended the thread when it died (set before ``on_end``); None while it runs or after a clean stop."""
        self._lost: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def died(self) -> bool:
        """The thread has ended without being asked to (an exception, or a bug that made it return)."""
        return self._ended.is_set() and not self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the thread to stop after its current wait; does not block."""
        self._stop.set()

    def join(self) -> bool:
        """Wait for the thread, at most one wait timeout and a second; True when it has ended. Blocks."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(self._settings.event_wait_timeout_ms / 1000 + 1.0)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as error:
            # Fail safe: if the thread itself breaks, nobody watches health any more, so say so; the backend's
            # supervised follower hears of the end through ``on_end`` and starts a new watcher.
            self.failure = error
            log.exception("health thread failed")
            self._notify(WaitFailing(f"health thread failed: {error!r}"))
        finally:
            self._ended.set()
            if self._on_end is not None:
                self._on_end()

    def _watch(self) -> None:
        nvml = self._nvml
        timeout_ms = self._settings.event_wait_timeout_ms
        event_set: Any = None
        failures = 0
        failing = self._recovering
        backoff = Backoff(self._settings.retry_backoff_initial_s, self._settings.rediscover_backoff_max_s)
        try:
            while not self._stop.is_set():
                try:
                    if event_set is None:
                        event_set = self._create_set()
                    data = nvml.nvmlEventSetWait_v2(event_set, timeout_ms)
                except nvml.NVMLError_Timeout:
                    data = None
                except nvml.NVMLError as error:
                    if isinstance(error, nvml.NVMLError_GpuIsLost) and event_set is not None and self._find_lost():
                        # Leave the lost GPUs out of a new set, so that the others are watched on.
                        self._free(event_set)
                        event_set = None
                        continue
                    failures += 1
                    if failures >= self._settings.wait_error_threshold and not failing:
                        failing = True
                        reason = f"NVML event wait failed {failures} times in a row: {error}"
                        log.error("health events unavailable; marking every gpu unhealthy", reason=reason)
                        self._notify(WaitFailing(reason))
                    else:
                        log.debug("nvml event wait failed", error=str(error), failures=failures)
                    self._stop.wait(backoff.next())
                    continue
                if failing:
                    log.info("health events available again", after_failures=failures)
                    self._notify(WaitRecovered())
                failures = 0
                failing = False
                backoff.reset()
                if data is not None:
                    self._dispatch(data)
        finally:
            if event_set is not None:
                self._free(event_set)

    def _create_set(self) -> Any:
        nvml = self._nvml
        event_set = nvml.nvmlEventSetCreate()
        wanted = wanted_event_types(nvml)
        targets = [(uuid, handle, wanted) for uuid, handle in self._watched.items() if uuid not in self._lost]
        # MIG-enabled GPUs are not served yet; only a change of their layout matters.
        targets += [(uuid, handle, int(nvml.nvmlEventMigConfigChange)) for uuid, handle in self._mig_watched.items()]
        for uuid, handle, types in targets:
            try:
                mask = int(nvml.nvmlDeviceGetSupportedEventTypes(handle)) & types
                if mask:
                    nvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
                else:
                    log.warning("gpu supports none of the health events", uuid=uuid)
            except nvml.NVMLError_GpuIsLost as error:
                self._lost.add(uuid)
                self._notify(GpuLost(uuid, f"GPU is lost: {error}"))
            except nvml.NVMLError as error:
                log.warning("health events not registered; gpu unwatched", uuid=uuid, error=str(error))
        return event_set

    def _find_lost(self) -> bool:
        """After a wait raised GPU_IS_LOST: probe every watched GPU, report the lost ones; True if any."""
        found = False
        for uuid, handle in self._watched.items():
            if uuid in self._lost:
                continue
            try:
                self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError_GpuIsLost as error:
                self._lost.add(uuid)
                self._notify(GpuLost(uuid, f"GPU is lost: {error}"))
                found = True
            except self._nvml.NVMLError:
                pass
        return found

    def _free(self, event_set: Any) -> None:
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except self._nvml.NVMLError as error:
            log.warning("nvml event set not freed", error=str(error))

    def _dispatch(self, data: Any) -> None:
        nvml = self._nvml
        event_type = int(data.eventType)
        try:
            uuid = as_str(nvml.nvmlDeviceGetUUID(data.device))
        except nvml.NVMLError as error:
            log.warning("event from a gpu whose uuid cannot be read", event_type=hex(event_type), error=str(error))
            return
        if event_type == nvml.nvmlEventTypeXidCriticalError:
            gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
            instance = None if WHOLE_GPU in (gi, ci) else (gi, ci)
            self._notify(XidObserved(uuid, int(data.eventData), instance))
        elif event_type == nvml.nvmlEventTypeDoubleBitEccError:
            self._notify(EccObserved(uuid, double_bit=True))
        elif event_type == nvml.nvmlEventTypeSingleBitEccError:
            self._notify(EccObserved(uuid, double_bit=False))
        elif event_type == nvml.nvmlEventMigConfigChange:
            self._notify(MigConfigChanged(uuid))
        else:
            log.debug("nvml event ignored", uuid=uuid, event_type=hex(event_type))
