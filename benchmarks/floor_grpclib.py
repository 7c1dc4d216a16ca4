"""The floor on grpclib: Allocate answered with fixed, precomputed bytes, nothing decoded. Run as a script.

Usage: ``python floor_grpclib.py SOCKET RESPONSE_FILE``; SIGTERM stops it. It imports nothing of the plugin.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase
from grpclib.server import Server, Stream


class RawCodec(CodecBase):
    """Messages are the wire bytes themselves: the floor spends nothing on protobuf."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


class Floor:
    def __init__(self, response: bytes) -> None:
        self.response = response

    def __mapping__(self) -> dict[str, Handler]:
        return {"/v1beta1.DevicePlugin/Allocate": Handler(self.allocate, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def allocate(self, stream: Stream[bytes, bytes]) -> None:
        await stream.recv_message()
        await stream.send_message(self.response)


async def serve(socket_path: str, response: bytes) -> None:
    server = Server([Floor(response)], codec=RawCodec())
    await server.start(path=socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2]).read_bytes()))
