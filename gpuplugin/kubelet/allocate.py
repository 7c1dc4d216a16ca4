"""Allocate, GetPreferredAllocation and PreStartContainer answered: checks, then encoded responses from the view.

Allocate answers from a cache of encoded responses per device set: a set seen once costs one encode, later ones
none. Refusals are ``RequestError`` subclasses; ``service`` turns them into gRPC statuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from gpuplugin.core.backend import Backend, CustomAllocate, PreStart
from gpuplugin.core.errors import CdiSpecMissing, InvalidRequest, RequestError, UnhealthyDevices, UnknownDevices
from gpuplugin.core.model import MAX_DEVICE_ID_LENGTH, ContainerSpec, SpecConflict, merge_specs
from gpuplugin.kubelet import wire
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import encode_preferred_response, repeated_field
from gpuplugin.kubelet.view import ResourceView


def spec_to_proto(spec: ContainerSpec) -> api.ContainerAllocateResponse:
    return api.ContainerAllocateResponse(
        envs={**spec.env, **spec.list_env},
        mounts=[
            api.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            for m in spec.mounts
        ],
        devices=[
            api.DeviceSpec(container_path=n.container_path, host_path=n.host_path, permissions=n.permissions)
            for n in spec.device_nodes
        ],
        annotations={**spec.annotations, **spec.list_annotations},
        cdi_devices=[api.CdiDevice(name=name) for name in spec.cdi_devices],
    )


#: Far above any real node (64 GPUs with 64 replicas each), far below what would make a request costly to check.
MAX_IDS_PER_LIST = 4096
MAX_CONTAINERS = 256


def check_bounds(containers: int, id_lists: Sequence[Sequence[str]]) -> None:
    """Refuse oversized requests and IDs the kubelet could never have sent, before any other work."""
    if containers > MAX_CONTAINERS:
        raise InvalidRequest(f"the request has {containers} container requests; at most {MAX_CONTAINERS}")
    for ids in id_lists:
        if len(ids) > MAX_IDS_PER_LIST:
            raise InvalidRequest(f"a container request names {len(ids)} devices; at most {MAX_IDS_PER_LIST}")
        for device_id in ids:
            if len(device_id) > MAX_DEVICE_ID_LENGTH:
                raise InvalidRequest(
                    f"device ID {device_id[:40]!r}… has {len(device_id)} characters; IDs have at most "
                    f"{MAX_DEVICE_ID_LENGTH}"
                )


class Allocator:
    """Answers one resource's allocation RPCs from the view it is given."""

    def __init__(
        self,
        resource: str,
        backend: Backend,
        cache_entries: int,
        current: Callable[[], ResourceView],
    ) -> None:
        self.resource = resource
        self._backend = backend
        self._custom = backend if isinstance(backend, CustomAllocate) else None
        self._cache_entries = cache_entries
        self._current = current
        self._cache: dict[tuple[str, ...], bytes] = {}
        self.missing_specs: Callable[[Iterable[str]], Sequence[str]] | None = None
        """Which CDI device names have no spec on disk (the CDI writer's ``missing``); None: nothing to check."""

    def use_backend(self, backend: Backend) -> None:
        self._backend = backend
        self._custom = backend if isinstance(backend, CustomAllocate) else None
        # Cached responses may hold the old backend's container specs (CustomAllocate).
        self.forget()

    def forget(self) -> None:
        """Drop the encoded responses: the devices' specs or the resource's rules changed."""
        self._cache = {}

    def allocate(self, request: wire.AllocateRequest) -> bytes:
        """Answer Allocate from precomputed specs: the encoded AllocateResponse."""
        view = self._current()
        if not request.container_requests:
            raise InvalidRequest("Allocate request has no container requests")
        check_bounds(len(request.container_requests), [c.devices_ids for c in request.container_requests])
        containers = [self._container_response(view, tuple(c.devices_ids)) for c in request.container_requests]
        return repeated_field(1, containers)

    def _container_response(self, view: ResourceView, ids: tuple[str, ...]) -> bytes:
        cached = self._cache.get(ids)
        if cached is None:
            cached = self._encode_container(view, ids)
        if view.unhealthy and not view.unhealthy.isdisjoint(ids):
            raise UnhealthyDevices(self.resource, view.unhealthy.intersection(ids))
        if view.cdi_names and self.missing_specs is not None:
            # A CDI name without its spec on disk fails the container at creation: refuse it here, clearly.
            missing = self.missing_specs(view.cdi_names[i] for i in ids if i in view.cdi_names)
            if missing:
                raise CdiSpecMissing(self.resource, missing)
        return cached

    def _encode_container(self, view: ResourceView, ids: tuple[str, ...]) -> bytes:
        if not ids:
            raise InvalidRequest("a container request names no devices")
        if len(set(ids)) != len(ids):
            raise InvalidRequest(
                f"a container request names a device twice: {sorted({i for i in ids if ids.count(i) > 1})}"
            )
        unknown = [i for i in ids if i not in view.devices]
        if unknown:
            raise UnknownDevices(self.resource, unknown)
        limit = view.rules.max_devices_per_container
        if limit is not None and len(ids) > limit:
            raise InvalidRequest(
                f"{self.resource} allows at most {limit} device(s) per container, the request names {len(ids)}"
            )
        spec = self._custom.container_spec(self.resource, ids) if self._custom is not None else None
        if spec is None:
            try:
                spec = merge_specs(view.devices[i].spec for i in ids)
            except SpecConflict as exc:
                raise RequestError(str(exc)) from None
        encoded = bytes(spec_to_proto(spec))
        if len(self._cache) >= self._cache_entries:
            self._cache.clear()
        self._cache[ids] = encoded
        return encoded

    def preferred_allocation(self, request: wire.PreferredAllocationRequest) -> bytes:
        """Answer GetPreferredAllocation with the resource's policy, precomputed for the current inventory."""
        view = self._current()
        if not request.container_requests:
            raise InvalidRequest("GetPreferredAllocation request has no container requests")
        check_bounds(
            len(request.container_requests),
            [ids for c in request.container_requests for ids in (c.available_deviceIDs, c.must_include_deviceIDs)],
        )
        responses: list[list[bytes]] = []
        for container in request.container_requests:
            unknown = [
                i for i in (*container.available_deviceIDs, *container.must_include_deviceIDs) if i not in view.devices
            ]
            if unknown:
                raise UnknownDevices(self.resource, unknown)
            chosen = view.policy.choose(
                container.available_deviceIDs, container.must_include_deviceIDs, container.allocation_size
            )
            responses.append([i.encode() for i in chosen])
        return encode_preferred_response(responses)

    async def pre_start_container(self, request: wire.PreStartContainerRequest) -> bytes:
        """Let a PreStart backend prepare the devices; the kubelet gives this 30 s."""
        view = self._current()
        check_bounds(1, [request.devices_ids])
        unknown = [i for i in request.devices_ids if i not in view.devices]
        if unknown:
            raise UnknownDevices(self.resource, unknown)
        if isinstance(self._backend, PreStart):
            await self._backend.pre_start_container(self.resource, list(request.devices_ids))
        return b""
