"""The floor on grpcio's asyncio server: Allocate answered with fixed, precomputed bytes. Run as a script.

Usage: ``python floor_grpcio.py SOCKET RESPONSE_FILE``; SIGTERM stops it. It imports nothing of the plugin.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc


async def serve(socket_path: str, response: bytes) -> None:
    async def allocate(request: bytes, context: Any) -> bytes:
        return response

    # No (de)serializers: grpcio hands the handler the request bytes and sends the answer's bytes as they are.
    handler = grpc.method_handlers_generic_handler(
        "v1beta1.DevicePlugin", {"Allocate": grpc.unary_unary_rpc_method_handler(allocate)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(None)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2]).read_bytes()))
