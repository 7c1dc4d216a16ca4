"""The embedded demo: the mock backend and the kubelet simulator in one process, in a temporary directory.

It shows registration, a burst of pods with the devices chosen, an XID turning a GPU unhealthy and its recovery,
a kubelet restart and the re-registration; then a second node whose two GPUs are sliced into MIG-style partitions,
the smallest of them time-sliced into replicas, where one XID reaches every partition and replica of its GPU.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.mock.control import control
from gpuplugin.backends.partitioned import create as create_partitioned
from gpuplugin.backends.registry import BackendContext
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator

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
    partitioned: dict[str, int] = field(default_factory=dict)
    """Allocatable per resource on the partitioned, time-sliced node."""
    partitioned_after_xid: dict[str, int] = field(default_factory=dict)


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
        async with KubeletSimulator(directory) as kubelet:
            await _partitioned_story(kubelet, directory, quiet_period_s, tell, report)
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


#: GPU 0 as a mix of profiles, GPU 1 as seven of the smallest (of two mock GPUs); those are time-sliced in two.
PARTITIONS = {
    "parent": "mock",
    "strategy": "mixed",
    "layout": "all-1g.18gb",
    "layouts": {0: ["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"]},
}
SMALLEST = "nvidia.com/mig-1g.18gb"
TIME_SLICING = {"renameByDefault": True, "resources": [{"name": SMALLEST, "replicas": 2}]}


async def _partitioned_story(
    kubelet: KubeletSimulator,
    directory: Path,
    quiet_period_s: float,
    tell: Callable[[str], None],
    report: DemoReport,
) -> None:
    options = {**PARTITIONS, "parent_options": {"gpus": 2, "control_socket": str(directory / "mock2.sock")}}
    backend = create_partitioned(
        BackendContext(
            options=options, health_policy=HealthPolicy(recovery_quiet_period_s=quiet_period_s), state_dir=directory
        )
    )
    sharing = TimeSlicing.from_mapping(TIME_SLICING)
    manager = Manager(
        backend, ManagerSettings(server=ServerSettings(kubelet_dir=directory)), transforms=[sharing.apply]
    )
    await manager.start()
    try:
        resources = manager.tree.resources
        await kubelet.wait_for(lambda: all(kubelet.allocatable(r) > 0 for r in resources), timeout=10)
        report.partitioned = {r: kubelet.allocatable(r) for r in resources}
        tell("a second node: 2 GPUs sliced into partitions, the 1g.18gb ones time-sliced in two:")
        for resource, count in report.partitioned.items():
            tell(f"  {resource}: {count} allocatable")
        shared = f"{SMALLEST}.shared"
        admission = await kubelet.admit("sliced", [{"nvidia.com/mig-3g.71gb": 1, shared: 2}])
        gpus = {d.id: d.gpu for d in manager.tree.devices}
        tell(
            f"  a pod with a 3g.71gb partition and two 1g.18gb replicas got {len(admission.device_ids(shared))} "
            f"replicas on {len({gpus[i] for i in admission.device_ids(shared)})} GPU(s) (spread: distributed policy)"
        )
        await kubelet.remove_pod("sliced")
        gpu1 = manager.tree.gpus()[1]
        on_gpu1 = sum(1 for d in manager.tree.devices if d.gpu == gpu1)
        await control(directory / "mock2.sock", {"op": "xid", "gpu": 1, "xid": 63})
        expected = {r: n - sum(1 for d in manager.tree.of(r) if d.gpu == gpu1) for r, n in report.partitioned.items()}
        await kubelet.wait_for(lambda: all(kubelet.allocatable(r) == n for r, n in expected.items()), timeout=10)
        report.partitioned_after_xid = {r: kubelet.allocatable(r) for r in resources}
        tell(f"XID 63 on GPU 1: all {on_gpu1} of its partitions and replicas Unhealthy at once:")
        for resource, count in report.partitioned_after_xid.items():
            tell(f"  {resource}: {count} allocatable")
        await kubelet.wait_for(
            lambda: all(kubelet.allocatable(r) == n for r, n in report.partitioned.items()), timeout=quiet_period_s + 30
        )
        tell("GPU 1 healthy again: every partition and replica is back")
    finally:
        await manager.aclose()


def main() -> None:
    asyncio.run(run_demo())
