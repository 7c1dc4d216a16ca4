"""The churn model: seeded pods that arrive, take devices, live and leave, while health flaps and the kubelet restarts.

The pods and the flaps come from their own seeded random streams, so a seed gives the same pods, sizes,
lifetimes, flapped GPUs and hold times on every run; only the timing of the machine differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import Clock, Latencies
from benchmarks.restarts import restart_once
from benchmarks.scenarios import ChurnSettings
from gpuplugin.backends.mock.control import ControlUnavailable, control
from gpuplugin.testing.admission import AdmissionError
from gpuplugin.testing.simulator import KubeletSimulator

#: XID 63 (row remapping pending) is recoverable: the GPU turns Unhealthy at once and can come back.
FLAP_XID = 63
HEALTH_TIMEOUT_S = 10.0
#: Seconds to wait for room when no pod is running (only an unhealthy GPU can be in the way then).
NO_POD_WAIT_S = 1.0
#: How long past the churn's end a pod may still wait for room before it is given up as an error (seconds): room
#: that never comes (a GPU Unhealthy for good) fails the run instead of hanging it.
ROOM_TIMEOUT_S = 10.0
#: Redraws of a pod whose containers overflow the node before sizes are drawn to fit.
REDRAWS = 100


@dataclass(frozen=True, slots=True)
class PodPlan:
    """One pod of the churn."""

    name: str
    gap_s: float
    """Seconds after the previous pod's arrival; 0 when pods come as fast as they are admitted."""
    containers: tuple[int, ...]
    """Devices asked for by each container."""
    lifetime_s: float


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """A health change injected through the mock's control socket, and when the kubelet saw it."""

    sent_s: float
    """Seconds after the run began."""
    gpu: int
    health: str
    delay_s: float
    """From the control request sent to the ListAndWatch message seen by the simulator: every device of the GPU
    (all its partitions or replicas) changed."""


def container_sizes(mix: Mapping[int, float], capacity: int, cap: int | None = None) -> dict[int, float]:
    """The mix as a node of ``capacity`` devices serves it: sizes beyond the node dropped, those beyond ``cap``
    asked for as ``cap`` (their weights added to its own)."""
    sizes: dict[int, float] = {}
    for size, weight in mix.items():
        if size > capacity:
            continue
        asked = size if cap is None else min(size, cap)
        sizes[asked] = sizes.get(asked, 0.0) + weight
    return sizes


def pod_plans(
    settings: ChurnSettings, capacity: int, seed: int, max_per_container: int | None = None
) -> Iterator[PodPlan]:
    """An endless, seeded stream of pods; a pod never asks for more than the node has, nor a container for more
    than ``max_per_container`` devices."""
    rng = random.Random(seed)
    mix = container_sizes(settings.size_mix, capacity, max_per_container)
    if not mix:
        raise ValueError(f"no container size of the churn's mix {dict(settings.size_mix)} fits {capacity} devices")
    sizes = list(mix)
    weights = list(mix.values())
    # A node too small for max_containers of the smallest size (one GPU: a second container never fits) gets fewer
    # containers per pod; drawn first all the same, so a node with room keeps the pods its seed always gave.
    most = capacity // min(sizes)
    for n in itertools.count():
        gap = rng.expovariate(settings.arrival_rate_per_s) if settings.arrival_rate_per_s else 0.0
        count = min(rng.randint(1, settings.max_containers), most)
        containers = tuple(rng.choices(sizes, weights, k=count))
        for _ in range(REDRAWS):
            if sum(containers) <= capacity:
                break
            containers = tuple(rng.choices(sizes, weights, k=count))
        else:
            containers = _fitting(rng, sizes, weights, count, capacity)
        yield PodPlan(f"pod-{n:06d}", gap, containers, rng.expovariate(1 / settings.mean_lifetime_s))


def _fitting(rng: random.Random, sizes: list[int], weights: list[float], count: int, capacity: int) -> tuple[int, ...]:
    """``count`` sizes that fit ``capacity`` together, each drawn among those that leave room for the rest at the
    smallest size; only when redraws keep overflowing, as on a node barely big enough for ``count`` containers."""
    smallest = min(sizes)
    containers: list[int] = []
    for left in range(count - 1, -1, -1):
        room = capacity - sum(containers) - left * smallest
        fits = [(size, weight) for size, weight in zip(sizes, weights, strict=True) if size <= room]
        containers.append(rng.choices([size for size, _ in fits], [weight for _, weight in fits])[0])
    return tuple(containers)


class ChurnRun:
    """Drives one churn phase against the simulator and the plugin's control socket."""

    def __init__(
        self,
        kubelet: KubeletSimulator,
        settings: ChurnSettings,
        *,
        resource: str,
        gpus: int,
        per_gpu: int = 1,
        max_per_container: int | None = None,
        control_socket: Path,
        clock: Clock,
        seed: int,
        progress: Callable[[int], object],
    ) -> None:
        self.kubelet = kubelet
        self.settings = settings
        self.resource = resource
        self.gpus = gpus
        self.per_gpu = per_gpu
        """Devices of ``resource`` on each GPU: an XID on the GPU takes them all out, a recovery brings them back."""
        self.devices = gpus * per_gpu
        self.max_per_container = max_per_container
        self.control_socket = control_socket
        self.clock = clock
        self.seed = seed
        self.progress = progress
        # Admissions, health changes and restarts take turns: a GPU that turns unhealthy between the kubelet's choice
        # and Allocate fails the pod by design (a correct refusal, not a plugin error), and a restart fails every
        # pod until the plugin registers again, as it would on a node. Each still happens between the others.
        self._turn = asyncio.Lock()
        self.admission = clock.latencies("admission")
        self.admission_single = clock.latencies("admission (1 container)")
        self.kubelet_share = clock.latencies("admission minus plugin RPCs (kubelet's share)")
        self.preferred = clock.latencies("GetPreferredAllocation (churn)")
        self.allocate = clock.latencies("Allocate (churn)")
        self.to_unhealthy = clock.latencies("health change → ListAndWatch (Unhealthy)")
        self.to_healthy = clock.latencies("health change → ListAndWatch (Healthy)")
        self.registered = clock.latencies("re-registration (mid-churn)")
        self.listed = clock.latencies("re-registration to device list (mid-churn)")
        self.health_events: list[HealthEvent] = []
        self.restart_times_s: list[float] = []
        self.pods = 0
        self.containers = 0
        self.pods_waited = 0
        self.wall_s = 0.0

    def measures(self) -> list[Latencies]:
        """Every measure the churn took; the health delays only when it flapped (otherwise they are not measured)."""
        health = [self.to_unhealthy, self.to_healthy] if self.settings.flap_rate_per_s > 0 else []
        return [
            self.admission,
            self.admission_single,
            self.kubelet_share,
            self.preferred,
            self.allocate,
            *health,
            self.registered,
            self.listed,
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "pods_admitted": self.pods,
            "containers_admitted": self.containers,
            "pods_that_waited_for_room": self.pods_waited,
            "health_events": len(self.health_events),
            "kubelet_restarts": len(self.restart_times_s),
            "wall_s": self.wall_s,
            "admissions_per_s": self.pods / self.wall_s if self.wall_s else 0.0,
        }

    async def run(self) -> None:
        began = time.perf_counter()
        end = began + self.settings.duration_s
        async with asyncio.TaskGroup() as group:
            group.create_task(self._admit_pods(end))
            if self.settings.flap_rate_per_s > 0:
                group.create_task(self._flap(end))
            if self.settings.kubelet_restarts:
                group.create_task(self._restart(began))
        self.wall_s = time.perf_counter() - began

    async def _admit_pods(self, end: float) -> None:
        running: list[tuple[float, str]] = []
        arrival = time.perf_counter()
        try:
            for plan in pod_plans(self.settings, self.devices, self.seed, self.max_per_container):
                arrival += plan.gap_s
                if max(arrival, time.perf_counter()) >= end:
                    break
                await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
                await self._admit(plan, running, end + ROOM_TIMEOUT_S)
                self.progress(1)
        finally:
            for _, name in running:
                await self.kubelet.remove_pod(name)

    async def _admit(self, plan: PodPlan, running: list[tuple[float, str]], deadline: float) -> None:
        """Admit ``plan`` once the node has room for it; an admission error if there is still none by ``deadline``."""
        need = sum(plan.containers)
        waited = False
        while True:
            await self._reap(running)
            async with self._turn:
                if self.kubelet.free(self.resource) >= need:
                    began = time.perf_counter()
                    try:
                        admitted = await self.kubelet.admit(plan.name, [{self.resource: k} for k in plan.containers])
                    except AdmissionError as exc:
                        self.admission.error(exc)
                        return
                    elapsed = time.perf_counter() - began
                    break
            waited = True
            if time.perf_counter() >= deadline:
                free, devices = self.kubelet.free(self.resource), self.kubelet.capacity(self.resource)
                self.admission.error(
                    TimeoutError(
                        f"{plan.name} needs {need} {self.resource}; {free} of {devices} free, "
                        f"{len(running)} pods running, still no room {ROOM_TIMEOUT_S:g} s after the churn ended"
                    )
                )
                return
            timeout_s = running[0][0] - time.perf_counter() if running else NO_POD_WAIT_S
            timeout_s = min(timeout_s, deadline - time.perf_counter())
            with contextlib.suppress(TimeoutError):
                await self.kubelet.wait_for(lambda: self.kubelet.free(self.resource) >= need, max(timeout_s, 0.001))
        self.pods += 1
        self.pods_waited += waited
        self.admission.record(began, elapsed)
        if len(plan.containers) == 1:
            self.admission_single.record(began, elapsed)
        plugin_s = 0.0
        for container in admitted.containers:
            self.containers += 1
            allocation = container.allocations[self.resource]
            self.allocate.record(began, allocation.allocate_s)
            plugin_s += allocation.allocate_s
            if allocation.preferred_allocation_s is not None:
                self.preferred.record(began, allocation.preferred_allocation_s)
                plugin_s += allocation.preferred_allocation_s
        # The simulator's bookkeeping and its checkpoint writes (fsync'd, as the kubelet's are).
        self.kubelet_share.record(began, elapsed - plugin_s)
        heapq.heappush(running, (time.perf_counter() + plan.lifetime_s, plan.name))

    async def _reap(self, running: list[tuple[float, str]]) -> None:
        while running and running[0][0] <= time.perf_counter():
            _, name = heapq.heappop(running)
            await self.kubelet.remove_pod(name)

    async def _flap(self, end: float) -> None:
        """One GPU at a time: Unhealthy by an XID, held, then recovered; each change timed to ListAndWatch."""
        rng = random.Random(f"flaps-{self.seed}")
        while True:
            gap_s = rng.expovariate(self.settings.flap_rate_per_s)
            gpu = rng.randrange(self.gpus)
            hold_s = rng.expovariate(1 / self.settings.mean_flap_hold_s)
            if time.perf_counter() + gap_s >= end:
                return
            await asyncio.sleep(gap_s)
            await self._change_health(gpu, {"op": "xid", "gpu": gpu, "xid": FLAP_XID}, "Unhealthy", self.to_unhealthy)
            await asyncio.sleep(hold_s)
            await self._change_health(gpu, {"op": "recover", "gpu": gpu}, "Healthy", self.to_healthy)

    async def _change_health(self, gpu: int, request: dict[str, Any], health: str, into: Latencies) -> None:
        """Send one change; timed until the kubelet sees every device of the GPU take it.

        A whole GPU is its own device, found by the UUID the control socket answers with. Partitions and replicas
        carry IDs of their own, so for them the change is seen when allocatable has moved by all of the GPU's
        devices: changes take turns, so nothing else moves it meanwhile.
        """
        async with self._turn:
            step = self.per_gpu if health == "Healthy" else -self.per_gpu
            expected = self.kubelet.allocatable(self.resource) + step
            began = time.perf_counter()
            try:
                answer = await control(self.control_socket, request)
                if not answer.get("ok"):
                    raise RuntimeError(f"control {request} answered {answer}")
                uuid = str(answer["uuid"])

                def seen() -> bool:
                    if self.per_gpu == 1:
                        return self.kubelet.devices(self.resource).get(uuid) == health
                    return self.kubelet.allocatable(self.resource) == expected

                await self.kubelet.wait_for(seen, HEALTH_TIMEOUT_S)
            except (ControlUnavailable, RuntimeError, TimeoutError) as exc:
                into.error(exc)
                return
            elapsed = time.perf_counter() - began
        into.record(began, elapsed)
        self.health_events.append(HealthEvent(began - self.clock.origin_s, gpu, health, elapsed))

    async def _restart(self, began: float) -> None:
        """Restarts spread evenly over the run, each taken between admissions."""
        count = self.settings.kubelet_restarts
        for n in range(1, count + 1):
            at = began + self.settings.duration_s * n / (count + 1)
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            async with self._turn:
                self.restart_times_s.append(self.clock.now())
                await restart_once(self.kubelet, self.resource, self.devices, self.registered, self.listed)
