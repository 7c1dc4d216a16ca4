"""Following each registered plugin's ListAndWatch stream, as the kubelet's endpoint does: every message replaces
the resource's device list; a stream's end marks its devices unhealthy (allocatable 0) until it registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpclib
import structlog
from grpclib.const import Cardinality

from gpuplugin.core.model import MAX_DEVICE_ID_LENGTH, Health
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.node import DevicesListed, DeviceState, Endpoint, NodeState, StreamEnd

log = structlog.get_logger("gpuplugin.testing.plugin_streams")

_LIST_AND_WATCH = "/v1beta1.DevicePlugin/ListAndWatch"


class PluginStreams:
    """The current endpoint of each resource, and the task that follows its stream."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    async def replace(self, endpoint: Endpoint) -> None:
        """Make ``endpoint`` its resource's current one; the newest registration wins."""
        old = self._state.endpoints.get(endpoint.resource)
        self._state.endpoints[endpoint.resource] = endpoint
        if old is not None:
            # The older endpoint's stream is closed without marking anything unhealthy.
            log.info("replacing endpoint", resource=endpoint.resource, old=old.endpoint, new=endpoint.endpoint)
            await self.stop(old)

    def follow(self, endpoint: Endpoint) -> None:
        """Open ``endpoint``'s ListAndWatch stream and fold its messages in, in the background."""
        endpoint.task = self._state.tasks.spawn(
            self._watch(endpoint), f"list-and-watch:{endpoint.resource}", expect_end=True
        )

    def connected(self, resource: str) -> Endpoint:
        endpoint = self._state.endpoints.get(resource)
        if endpoint is None or endpoint.stopped:
            raise LookupError(f"no connected device plugin for {resource}")
        return endpoint

    async def stop(self, endpoint: Endpoint) -> None:
        endpoint.stopped = True
        if endpoint.task is not None:
            endpoint.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await endpoint.task
        endpoint.channel.close()

    async def drop_all(self) -> None:
        endpoints = list(self._state.endpoints.values())
        self._state.endpoints.clear()
        for endpoint in endpoints:
            await self.stop(endpoint)

    async def _watch(self, endpoint: Endpoint) -> None:
        """Hold the endpoint's ListAndWatch stream open and fold every message into the device list."""
        error: str | None = None
        try:
            async with endpoint.channel.request(
                _LIST_AND_WATCH, Cardinality.UNARY_STREAM, v1beta1.Empty, v1beta1.ListAndWatchResponse
            ) as stream:
                await stream.send_message(v1beta1.Empty(), end=True)
                endpoint.stream_open = True
                await self._state.notify()
                async for message in stream:
                    if self._state.endpoints.get(endpoint.resource) is endpoint:
                        self._update_devices(endpoint, message)
                        await self._state.notify()
        except grpclib.GRPCError as exc:
            error = f"{exc.status.name}: {exc.message}"
        except Exception as exc:
            # Any failure ends the stream for the kubelet too (a Recv error); the plugin must register again.
            error = repr(exc)
        finally:
            endpoint.stream_open = False
            endpoint.channel.close()
        if self._state.endpoints.get(endpoint.resource) is endpoint and not endpoint.stopped:
            endpoint.stopped = True
            # markResourceUnhealthy: capacity keeps the devices, allocatable drops to 0.
            devices = self._state.devices.get(endpoint.resource, {})
            self._state.devices[endpoint.resource] = {
                i: DeviceState(Health.UNHEALTHY, d.numa_nodes) for i, d in devices.items()
            }
            ended = StreamEnd(endpoint.resource, endpoint.endpoint, error, time.monotonic())
            self._state.stream_ends.append(ended)
            self._state.emit(ended)
            log.warning("ListAndWatch ended", resource=endpoint.resource, endpoint=endpoint.endpoint, error=error)
            await self._state.notify()

    def _update_devices(self, endpoint: Endpoint, message: v1beta1.ListAndWatchResponse) -> None:
        resource = endpoint.resource
        devices: dict[str, DeviceState] = {}
        for device in message.devices:
            if len(device.id) > MAX_DEVICE_ID_LENGTH:
                self._state.warn(f"{resource}: device ID longer than {MAX_DEVICE_ID_LENGTH} characters: {device.id!r}")
            nodes = tuple(n.id for n in device.topology.nodes) if device.topology is not None else ()
            devices[device.id] = DeviceState(device.health, nodes)
        self._state.devices[resource] = devices
        log.debug("devices updated", resource=resource, total=len(devices), healthy=self._state.allocatable(resource))
        self._state.emit(DevicesListed(resource, endpoint.endpoint, tuple(devices.items()), time.monotonic()))
