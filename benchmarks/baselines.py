"""The floors our Allocate is compared with: minimal servers of fixed bytes, each in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpclib
import grpclib.exceptions
from grpclib.client import Channel

from benchmarks.plugin_process import ServerProcess
from gpuplugin.kubelet.api import v1beta1

_HERE = Path(__file__).resolve().parent

#: Baseline name to the script that serves it.
FLOORS = {"floor-grpclib": _HERE / "floor_grpclib.py", "floor-grpcio": _HERE / "floor_grpcio.py"}
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Floor:
    """A running floor server and a client on it of the same kind the simulator uses for the plugin."""

    name: str
    process: ServerProcess
    socket: Path
    channel: Channel
    stub: v1beta1.DevicePluginStub


@contextlib.asynccontextmanager
async def running_floors(workdir: Path, response: bytes) -> AsyncIterator[list[Floor]]:
    """Start every floor (serving ``response`` to any Allocate), wait until each answers, stop them after."""
    response_file = workdir / "allocate-response.bin"
    response_file.write_bytes(response)
    floors: list[Floor] = []
    try:
        for name, script in FLOORS.items():
            socket = workdir / f"{name}.sock"
            process = ServerProcess(
                name, [sys.executable, str(script), str(socket), str(response_file)], workdir / f"{name}.log"
            )
            process.start()
            channel = Channel(path=str(socket))
            floors.append(Floor(name, process, socket, channel, v1beta1.DevicePluginStub(channel)))
        for floor in floors:
            await _wait_serving(floor)
        yield floors
    finally:
        for floor in floors:
            floor.channel.close()
            await floor.process.stop()


async def _wait_serving(floor: Floor) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    request = v1beta1.AllocateRequest(container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=["x"])])
    while True:
        floor.process.check_alive()
        try:
            await floor.stub.allocate(request, timeout=2.0)
            return
        except (OSError, grpclib.GRPCError, grpclib.exceptions.StreamTerminatedError, TimeoutError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)
