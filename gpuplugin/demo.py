"""The embedded demo: the mock backend and the kubelet simulator in one process, in a temporary directory.

It shows registration, a burst of pods with the devices chosen, an XID turning a GPU unhealthy and its recovery,
a kubelet restart and the re-registration, then prints a short report.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backends.mock import create as create_mock
from backends.mock.control import control
from gpuplugin.health import HealthPolicy
from gpuplugin.manager import Manager, ManagerSettings
from gpuplugin.registry import BackendContext
from gpuplugin.server import ServerSettings
from gpuplugin.simulator import KubeletSimulator

RESOURCE = "nvidia.com/gpu"
#: Pods of the burst, as GPUs per container.
BURST = (("train-a", (4,)), ("infer-b", (1,)), ("infer-c", (1,)), ("multi-d", (1, 1)))


@dataclass
class DemoReport:
    """What the demo saw, for the report and for the tests that run it."""

    lines: list[str] = field(default_factory=list)
    registration_ms: float = 0.0
    unhealthy_ms: float = 0.0
    recovery_s: float = 0.0
    reregistration_ms: float = 0.0
    admitted: dict[str, tuple[str, ...]] = field(default_factory=dict)


async def run_demo(
    *, quiet_period_s: float = 1.0, gpus: int = 8, say: Callable[[str], None] = print, workdir: Path | None = None
) -> DemoReport:
    """Run the whole story once; ``say`` receives each line of the report as it happens."""
    report = DemoReport()

    def tell(line: str) -> None:
        report.lines.append(line)
        say(line)

    directory = workdir or Path(tempfile.mkdtemp(prefix="gpuplugin-demo-", dir="/tmp"))
    control_socket = directory / "mock.sock"
    try:
        async with KubeletSimulator(directory) as kubelet:
            backend = create_mock(
                BackendContext(
                    options={"gpus": gpus, "control_socket": str(control_socket)},
                    health_policy=HealthPolicy(recovery_quiet_period_s=quiet_period_s),
                    state_dir=directory,
                )
            )
            manager = Manager(backend, ManagerSettings(server=ServerSettings(kubelet_dir=directory)))
            started = time.perf_counter()
            await manager.start()
            try:
                await _story(kubelet, manager, control_socket, started, quiet_period_s, tell, report)
            finally:
                await manager.aclose()
    finally:
        if workdir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return report


async def _story(
    kubelet: KubeletSimulator,
    manager: Manager,
    control_socket: Path,
    started: float,
    quiet_period_s: float,
    tell: Callable[[str], None],
    report: DemoReport,
) -> None:
    registration = await kubelet.wait_registered(RESOURCE, timeout=10)
    await kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) > 0, timeout=10)
    report.registration_ms = (time.perf_counter() - started) * 1000
    total = kubelet.allocatable(RESOURCE)
    tell(f"registered {RESOURCE} at {registration.endpoint} in {report.registration_ms:.1f} ms")
    tell(f"kubelet sees {total} healthy GPUs:")
    index = {d.id: d.attributes.get("index", "?") for d in manager.tree.devices}
    numa = {d.id: d.numa_node for d in manager.tree.devices}
    for device_id, health in kubelet.devices(RESOURCE).items():
        tell(f"  gpu {index[device_id]}  {device_id}  {health}  NUMA {numa[device_id]}")

    tell("a burst of pods (GetPreferredAllocation, then Allocate, per container):")
    for pod, containers in BURST:
        admission = await kubelet.admit(pod, [{RESOURCE: n} for n in containers])
        for container in admission.containers:
            ids = container.device_ids(RESOURCE)
            report.admitted[f"{pod}/{container.name}"] = ids
            tell(f"  {pod}/{container.name}: gpus {', '.join(index[i] for i in ids)}")
    tell(f"  free now: {kubelet.free(RESOURCE)} of {total}")
    for pod, _ in BURST:
        await kubelet.remove_pod(pod)

    answer = await control(control_socket, {"op": "xid", "gpu": 3, "xid": 13})
    tell(f"XID 13 on gpu 3 (an application error): {answer.get('action', answer)}; allocatable stays {total}")
    injected = time.perf_counter()
    answer = await control(control_socket, {"op": "xid", "gpu": 3, "xid": 63})
    await kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == total - 1, timeout=10)
    report.unhealthy_ms = (time.perf_counter() - injected) * 1000
    tell(f"XID 63 on gpu 3: {answer.get('action', answer)}; allocatable {total - 1} after {report.unhealthy_ms:.1f} ms")
    await kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == total, timeout=quiet_period_s + 30)
    report.recovery_s = time.perf_counter() - injected
    tell(f"gpu 3 healthy again after the {quiet_period_s:g} s quiet period: allocatable {total}")

    before = len(kubelet.registrations)
    restart = await kubelet.restart()
    again = await kubelet.wait_registered(RESOURCE, after=before, timeout=10)
    report.reregistration_ms = (again.monotonic_s - restart.served_monotonic_s) * 1000
    tell(f"kubelet restarted: {RESOURCE} registered again {report.reregistration_ms:.1f} ms after kubelet.sock")
    await kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == total, timeout=10)
    admission = await kubelet.admit("after-restart", [{RESOURCE: 2}])
    tell(f"a pod after the restart got gpus {', '.join(index[i] for i in admission.device_ids(RESOURCE))}")


def main() -> None:
    asyncio.run(run_demo())
