"""The short chaos soak: a seeded schedule of node-life faults against ``gpuplugin serve``; it heals from every one."""

from __future__ import annotations

from benchmarks.chaos import FAULTS, ChaosSettings, run_chaos


async def test_chaos_soak_heals_from_every_fault_with_invariants_holding() -> None:
    """Every fault of the schedule settles (registered, devices as the backend has them, /healthz 200) and no
    invariant breaks in between; RSS and file descriptors stay under their bounds."""
    # Generous guards: the test proves healing, not speed (the long run's figures report the settle times).
    settings = ChaosSettings(duration_s=25.0, seed=11, hang_s=60.0)
    figures = await run_chaos(settings)
    assert not figures.violations, figures.violations
    assert set(figures.faults) >= {"xid", "recover", "kubelet_restart", "config_good"}, figures.faults
    assert sum(figures.faults.values()) >= 10, figures.faults
    assert figures.max_rss_mib < settings.rss_limit_mib and figures.max_fds < settings.fd_limit


def test_chaos_schedule_covers_every_fault_kind() -> None:
    """The schedule draws every fault the issue names: kubelet restarts, socket and directory removal, XIDs, lost
    and unplugged GPUs, good and bad config edits, SIGKILL, a second instance surging in, pods."""
    assert set(FAULTS) == {
        "xid",
        "lose",
        "recover",
        "unplug",
        "plug",
        "kubelet_restart",
        "socket_deleted",
        "directory_removed",
        "config_good",
        "config_bad",
        "sigkill",
        "surge",
        "pod",
    }
