"""Where an Allocate's time goes: betterproto2 encoding and decoding, set beside the grpclib round trip."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from gpuplugin.api import v1beta1

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
    }


def where_time_goes(codec: dict[str, Any], plugin_p50_ms: float, floor_p50_ms: float) -> dict[str, Any]:
    """Split the plugin's median Allocate into protobuf work, grpclib transport and the plugin's own handler.

    The client (the simulator, and the same loop for the floor) encodes the request and decodes the response on
    every call; the plugin decodes the request and sends a cached, pre-encoded response; the floor decodes nothing.
    """
    client_us = codec["request_encode_us"] + codec["response_decode_us"]
    server_us = codec["request_decode_us"]
    codec_us = client_us + server_us
    transport_us = floor_p50_ms * 1000 - client_us
    handler_us = plugin_p50_ms * 1000 - floor_p50_ms * 1000 - server_us
    return {
        "plugin_allocate_p50_us": plugin_p50_ms * 1000,
        "betterproto2_per_call_us": codec_us,
        "betterproto2_client_us": client_us,
        "betterproto2_plugin_us": server_us,
        "grpclib_transport_us": transport_us,
        "plugin_handler_rest_us": handler_us,
        "dominant": "grpclib transport" if transport_us >= codec_us else "betterproto2 encode/decode",
        "transport_to_codec_ratio": transport_us / codec_us if codec_us else None,
    }
