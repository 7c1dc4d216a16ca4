"""The kubelet's ``DRAPlugin`` service, ``v1`` and ``v1beta1`` (same messages), on grpclib.

The kubelet calls NodePrepareResources before a pod's containers start and NodeUnprepareResources once they are
gone, both with claims named only; ``ClaimPreparer`` does the work and each claim gets its own answer. A request
that is not one (undecodable, oversized, too many claims) is refused whole with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

import structlog
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Stream

from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.preparer import ClaimPreparer, ClaimResult
from gpuplugin.kubelet.api.k8s.io.kubelet.pkg.apis.dra import v1, v1beta1

log = structlog.get_logger("gpuplugin.dra.service")

#: ``PluginInfo.supported_versions`` names services as ``<last package element>.<service>``, newest first.
API_VERSIONS: tuple[tuple[str, ModuleType], ...] = (("v1", v1), ("v1beta1", v1beta1))
SUPPORTED_SERVICES = tuple(f"{version}.DRAPlugin" for version, _ in API_VERSIONS)
#: gRPC's default limit on a received message, as the kubelet's own client has.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: A pod has a handful of claims; a request naming more is not from a kubelet.
MAX_CLAIMS_PER_REQUEST = 256


class MalformedMessage(ValueError):
    """The bytes of a request are no message of its type."""


class DraCodec(ProtoCodec):
    """grpclib's protobuf codec, refusing oversized requests before parsing and naming undecodable ones."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > MAX_MESSAGE_BYTES:
            raise MalformedMessage(f"the message has {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            raise MalformedMessage(f"not a {message_type.__name__}: {type(exc).__name__}") from None


class DraPluginService:
    """Both versions of the service, routed to one preparer; grpclib calls the handlers from ``__mapping__``."""

    def __init__(self, preparer: ClaimPreparer) -> None:
        self._preparer = preparer

    def __mapping__(self) -> dict[str, Handler]:
        mapping: dict[str, Handler] = {}
        for version, api in API_VERSIONS:
            service = f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin"
            mapping[f"{service}/NodePrepareResources"] = Handler(
                self._handler(api, "NodePrepareResources", self._prepare),
                Cardinality.UNARY_UNARY,
                api.NodePrepareResourcesRequest,
                api.NodePrepareResourcesResponse,
            )
            mapping[f"{service}/NodeUnprepareResources"] = Handler(
                self._handler(api, "NodeUnprepareResources", self._unprepare),
                Cardinality.UNARY_UNARY,
                api.NodeUnprepareResourcesRequest,
                api.NodeUnprepareResourcesResponse,
            )
        return mapping

    def _handler(
        self,
        api: ModuleType,
        method: str,
        answer: Callable[[ModuleType, Sequence[ClaimRef]], Awaitable[Any]],
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def handle(stream: Stream[Any, Any]) -> None:
            try:
                request = await stream.recv_message()
            except MalformedMessage as exc:
                raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {method} request: {exc}") from None
            assert request is not None
            if len(request.claims) > MAX_CLAIMS_PER_REQUEST:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"{method}: {len(request.claims)} claims in one request; at most {MAX_CLAIMS_PER_REQUEST}",
                )
            claims = [_claim_ref(api, method, n, claim) for n, claim in enumerate(request.claims)]
            try:
                response = await answer(api, claims)
            except Exception:
                log.exception("DRA call failed", method=method)
                raise GRPCError(Status.UNKNOWN, f"{method} failed inside the plugin; its log has the details") from None
            await stream.send_message(response)

        return handle

    async def _prepare(self, api: ModuleType, claims: Sequence[ClaimRef]) -> Any:
        results = await self._preparer.prepare(claims)
        return api.NodePrepareResourcesResponse(claims={uid: _prepared(api, result) for uid, result in results.items()})

    async def _unprepare(self, api: ModuleType, claims: Sequence[ClaimRef]) -> Any:
        errors = await self._preparer.unprepare(claims)
        return api.NodeUnprepareResourcesResponse(
            claims={uid: api.NodeUnprepareResourceResponse(error=error) for uid, error in errors.items()}
        )


def _claim_ref(api: ModuleType, method: str, number: int, claim: Any) -> ClaimRef:
    """A decoded claim as a ClaimRef. The decoder takes a field of the wrong wire type as it comes (an int where a
    message belongs), so the types are checked here; an empty embedded message decodes as None: a claim without
    fields, which fails on its own."""
    if claim is None:
        return ClaimRef("", "", "")
    fields = (getattr(claim, "namespace", None), getattr(claim, "name", None), getattr(claim, "uid", None))
    if not isinstance(claim, api.Claim) or not all(isinstance(value, str) for value in fields):
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {method} request: claims[{number}] is not a Claim")
    return ClaimRef(claim.namespace, claim.name, claim.uid)


def _prepared(api: ModuleType, result: ClaimResult) -> Any:
    if result.error:
        return api.NodePrepareResourceResponse(error=result.error)
    return api.NodePrepareResourceResponse(
        devices=[
            api.Device(
                request_names=[device.request],
                pool_name=device.pool,
                device_name=device.device,
                cdi_device_ids=[cdi_id],
            )
            for device, cdi_id in result.devices
        ]
    )
