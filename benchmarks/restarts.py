"""Kubelet restarts: how long the plugin takes to register again and to list its devices again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from benchmarks.measure import Latencies
from gpuplugin.testing.simulator import KubeletSimulator

REGISTER_TIMEOUT_S = 10.0
#: Pause between restarts of the restart phase (seconds): each one starts from a settled plugin.
PAUSE_S = 0.05


async def restart_once(
    kubelet: KubeletSimulator, resource: str, devices: int, registered: Latencies, listed: Latencies
) -> None:
    """Restart the kubelet; record the time from ``kubelet.sock`` served again to Register, and to the device list."""
    before = len(kubelet.registrations)
    began = time.perf_counter()
    restart = await kubelet.restart()
    try:
        again = await kubelet.wait_registered(resource, after=before, timeout=REGISTER_TIMEOUT_S)
        registered.record(began, again.monotonic_s - restart.served_monotonic_s)
        await kubelet.wait_for(lambda: kubelet.capacity(resource) == devices, timeout=REGISTER_TIMEOUT_S)
        listed.record(began, time.monotonic() - restart.served_monotonic_s)
    except TimeoutError as exc:
        registered.error(exc)


async def restart_phase(
    kubelet: KubeletSimulator,
    resource: str,
    devices: int,
    count: int,
    registered: Latencies,
    listed: Latencies,
    progress: Callable[[int], object],
) -> None:
    for _ in range(count):
        await restart_once(kubelet, resource, devices, registered, listed)
        progress(1)
        await asyncio.sleep(PAUSE_S)
