"""Pod admission, as the kubelet's device manager does it: take free healthy devices, ask GetPreferredAllocation
as a hint, call Allocate one container at a time, write the checkpoint, then PreStartContainer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import grpclib
import grpclib.exceptions
import structlog
from grpclib.const import Status

from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.node import NodeState

log = structlog.get_logger("gpuplugin.testing.admission")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ResourceAllocation:
    """What one container got of one resource, and how long the plugin took."""

    resource: str
    device_ids: tuple[str, ...]
    response: v1beta1.ContainerAllocateResponse
    preferred: tuple[str, ...] | None
    """GetPreferredAllocation's answer as given, or None when it was not called."""
    preferred_allocation_s: float | None
    allocate_s: float
    pre_start_s: float | None = None


@dataclass(frozen=True, slots=True)
class ContainerAdmission:
    """One container's allocations, keyed by resource name."""

    name: str
    allocations: Mapping[str, ResourceAllocation] = field(default_factory=lambda: MappingProxyType({}))

    def device_ids(self, resource: str) -> tuple[str, ...]:
        allocation = self.allocations.get(resource)
        return () if allocation is None else allocation.device_ids


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted pod: its containers in order (named ``container-<n>``)."""

    pod: str
    containers: tuple[ContainerAdmission, ...]

    def device_ids(self, resource: str) -> tuple[str, ...]:
        return tuple(i for c in self.containers for i in c.device_ids(resource))


class AdmissionError(Exception):
    """The pod failed admission (the kubelet's UnexpectedAdmissionError); the kubelet never retries, and retrying
    helps only after devices are freed, heal, or the plugin registers again."""

    def __init__(self, pod: str, resource: str, message: str, *, status: Status | None = None) -> None:
        super().__init__(f"pod {pod!r}, resource {resource!r}: {message}" + (f" ({status.name})" if status else ""))
        self.pod = pod
        self.resource = resource
        self.message = message
        self.status = status
        """The plugin's gRPC status when an RPC failed; None when the kubelet itself refused."""


class Admitter:
    """Admits pods one at a time, as the kubelet does: a slow plugin call delays every later pod."""

    def __init__(self, state: NodeState) -> None:
        self._state = state
        self._settings = state.settings
        self._lock = asyncio.Lock()

    async def admit(self, pod: str, containers: Sequence[Mapping[str, int]]) -> Admission:
        """Admit ``pod`` whose containers ask for ``{resource: count}``; raises AdmissionError, freeing the pod."""
        async with self._lock:
            if pod in self._state.pods:
                raise ValueError(f"pod {pod!r} is already admitted")
            self._state.pods[pod] = {}
            try:
                admitted = await self._admit(pod, containers)
            except BaseException:
                self._state.pods.pop(pod, None)
                await self._state.notify()
                await self.write_checkpoint()
                raise
            await self._state.notify()
            return admitted

    async def remove_pod(self, pod: str) -> None:
        """Free the pod's devices and update the checkpoint; a pod that is not there is ignored, as upstream."""
        if self._state.pods.pop(pod, None) is None:
            return
        log.info("pod removed", pod=pod)
        await self._state.notify()
        await self.write_checkpoint()

    async def _admit(self, pod: str, containers: Sequence[Mapping[str, int]]) -> Admission:
        admitted: list[dict[str, ResourceAllocation]] = []
        for n, requests in enumerate(containers):
            name = f"container-{n}"
            allocations: dict[str, ResourceAllocation] = {}
            for resource, count in requests.items():
                if count < 0:
                    raise ValueError(f"negative request {count} for {resource}")
                if count:
                    allocations[resource] = await self._allocate(pod, name, resource, count)
            admitted.append(allocations)
            # Upstream writes the checkpoint after each container's allocation.
            await self.write_checkpoint()
        # PreStartContainer comes later, when each container starts; its failure fails the pod here.
        for allocations in admitted:
            for resource, allocation in list(allocations.items()):
                allocations[resource] = await self._pre_start(pod, resource, allocation)
        result = Admission(
            pod,
            tuple(ContainerAdmission(f"container-{n}", MappingProxyType(a)) for n, a in enumerate(admitted)),
        )
        log.info("pod admitted", pod=pod, containers=len(result.containers))
        return result

    async def _allocate(self, pod: str, container: str, resource: str, count: int) -> ResourceAllocation:
        endpoint = self._state.endpoints.get(resource)
        if endpoint is None or resource not in self._state.devices:
            raise AdmissionError(pod, resource, f"cannot allocate unregistered device {resource}")
        available = self._state.available(resource)
        if len(available) < count:
            raise AdmissionError(
                pod,
                resource,
                f"requested number of devices unavailable for {resource}. Requested: {count}, "
                f"Available: {len(available)}",
            )

        preferred: tuple[str, ...] | None = None
        preferred_s: float | None = None
        chosen = available[:count]
        if endpoint.options.get_preferred_allocation_available:
            request = v1beta1.PreferredAllocationRequest(
                container_requests=[
                    v1beta1.ContainerPreferredAllocationRequest(
                        available_deviceIDs=list(available), must_include_deviceIDs=[], allocation_size=count
                    )
                ]
            )
            began = time.perf_counter()
            answer = await self._call(
                pod,
                resource,
                "GetPreferredAllocation",
                endpoint.stub.get_preferred_allocation(request, timeout=self._settings.preferred_allocation_timeout_s),
            )
            preferred_s = time.perf_counter() - began
            preferred = tuple(answer.container_responses[0].device_i_ds) if answer.container_responses else ()
            chosen = self._take_preferred(resource, preferred, available, count)

        # Taken before Allocate, as upstream marks them allocated before the call.
        self._state.pods[pod].setdefault(container, {})[resource] = tuple(chosen)
        began = time.perf_counter()
        response = await self._call(
            pod,
            resource,
            "Allocate",
            endpoint.stub.allocate(
                v1beta1.AllocateRequest(container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=chosen)]),
                timeout=self._settings.allocate_timeout_s,
            ),
        )
        allocate_s = time.perf_counter() - began
        if not response.container_responses:
            raise AdmissionError(pod, resource, f"no containers return in allocation response {response}")
        log.debug("allocated", pod=pod, container=container, resource=resource, devices=chosen, allocate_s=allocate_s)
        return ResourceAllocation(
            resource=resource,
            device_ids=tuple(chosen),
            response=response.container_responses[0],
            preferred=preferred,
            preferred_allocation_s=preferred_s,
            allocate_s=allocate_s,
        )

    def _take_preferred(self, resource: str, preferred: tuple[str, ...], available: list[str], count: int) -> list[str]:
        """Upstream treats the answer as a hint: valid preferred IDs first, then the rest of ``available``."""
        if len(preferred) != count or len(set(preferred)) != count or not set(preferred) <= set(available):
            self._state.warn(
                f"{resource}: GetPreferredAllocation answered {list(preferred)} for size {count} "
                f"from {available}; falling back"
            )
        chosen = list(dict.fromkeys(i for i in preferred if i in set(available)))[:count]
        chosen += [i for i in available if i not in chosen][: count - len(chosen)]
        return chosen

    async def _pre_start(self, pod: str, resource: str, allocation: ResourceAllocation) -> ResourceAllocation:
        endpoint = self._state.endpoints.get(resource)
        if endpoint is None or not endpoint.options.pre_start_required:
            return allocation
        began = time.perf_counter()
        await self._call(
            pod,
            resource,
            "PreStartContainer",
            endpoint.stub.pre_start_container(
                v1beta1.PreStartContainerRequest(devices_ids=list(allocation.device_ids)),
                timeout=self._settings.pre_start_timeout_s,
            ),
        )
        return dataclasses.replace(allocation, pre_start_s=time.perf_counter() - began)

    async def _call(self, pod: str, resource: str, method: str, call: Awaitable[_T]) -> _T:
        """One RPC to the plugin; any failure becomes an AdmissionError naming the method and the plugin's status."""
        try:
            return await call
        except grpclib.GRPCError as exc:
            raise AdmissionError(pod, resource, f"{method}: {exc.message}", status=exc.status) from exc
        except TimeoutError as exc:
            raise AdmissionError(
                pod, resource, f"{method}: deadline exceeded", status=Status.DEADLINE_EXCEEDED
            ) from exc
        except (OSError, grpclib.exceptions.StreamTerminatedError, grpclib.exceptions.ProtocolError) as exc:
            raise AdmissionError(pod, resource, f"{method}: {exc!r}", status=Status.UNAVAILABLE) from exc

    async def write_checkpoint(self) -> None:
        async with self._state.checkpoint_lock:
            # Snapshot on the loop, write in a thread: the loop never blocks on the disk.
            data = json.dumps(
                {
                    p: {c: {r: list(ids) for r, ids in rs.items()} for c, rs in cs.items()}
                    for p, cs in self._state.pods.items()
                },
                indent=2,
                sort_keys=True,
            )
            await asyncio.to_thread(_replace_file, self._state.checkpoint_path, data)


def _replace_file(path: Path, data: str) -> None:
    """Write then rename, so a reader (or a crash) never sees half a checkpoint."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
