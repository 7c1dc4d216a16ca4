"""Health policy: which XIDs count, which ones a GPU recovers from, and the tracker that applies it.

Every backend feeds raw faults (an XID, a lost GPU) to a ``HealthTracker``; the tracker emits ``HealthChanged``
events, including the recovery to Healthy that NVIDIA's plugin never sends.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from gpuplugin.core.backend import HealthChanged
from gpuplugin.core.clock import REAL_CLOCK, Backoff, Clock
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import Device, DeviceTree, Health
from gpuplugin.core.tasks import TaskSet

log = structlog.get_logger("gpuplugin.devices.health")

#: Application errors (NVIDIA's defaults): the GPU is fine, a program misbehaved.
DEFAULT_IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})
#: The GPU needs a reset or the node a reboot: no quiet period brings it back.
DEFAULT_FATAL_XIDS = frozenset({48, 79, 92, 94, 95, 119, 120})
#: The largest XID number a setting may name: NVIDIA's catalogue ends below 200; this leaves room to grow.
MAX_XID = 1023
#: The longest recovery quiet period (seconds): a day. Longer is a GPU that never recovers; use fatalXids.
MAX_QUIET_PERIOD_S = 86400.0
#: The longest wait between two probes of a GPU that does not answer yet (seconds): an hour.
MAX_PROBE_RETRY_S = 3600.0


class XidAction(enum.StrEnum):
    """What an XID does to the device it names."""

    IGNORE = "ignore"
    """Counted and logged, health unchanged."""
    RECOVER = "recover"
    """Unhealthy now; Healthy again after the quiet period, once a probe answers."""
    FATAL = "fatal"
    """Unhealthy until the GPU is reset or the node rebooted (or an operator recovers it)."""


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """How faults turn into health changes."""

    ignored_xids: frozenset[int] = DEFAULT_IGNORED_XIDS
    """XIDs that leave health unchanged (application errors). XIDs in every set are 0 to ``MAX_XID``."""
    fatal_xids: frozenset[int] = DEFAULT_FATAL_XIDS
    """XIDs after which a GPU stays Unhealthy; every other XID is recoverable."""
    forced_xids: frozenset[int] = frozenset()
    """XIDs that always count, even if ignored above (``DP_ENABLE_HEALTHCHECKS``)."""
    recovery_quiet_period_s: float = 30.0
    """Seconds (0 to ``MAX_QUIET_PERIOD_S``) without a new XID before a recoverable GPU is probed and returned to
    Healthy."""
    probe_retry_first_s: float = 1.0
    """Seconds (above 0, at most ``probe_retry_max_s``) before probing again a GPU whose probe failed after its quiet
    period; doubles with each failed probe, jittered."""
    probe_retry_max_s: float = 60.0
    """Seconds (``probe_retry_first_s`` to ``MAX_PROBE_RETRY_S``), the longest wait between two probes: a minute
    returns a repaired GPU soon enough without a probe storm on a broken one."""
    checks_enabled: bool = True
    """False turns health checking off altogether (``DP_DISABLE_HEALTHCHECKS=all``)."""
    xids_enabled: bool = True
    """False ignores every XID but still reports lost GPUs (``DP_DISABLE_HEALTHCHECKS=xids``)."""

    def __post_init__(self) -> None:
        if not 0 < self.probe_retry_first_s <= self.probe_retry_max_s <= MAX_PROBE_RETRY_S:
            raise ConfigError(
                f"probe_retry_first_s ({self.probe_retry_first_s:g}) and probe_retry_max_s"
                f" ({self.probe_retry_max_s:g}): need 0 < first <= max <= {MAX_PROBE_RETRY_S:g} seconds"
            )

    def classify(self, xid: int) -> XidAction:
        if not self.checks_enabled:
            return XidAction.IGNORE
        if xid in self.forced_xids:
            return XidAction.FATAL if xid in self.fatal_xids else XidAction.RECOVER
        if not self.xids_enabled or xid in self.ignored_xids:
            return XidAction.IGNORE
        return XidAction.FATAL if xid in self.fatal_xids else XidAction.RECOVER

    def with_env(self, env: Mapping[str, str]) -> HealthPolicy:
        """Apply NVIDIA's ``DP_DISABLE_HEALTHCHECKS`` and ``DP_ENABLE_HEALTHCHECKS`` on top of this policy."""
        policy = self
        disable = env.get("DP_DISABLE_HEALTHCHECKS", "").strip().lower()
        for word in filter(None, (w.strip() for w in disable.split(","))):
            if word == "all":
                policy = replace(policy, checks_enabled=False)
            elif word == "xids":
                policy = replace(policy, xids_enabled=False)
            else:
                policy = replace(policy, ignored_xids=policy.ignored_xids | {_xid("DP_DISABLE_HEALTHCHECKS", word)})
        enable = env.get("DP_ENABLE_HEALTHCHECKS", "").strip().lower()
        forced = {_xid("DP_ENABLE_HEALTHCHECKS", w.strip()) for w in enable.split(",") if w.strip()}
        if forced:
            policy = replace(policy, forced_xids=policy.forced_xids | frozenset(forced))
        return policy


def _xid(variable: str, word: str) -> int:
    try:
        xid = int(word)
    except ValueError:
        raise ConfigError(f"{variable}: {word[:20]!r} is not an XID number, 'xids' or 'all'") from None
    if not 0 <= xid <= MAX_XID:
        raise ConfigError(f"{variable}: XID {xid} is out of range 0..{MAX_XID}")
    return xid


Probe = Callable[[str], Awaitable[bool]]
"""Asks the backend whether a GPU answers again (True) before it is returned to Healthy."""


@dataclass(slots=True)
class _Fault:
    action: XidAction
    reason: str
    xid: int | None


@dataclass
class HealthTracker:
    """Applies a ``HealthPolicy`` to raw faults and emits ``HealthChanged`` events through ``emit``."""

    policy: HealthPolicy
    emit: Callable[[HealthChanged], None]
    probe: Probe
    clock: Clock = REAL_CLOCK
    """What quiet periods and probe retries wait on."""
    _faults: dict[tuple[str, tuple[int, int] | None], _Fault] = field(default_factory=dict)
    _timers: dict[tuple[str, tuple[int, int] | None], asyncio.Task[None]] = field(default_factory=dict)
    _tasks: TaskSet = field(default_factory=lambda: TaskSet("health-tracker"))

    def xid(self, gpu: str, xid: int, instance: tuple[int, int] | None = None) -> XidAction:
        """Record an XID on a GPU (or one partition of it) and act on it by policy."""
        action = self.policy.classify(xid)
        log.info("xid", gpu=gpu, xid=xid, instance=instance, action=str(action))
        if action is not XidAction.IGNORE:
            self._fail((gpu, instance), _Fault(action, f"XID {xid}", xid))
        return action

    def lost(self, gpu: str, reason: str) -> None:
        """A GPU stopped answering (fallen off the bus): Unhealthy until it is recovered explicitly."""
        if self.policy.checks_enabled:
            self._fail((gpu, None), _Fault(XidAction.FATAL, reason, None))

    def recovered(self, gpu: str, instance: tuple[int, int] | None = None) -> None:
        """An operator or the backend says the GPU is fine again (after a reset, say): Healthy now."""
        key = (gpu, instance)
        self._cancel_timer(key)
        if self._faults.pop(key, None) is not None:
            self._emit(key, Health.HEALTHY, "recovered", None)

    def is_faulted(self, gpu: str, instance: tuple[int, int] | None = None) -> bool:
        return (gpu, instance) in self._faults

    def faults(self) -> dict[tuple[str, tuple[int, int] | None], tuple[str, int | None]]:
        """The faults held now by (GPU, instance): reason and XID. A fault that escalated (a recoverable XID, then a
        fatal one) shows the one in force, which no event announces."""
        return {key: (fault.reason, fault.xid) for key, fault in self._faults.items()}

    def _fail(self, key: tuple[str, tuple[int, int] | None], fault: _Fault) -> None:
        previous = self._faults.get(key)
        # A fatal fault is never softened by a later recoverable one.
        if previous is not None and previous.action is XidAction.FATAL:
            return
        self._faults[key] = fault
        self._cancel_timer(key)
        if previous is None:
            self._emit(key, Health.UNHEALTHY, fault.reason, fault.xid)
        if fault.action is XidAction.RECOVER:
            self._timers[key] = self._tasks.spawn(self._recover_later(key), f"recover {key[0]}", expect_end=True)

    async def _recover_later(self, key: tuple[str, tuple[int, int] | None]) -> None:
        await self.clock.sleep(self.policy.recovery_quiet_period_s)
        backoff = Backoff(self.policy.probe_retry_first_s, self.policy.probe_retry_max_s)
        while not await self.probe(key[0]):
            delay_s = backoff.next()
            log.info("probe failed; still unhealthy", gpu=key[0], retry_in_s=round(delay_s, 3))
            await self.clock.sleep(delay_s)
        self._timers.pop(key, None)
        fault = self._faults.pop(key, None)
        if fault is not None:
            self._emit(
                key, Health.HEALTHY, f"quiet for {self.policy.recovery_quiet_period_s:g} s after {fault.reason}", None
            )

    def _cancel_timer(self, key: tuple[str, tuple[int, int] | None]) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _emit(self, key: tuple[str, tuple[int, int] | None], health: Health, reason: str, xid: int | None) -> None:
        self.emit(HealthChanged(gpu=key[0], health=health, reason=reason, xid=xid, instance=key[1]))

    async def aclose(self) -> None:
        self._timers.clear()
        await self._tasks.aclose()


def reaches(device: Device, event: HealthChanged) -> bool:
    """Whether ``event`` is about ``device``: every device on its GPU, or, with an instance, that partition alone."""
    return device.gpu == event.gpu and (event.instance is None or device.instance == event.instance)


def recovered(tree: DeviceTree, event: HealthChanged) -> DeviceTree:
    """``tree`` with the devices a recovery reaches marked Healthy: the recovery also outdates an Unhealthy that a
    rediscovery during the fault put into the tree."""
    devices = tuple(replace(d, health=Health.HEALTHY) if reaches(d, event) else d for d in tree.devices)
    return replace(tree, devices=devices)


class OpenFaults:
    """The health faults not recovered yet, by GPU (or partition): every tree served while one is open shows the
    devices it reaches Unhealthy, whatever a rediscovery says meanwhile."""

    def __init__(self) -> None:
        self._faults: dict[tuple[str, tuple[int, int] | None], HealthChanged] = {}

    def record(self, event: HealthChanged, discovered: DeviceTree) -> DeviceTree | None:
        """Open or close the fault ``event`` is about; the discovered tree as it stands after it (a recovery marks
        the devices it reaches Healthy), or None when the event changes nothing (a recovery of no open fault)."""
        key = (event.gpu, event.instance)
        if event.health is Health.HEALTHY:
            if self._faults.pop(key, None) is None:
                return None
            return recovered(discovered, event)
        self._faults[key] = event
        return discovered

    def fold(self, devices: Sequence[Device]) -> tuple[Device, ...]:
        """``devices`` with those an open fault reaches marked Unhealthy."""
        if not self._faults:
            return tuple(devices)
        return tuple(
            replace(d, health=Health.UNHEALTHY)
            if d.health is Health.HEALTHY and ((d.gpu, None) in self._faults or (d.gpu, d.instance) in self._faults)
            else d
            for d in devices
        )

    def clear(self) -> None:
        """Forget every fault: a new backend reports its own."""
        self._faults.clear()
