"""Where an Allocate's time goes: the client's protobuf work, the plugin's own side, and the transport.

The plugin's side is timed directly, in process: decoding the request with its own reader (``gpuplugin.kubelet.wire``)
and running the Allocate handler against a mock node. Rebuilding a 64-GPU resource's view after a health change is
timed too, against building it from scratch, since a health change rebuilds the view on the ListAndWatch path.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.core.model import AllocationPolicyKind, Health
from gpuplugin.kubelet import wire
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.kubelet.server import ResourceServer, ServerSettings
from gpuplugin.kubelet.view import ResourceView

REPEATS = 5


def per_call_us(fn: Callable[[], object], budget_s: float) -> float:
    """Median over ``REPEATS`` timed loops of the time one call of ``fn`` takes (microseconds)."""
    calls = 1
    while True:  # grow the loop until it lasts a fifth of a repeat's budget
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - began
        if elapsed >= budget_s / REPEATS / 5:
            break
        calls *= 4
    loops = max(1, int(calls * (budget_s / REPEATS) / max(elapsed, 1e-9)))
    timings = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        for _ in range(loops):
            fn()
        timings.append((time.perf_counter() - began) / loops)
    return statistics.median(timings) * 1e6


def codec_costs(request: bytes, response: bytes, *, budget_s: float) -> dict[str, Any]:
    """Encode and decode of the AllocateRequest (one GPU) and of the plugin's real AllocateResponse."""
    parsed_request = v1beta1.AllocateRequest.parse(request)
    parsed_response = v1beta1.AllocateResponse.parse(response)
    return {
        "request_bytes": len(request),
        "response_bytes": len(response),
        "request_encode_us": per_call_us(lambda: bytes(parsed_request), budget_s),
        "request_decode_us": per_call_us(lambda: v1beta1.AllocateRequest.parse(request), budget_s),
        "response_encode_us": per_call_us(lambda: bytes(parsed_response), budget_s),
        "response_decode_us": per_call_us(lambda: v1beta1.AllocateResponse.parse(response), budget_s),
        "plugin_request_decode_us": per_call_us(lambda: wire.AllocateRequest.FromString(request), budget_s),
    }


async def plugin_costs(request: bytes, *, budget_s: float) -> dict[str, float]:
    """The plugin's own side of one Allocate (its handler, called directly) and of a health change on 64 GPUs."""
    tree = Inventory.build(MockSettings()).tree(range(8))
    resource = tree.resources[0]
    server = ResourceServer(resource, _NoBackend(), ServerSettings())
    await server.update(tree.of(resource), tree)
    decoded = wire.AllocateRequest.FromString(request)
    ids = [c.devices_ids for c in decoded.container_requests]
    # The simulator's request names the real node's devices; ask the mock node for as many, so the cache is hit.
    mock_request = wire.AllocateRequest(
        [wire.ContainerAllocateRequest([d.id for d in tree.devices[: len(c)]]) for c in ids]
    )
    server.allocator.allocate(mock_request)
    big = Inventory.build(MockSettings.from_options({"gpus": 64})).tree(range(64))
    devices = big.of(resource)
    view = ResourceView.build(resource, devices, big, AllocationPolicyKind.TOPOLOGY, 0)
    sick = tuple(dataclasses.replace(d, health=Health.UNHEALTHY) if i == 3 else d for i, d in enumerate(devices))
    return {
        "allocate_handler_us": per_call_us(lambda: server.allocator.allocate(mock_request), budget_s),
        "view_build_64_gpus_ms": per_call_us(
            lambda: ResourceView.build(resource, devices, big, AllocationPolicyKind.TOPOLOGY, 0), budget_s
        )
        / 1000,
        "view_health_change_64_gpus_ms": per_call_us(
            lambda: ResourceView.build(resource, sick, big, AllocationPolicyKind.TOPOLOGY, 1, previous=view), budget_s
        )
        / 1000,
    }


class _NoBackend:
    """Only ``name``: the server asks a backend for nothing else on these paths."""

    name = "none"

    async def start(self) -> None: ...

    async def discover(self) -> Any: ...

    def events(self) -> Any: ...

    async def aclose(self) -> None: ...


def where_time_goes(
    codec: dict[str, Any], plugin: dict[str, float], plugin_p50_ms: float, floor_p50_ms: float
) -> dict[str, Any]:
    """Split the plugin's median Allocate into the client's protobuf work, the plugin's own side and the transport.

    The client (the simulator, and the same loop for the floor) encodes the request and decodes the response on
    every call with betterproto2; the plugin decodes the request with its own reader and answers from cached bytes;
    the floor decodes nothing. The transport is what the floor's round trip leaves once the client's work is out.
    """
    client_us = codec["request_encode_us"] + codec["response_decode_us"]
    plugin_us = codec["plugin_request_decode_us"] + plugin["allocate_handler_us"]
    transport_us = floor_p50_ms * 1000 - client_us
    return {
        "plugin_allocate_p50_us": plugin_p50_ms * 1000,
        "client_protobuf_us": client_us,
        "plugin_side_us": plugin_us,
        "grpclib_transport_us": transport_us,
        "over_the_floor_us": (plugin_p50_ms - floor_p50_ms) * 1000,
        "dominant": "grpclib transport" if transport_us >= client_us + plugin_us else "protobuf and the plugin",
        **plugin,
    }
