"""The kubelet's ``v1beta1.Registration`` service on ``kubelet.sock``: Register validates the request, dials the
plugin and asks for its options before it answers, as upstream's ``PluginConnected`` does, then follows the
plugin's ListAndWatch stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpclib
import grpclib.exceptions
import structlog
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.server import Server

from gpuplugin.core.clock import Backoff
from gpuplugin.core.model import is_extended_resource_name
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.node import KUBELET_SOCKET, Endpoint, NodeState, Registration, Rejection
from gpuplugin.testing.plugin_streams import PluginStreams

log = structlog.get_logger("gpuplugin.testing.registration_server")

SUPPORTED_VERSION = "v1beta1"
#: How a call to a plugin fails: its error status, its deadline, or its connection.
RPC_FAILURES = (grpclib.GRPCError, TimeoutError, OSError, grpclib.exceptions.StreamTerminatedError)


class _RegistrationService(v1beta1.RegistrationBase):
    def __init__(self, handler: Callable[[v1beta1.RegisterRequest], Awaitable[None]]) -> None:
        self._handler = handler

    async def register(self, message: v1beta1.RegisterRequest) -> v1beta1.Empty:
        await self._handler(message)
        return v1beta1.Empty()


class RegistrationServer:
    """Serves ``kubelet.sock`` and connects the plugins that register on it."""

    def __init__(self, state: NodeState, streams: PluginStreams) -> None:
        self._state = state
        self._settings = state.settings
        self._streams = streams
        self._server: Server | None = None

    @property
    def socket_path(self) -> Path:
        return self._state.directory / KUBELET_SOCKET

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def serve(self) -> None:
        server = Server([_RegistrationService(self.register)])
        # A stale socket file would make bind fail with EADDRINUSE; the kubelet removes it first too.
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.socket_path.unlink)
        await server.start(path=str(self.socket_path))
        self._server = server
        log.info("serving registration", socket=str(self.socket_path))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def register(self, request: v1beta1.RegisterRequest) -> None:
        resource, endpoint_name = request.resource_name, request.endpoint
        log.info("registration request", resource=resource, endpoint=endpoint_name, version=request.version)
        # Same messages as upstream; a plain Go error reaches the plugin as status UNKNOWN.
        if request.version != SUPPORTED_VERSION:
            raise await self.reject(
                request,
                f"requested API version {request.version!r} is not supported by kubelet. "
                f"Supported versions are [{SUPPORTED_VERSION!r}]",
            )
        if not is_extended_resource_name(resource):
            raise await self.reject(request, f"the ResourceName {resource!r} is invalid")

        channel = Channel(path=str(self._state.directory / endpoint_name))
        try:
            options = await self._connect(request, channel)
        except BaseException:
            channel.close()
            raise

        endpoint = Endpoint(resource, endpoint_name, channel, options)
        await self._streams.replace(endpoint)
        if request.options is not None and bytes(request.options) != bytes(options):
            self._state.warn(
                f"{resource}: Register options {request.options} differ from GetDevicePluginOptions {options}"
            )
        self._streams.follow(endpoint)
        registration = Registration(
            index=len(self._state.registrations),
            resource=resource,
            endpoint=endpoint_name,
            options=options,
            request_options=request.options,
            monotonic_s=time.monotonic(),
        )
        self._state.registrations.append(registration)
        self._state.emit(registration)
        log.info("registered", resource=resource, endpoint=endpoint_name, options=options.to_dict())
        await self._state.notify()

    async def _connect(self, request: v1beta1.RegisterRequest, channel: Channel) -> v1beta1.DevicePluginOptions:
        try:
            await self.dial(channel)
        except ConnectionError as exc:
            raise await self.reject(request, f"failed to dial device plugin: {exc}") from exc
        try:
            # Before answering Register, as the kubelet's PluginConnected does.
            return await v1beta1.DevicePluginStub(channel).get_device_plugin_options(
                v1beta1.Empty(), timeout=self._settings.options_timeout_s
            )
        except RPC_FAILURES as exc:
            raise await self.reject(request, f"failed to get device plugin options: {exc!r}") from exc

    async def reject(self, request: v1beta1.RegisterRequest, message: str) -> grpclib.GRPCError:
        """Record a refused registration and build the error Register answers with."""
        rejection = Rejection(request.resource_name, request.endpoint, request.version, message, time.monotonic())
        self._state.rejections.append(rejection)
        self._state.emit(rejection)
        log.info("registration rejected", resource=request.resource_name, reason=message)
        await self._state.notify()
        return grpclib.GRPCError(Status.UNKNOWN, message)

    async def dial(self, channel: Channel) -> None:
        """Connect like grpc-go's blocking dial: retry with backoff until the socket answers or time runs out."""
        backoff = Backoff(self._settings.dial_backoff_first_s, self._settings.dial_backoff_max_s)
        last: OSError | None = None
        try:
            async with asyncio.timeout(self._settings.dial_timeout_s):
                while True:
                    try:
                        await channel.__connect__()
                        return
                    except OSError as exc:
                        last = exc
                    await asyncio.sleep(backoff.next())
        except TimeoutError:
            raise ConnectionError(f"context deadline exceeded dialling {channel}: {last!r}") from last
