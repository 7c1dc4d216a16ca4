"""The DevicePlugin service grpclib serves: its five RPCs routed to their answers, and the one place where what
an answer raises becomes a gRPC status.

GetDevicePluginOptions answers the advertised options; ListAndWatch is ``list_and_watch``; GetPreferredAllocation,
Allocate and PreStartContainer are answered in ``allocate``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream

from gpuplugin.core.backend import Backend, PreferredAllocation, PreStart
from gpuplugin.core.errors import RequestError
from gpuplugin.kubelet import wire
from gpuplugin.kubelet.allocate import Allocator
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.list_and_watch import DeviceListFeed

log = structlog.get_logger("gpuplugin.kubelet.service")
rpc_log = structlog.get_logger("gpuplugin.rpc")


def status_code(exc: BaseException) -> str:
    """The gRPC status code, by name, that a call ended by ``exc`` ends with, for metrics: a GRPCError's own (every
    request error has become one in grpc_status), CANCELLED for a call the client gave up, else UNKNOWN."""
    if isinstance(exc, GRPCError):
        return exc.status.name
    if isinstance(exc, asyncio.CancelledError):
        return Status.CANCELLED.name
    return Status.UNKNOWN.name


@contextmanager
def grpc_status(method: str) -> Iterator[None]:
    """Turn what a handler raises into a gRPC status; internals of unexpected errors never reach the caller."""
    try:
        yield
    except GRPCError:
        raise
    except RequestError as exc:
        raise GRPCError(exc.status, str(exc)) from None
    except Exception:
        rpc_log.exception("rpc failed", method=method)
        raise GRPCError(Status.UNKNOWN, f"{method} failed inside the plugin; its log has the details") from None


async def receive(stream: Stream[Any, Any], method: str) -> Any:
    """The request; INVALID_ARGUMENT when its bytes are no valid encoding (grpclib alone would answer UNKNOWN)."""
    try:
        return await stream.recv_message()
    except wire.WireError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {method} request: {exc}") from None


def plugin_options(backend: Backend) -> api.DevicePluginOptions:
    """What the kubelet is told to call, from the capabilities the backend has."""
    return api.DevicePluginOptions(
        pre_start_required=isinstance(backend, PreStart),
        get_preferred_allocation_available=isinstance(backend, PreferredAllocation),
    )


class DevicePluginService:
    """One resource's ``v1beta1.DevicePlugin``; grpclib calls the handlers from ``__mapping__``."""

    def __init__(
        self,
        feed: DeviceListFeed,
        allocator: Allocator,
        options: api.DevicePluginOptions,
        *,
        on_rpc: Callable[[str, str, float, str], None] | None = None,
    ) -> None:
        self.resource = feed.resource
        self._feed = feed
        self._allocator = allocator
        self._on_rpc = on_rpc
        self._log = log.bind(resource=self.resource)
        self.options = options
        self._options_message = bytes(options)

    def advertise(self, options: api.DevicePluginOptions) -> None:
        """GetDevicePluginOptions answers ``options`` from now on."""
        self.options, self._options_message = options, bytes(options)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/v1beta1.DevicePlugin/GetDevicePluginOptions": Handler(
                self._unary("GetDevicePluginOptions", lambda _: self._options_message),
                Cardinality.UNARY_UNARY,
                wire.Empty,
                api.DevicePluginOptions,
            ),
            "/v1beta1.DevicePlugin/ListAndWatch": Handler(
                self._feed.stream, Cardinality.UNARY_STREAM, wire.Empty, api.ListAndWatchResponse
            ),
            "/v1beta1.DevicePlugin/GetPreferredAllocation": Handler(
                self._unary("GetPreferredAllocation", self._allocator.preferred_allocation),
                Cardinality.UNARY_UNARY,
                wire.PreferredAllocationRequest,
                api.PreferredAllocationResponse,
            ),
            "/v1beta1.DevicePlugin/Allocate": Handler(
                self._unary("Allocate", self._allocator.allocate),
                Cardinality.UNARY_UNARY,
                wire.AllocateRequest,
                api.AllocateResponse,
            ),
            "/v1beta1.DevicePlugin/PreStartContainer": Handler(
                self._unary("PreStartContainer", self._allocator.pre_start_container),
                Cardinality.UNARY_UNARY,
                wire.PreStartContainerRequest,
                api.PreStartContainerResponse,
            ),
        }

    def _unary(
        self, method: str, answer: Callable[[Any], bytes | Awaitable[bytes]]
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        """A grpclib handler: receive, answer (errors mapped once, in grpc_status), send, observe."""

        async def handle(stream: Stream[Any, Any]) -> None:
            started = time.perf_counter()
            code = "OK"
            try:
                request = await receive(stream, method)
                with grpc_status(method):
                    response = answer(request)
                    if not isinstance(response, bytes):
                        response = await response
                await stream.send_message(response)
            except BaseException as exc:
                code = status_code(exc)
                raise
            finally:
                self._observe(method, started, code)

        return handle

    def _observe(self, method: str, started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        self._log.debug("rpc", method=method, latency_ms=round(elapsed * 1000, 3), code=code)
        if self._on_rpc is not None:
            self._on_rpc(self.resource, method, elapsed, code)
