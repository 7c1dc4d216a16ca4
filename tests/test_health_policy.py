"""The health policy (which XIDs count, which ones recover) and the tracker that turns faults into events."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from gpuplugin.core.backend import HealthChanged
from gpuplugin.core.clock import VirtualClock
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import Health
from gpuplugin.devices.health import (
    DEFAULT_FATAL_XIDS,
    DEFAULT_IGNORED_XIDS,
    HealthPolicy,
    HealthTracker,
    XidAction,
)

IGNORED = [13, 31, 43, 45, 68, 109]
FATAL = [48, 79, 92, 94, 95, 119, 120]
RECOVERABLE = [1, 8, 32, 61, 62, 63, 64, 74, 999]


def test_default_xid_sets_are_nvidias() -> None:
    """The default ignored and fatal XIDs are NVIDIA's lists."""
    assert frozenset(IGNORED) == DEFAULT_IGNORED_XIDS
    assert frozenset(FATAL) == DEFAULT_FATAL_XIDS


@pytest.mark.parametrize(
    ("xid", "action"),
    [(x, XidAction.IGNORE) for x in IGNORED]
    + [(x, XidAction.FATAL) for x in FATAL]
    + [(x, XidAction.RECOVER) for x in RECOVERABLE],
)
def test_classify_defaults(xid: int, action: XidAction) -> None:
    """By default application XIDs are ignored, reset-needing XIDs are fatal, and every other XID recovers."""
    assert HealthPolicy().classify(xid) is action


@pytest.mark.parametrize("value", ["all", "ALL", " all ", "xids,all"])
def test_disable_all_ignores_every_xid(value: str) -> None:
    """DP_DISABLE_HEALTHCHECKS=all (any case) turns checking off: every XID is ignored."""
    policy = HealthPolicy().with_env({"DP_DISABLE_HEALTHCHECKS": value})
    assert not policy.checks_enabled
    assert {policy.classify(x) for x in IGNORED + FATAL + RECOVERABLE} == {XidAction.IGNORE}


def test_disable_xids_ignores_xids_but_keeps_checks() -> None:
    """DP_DISABLE_HEALTHCHECKS=xids ignores every XID while health checking stays on."""
    policy = HealthPolicy().with_env({"DP_DISABLE_HEALTHCHECKS": "xids"})
    assert policy.checks_enabled
    assert not policy.xids_enabled
    assert {policy.classify(x) for x in FATAL + RECOVERABLE} == {XidAction.IGNORE}


def test_disable_list_adds_ignored_xids() -> None:
    """DP_DISABLE_HEALTHCHECKS with XID numbers ignores those XIDs on top of the defaults, fatal ones too."""
    policy = HealthPolicy().with_env({"DP_DISABLE_HEALTHCHECKS": " 62, 79 ,,"})
    assert policy.classify(62) is XidAction.IGNORE
    assert policy.classify(79) is XidAction.IGNORE
    assert policy.classify(13) is XidAction.IGNORE
    assert policy.classify(63) is XidAction.RECOVER
    assert policy.classify(48) is XidAction.FATAL


@pytest.mark.parametrize("env", [{}, {"DP_DISABLE_HEALTHCHECKS": ""}, {"DP_ENABLE_HEALTHCHECKS": " , "}])
def test_empty_env_changes_nothing(env: dict[str, str]) -> None:
    """Unset or empty variables leave the policy as it is."""
    assert HealthPolicy().with_env(env) == HealthPolicy()


def test_enable_forces_ignored_xids() -> None:
    """DP_ENABLE_HEALTHCHECKS makes ignored XIDs count: recoverable, or fatal if they are fatal XIDs."""
    policy = HealthPolicy().with_env({"DP_ENABLE_HEALTHCHECKS": "13,79", "DP_DISABLE_HEALTHCHECKS": "79"})
    assert policy.classify(13) is XidAction.RECOVER
    assert policy.classify(79) is XidAction.FATAL
    assert policy.classify(31) is XidAction.IGNORE


def test_enable_beats_disable_xids() -> None:
    """A forced XID counts even when DP_DISABLE_HEALTHCHECKS=xids ignores all others."""
    policy = HealthPolicy().with_env({"DP_DISABLE_HEALTHCHECKS": "xids", "DP_ENABLE_HEALTHCHECKS": "31"})
    assert policy.classify(31) is XidAction.RECOVER
    assert policy.classify(62) is XidAction.IGNORE


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DP_DISABLE_HEALTHCHECKS", "nope"),
        ("DP_DISABLE_HEALTHCHECKS", "62,sixty"),
        ("DP_DISABLE_HEALTHCHECKS", "1.5"),
        ("DP_ENABLE_HEALTHCHECKS", "xids"),
        ("DP_ENABLE_HEALTHCHECKS", "all"),
        ("DP_ENABLE_HEALTHCHECKS", "13;31"),
    ],
)
def test_bad_words_name_the_variable(variable: str, value: str) -> None:
    """A word that is not an XID number (or xids/all where allowed) is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=variable):
        HealthPolicy().with_env({variable: value})


@dataclass
class Harness:
    """A tracker on virtual time whose events and probe calls (with the virtual time of each) are recorded;
    ``answers`` are the probe's replies, last repeated."""

    policy: HealthPolicy
    answers: list[bool] = field(default_factory=lambda: [True])
    events: list[HealthChanged] = field(default_factory=list)
    probes: list[tuple[str, float]] = field(default_factory=list)
    clock: VirtualClock = field(default_factory=VirtualClock)
    tracker: HealthTracker = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = HealthTracker(self.policy, self.events.append, self._probe, self.clock)

    async def _probe(self, gpu: str) -> bool:
        self.probes.append((gpu, self.clock.monotonic()))
        return self.answers[min(len(self.probes), len(self.answers)) - 1]

    def healths(self) -> list[tuple[str, Health]]:
        return [(e.gpu, e.health) for e in self.events]


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Harness]]:
    """Builds harnesses and closes their trackers after the test."""
    made: list[Harness] = []

    def build(quiet_s: float = 30.0, answers: list[bool] | None = None, **policy: object) -> Harness:
        harness = Harness(HealthPolicy(recovery_quiet_period_s=quiet_s, **policy), answers or [True])  # type: ignore[arg-type]
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.tracker.aclose()


async def test_fault_is_unhealthy_at_once(make: Callable[..., Harness]) -> None:
    """A counted XID emits Unhealthy at once, with the XID and its reason."""
    h = make()
    assert h.tracker.xid("GPU-0", 62) is XidAction.RECOVER
    assert h.events == [HealthChanged(gpu="GPU-0", health=Health.UNHEALTHY, reason="XID 62", xid=62)]
    assert h.tracker.is_faulted("GPU-0")


async def test_ignored_xid_changes_nothing(make: Callable[..., Harness]) -> None:
    """An ignored XID emits nothing and leaves the GPU unfaulted, however long it stays quiet."""
    h = make()
    assert h.tracker.xid("GPU-0", 13) is XidAction.IGNORE
    await h.clock.advance(3600)
    assert h.events == []
    assert not h.tracker.is_faulted("GPU-0")


async def test_recovers_after_quiet_period_once_probe_answers(make: Callable[..., Harness]) -> None:
    """A recoverable fault turns Healthy after the quiet period, only once the probe answers (failing, then ok)."""
    h = make(quiet_s=30, answers=[False, True])
    h.tracker.xid("GPU-3", 62)
    await h.clock.advance(29.9)
    assert h.probes == []
    await h.clock.advance(0.1)
    # Probed at the end of the quiet period; it failed, so the GPU stays Unhealthy through the backoff.
    assert h.probes == [("GPU-3", 30.0)]
    assert h.healths() == [("GPU-3", Health.UNHEALTHY)]
    await h.clock.advance(h.policy.probe_retry_first_s)
    assert h.healths() == [("GPU-3", Health.UNHEALTHY), ("GPU-3", Health.HEALTHY)]
    # Healthy only after the second probe, which came after a jittered first backoff (its upper half).
    assert [gpu for gpu, _ in h.probes] == ["GPU-3", "GPU-3"]
    assert 30 + h.policy.probe_retry_first_s / 2 <= h.probes[1][1] <= 30 + h.policy.probe_retry_first_s
    assert "XID 62" in h.events[1].reason
    assert not h.tracker.is_faulted("GPU-3")


async def test_probe_retries_back_off_up_to_the_policy_cap(make: Callable[..., Harness]) -> None:
    """A GPU whose probe keeps failing is probed again after doubling, jittered waits that never pass the cap."""
    h = make(quiet_s=10, answers=[False] * 8 + [True], probe_retry_first_s=1.0, probe_retry_max_s=4.0)
    h.tracker.xid("GPU-0", 62)
    await h.clock.advance(10 + 1 + 2 + 4 * 6)
    assert len(h.probes) == 9
    assert h.healths() == [("GPU-0", Health.UNHEALTHY), ("GPU-0", Health.HEALTHY)]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(h.probes)]
    ceilings = [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(ceiling / 2 <= gap <= ceiling for gap, ceiling in zip(gaps, ceilings, strict=True))


async def test_new_fault_restarts_the_quiet_period(make: Callable[..., Harness]) -> None:
    """A second recoverable XID during the quiet period restarts it and emits no second Unhealthy."""
    h = make(quiet_s=15)
    h.tracker.xid("GPU-0", 62)
    await h.clock.advance(10)
    h.tracker.xid("GPU-0", 63)
    await h.clock.advance(14.9)
    assert h.probes == []
    await h.clock.advance(0.1)
    assert h.healths() == [("GPU-0", Health.UNHEALTHY), ("GPU-0", Health.HEALTHY)]
    assert h.probes == [("GPU-0", 25.0)]


@pytest.mark.parametrize(
    ("xids", "actions"),
    [
        pytest.param([79], [XidAction.FATAL], id="fatal"),
        pytest.param([79, 62], [XidAction.FATAL, XidAction.RECOVER], id="recoverable-after-fatal"),
    ],
)
async def test_fatal_fault_stays(make: Callable[..., Harness], xids: list[int], actions: list[XidAction]) -> None:
    """A fatal XID keeps the GPU Unhealthy, no probe and no recovery; a recoverable XID after it changes nothing."""
    h = make(quiet_s=1)
    assert [h.tracker.xid("GPU-1", x) for x in xids] == actions
    await h.clock.advance(3600)
    assert h.healths() == [("GPU-1", Health.UNHEALTHY)]
    assert h.probes == []
    assert h.tracker.is_faulted("GPU-1")


async def test_lost_gpu_is_fatal_unless_checks_are_off(make: Callable[..., Harness]) -> None:
    """A lost GPU stays Unhealthy with the reason given; with checks off it is not reported."""
    h = make(quiet_s=1)
    h.tracker.lost("GPU-2", "fallen off the bus")
    await h.clock.advance(3600)
    assert h.events == [HealthChanged(gpu="GPU-2", health=Health.UNHEALTHY, reason="fallen off the bus")]
    off = make(checks_enabled=False)
    off.tracker.lost("GPU-2", "fallen off the bus")
    assert off.tracker.xid("GPU-2", 79) is XidAction.IGNORE
    assert off.events == []


async def test_recovered_clears_a_fault(make: Callable[..., Harness]) -> None:
    """recovered() turns a fatal fault Healthy at once, and is a no-op for a healthy GPU."""
    h = make()
    h.tracker.xid("GPU-0", 79)
    h.tracker.recovered("GPU-0")
    assert h.healths() == [("GPU-0", Health.UNHEALTHY), ("GPU-0", Health.HEALTHY)]
    assert not h.tracker.is_faulted("GPU-0")
    h.tracker.recovered("GPU-0")
    h.tracker.recovered("GPU-9")
    assert len(h.events) == 2


async def test_recovered_cancels_pending_recovery(make: Callable[..., Harness]) -> None:
    """recovered() during a quiet period emits Healthy once; the pending recovery does not emit again."""
    h = make()
    h.tracker.xid("GPU-0", 62)
    h.tracker.recovered("GPU-0")
    await h.clock.advance(3600)
    assert h.healths() == [("GPU-0", Health.UNHEALTHY), ("GPU-0", Health.HEALTHY)]
    assert h.probes == []


async def test_partition_faults_are_kept_apart(make: Callable[..., Harness]) -> None:
    """A partition's XID names its instance and does not fault the whole GPU."""
    h = make()
    h.tracker.xid("GPU-0", 79, instance=(1, 0))
    assert h.events[0].instance == (1, 0)
    assert h.tracker.is_faulted("GPU-0", (1, 0))
    assert not h.tracker.is_faulted("GPU-0")
    h.tracker.recovered("GPU-0")
    assert h.tracker.is_faulted("GPU-0", (1, 0))
    h.tracker.recovered("GPU-0", (1, 0))
    assert h.events[-1] == HealthChanged(gpu="GPU-0", health=Health.HEALTHY, reason="recovered", instance=(1, 0))


async def test_aclose_leaves_no_tasks(make: Callable[..., Harness]) -> None:
    """aclose cancels pending recoveries and waits for them: no task is left, nothing is emitted later."""
    h = make()
    before = asyncio.all_tasks()
    h.tracker.xid("GPU-0", 62)
    h.tracker.xid("GPU-1", 63)
    assert len(asyncio.all_tasks() - before) == 2
    await h.tracker.aclose()
    assert not [t for t in asyncio.all_tasks() - before if not t.done()]
    assert len(h.events) == 2


@pytest.mark.parametrize(("first_s", "max_s"), [(0, 60), (2, 1), (1, 3601), (-1, 1)])
def test_bad_probe_retry_settings_name_them(first_s: float, max_s: float) -> None:
    """Probe retry waits out of order or range are a ConfigError naming both settings."""
    with pytest.raises(ConfigError, match=r"probe_retry_first_s .* probe_retry_max_s"):
        HealthPolicy(probe_retry_first_s=first_s, probe_retry_max_s=max_s)
