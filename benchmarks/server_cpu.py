"""The resource server's CPU per call (Allocate, or GetPreferredAllocation with ``--rpc preferred``) with no
socket, no client and no other process: only the serving side.

Run ``python -m benchmarks.server_cpu [--calls N] [--batch K] [--loop uvloop|asyncio] [--rpc R] [--profile FILE]``.
An h2 client connection makes N requests beforehand (Allocate of one device, or GetPreferredAllocation), framed and
HPACK-encoded as grpc-go's client sends them (the same seven headers); the server's protocol (``_Server``'s, as
``serve`` builds it) is then fed one request at a time (or K together, as concurrent callers' requests arrive),
and the loop turned until it has answered, through a transport that counts what it is given and sends nothing. What
it prints is process CPU time per call: h2, grpclib, the plugin's handler and the event loop, none of the kernel's
socket work nor a client's; on a machine shared with other work it is steadier than a latency. ``--profile`` writes a
cProfile of the timed calls.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import structlog
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.core.backend import BackendEvent
from gpuplugin.core.model import DeviceTree
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import PrecodedCodec
from gpuplugin.kubelet.server import ResourceServer, ServerSettings, _Server

#: What grpc-go's client sends with every Allocate of the kubelet's device manager (no deadline, so no grpc-timeout).
GRPC_GO_HEADERS = (
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/v1beta1.DevicePlugin/Allocate"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.72.0"),
    ("te", "trailers"),
)
#: Requests answered before the timing starts: the HPACK tables and the allocator's cache are warm.
WARMUP_CALLS = 300


class CountingTransport(asyncio.Transport):
    """A transport that sends nothing and counts the writes and bytes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.bytes = 0

    def write(self, data: Any) -> None:
        self.writes += 1
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class FixedBackend:
    """A backend whose devices never change: the mock's 8 GPUs."""

    name = "fixed"

    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree

    async def start(self) -> None:
        pass

    async def discover(self) -> DeviceTree:
        return self.tree

    async def events(self) -> AsyncIterator[BackendEvent]:
        await asyncio.Event().wait()
        yield  # type: ignore[misc]  # never reached: the device list never changes

    async def aclose(self) -> None:
        pass


def requests(path: str, message: bytes, count: int) -> tuple[bytes, list[bytes]]:
    """An h2 client's connection preface, and ``count`` requests of ``message`` to ``path`` as grpc-go sends them."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    # The server's answers are never read, so its flow control must never make it wait, nor the client's.
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.increment_flow_control_window(2**31 - 1 - 65_535)
    preface = client.data_to_send()
    client.outbound_flow_control_window = 2**31 - 1
    headers = [(name, path if name == ":path" else value) for name, value in GRPC_GO_HEADERS]
    framed = b"\0" + len(message).to_bytes(4, "big") + message
    made = []
    for _ in range(count):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, headers)
        client.send_data(stream_id, framed, end_stream=True)
        made.append(client.data_to_send())
    return preface, made


def request_of(rpc: str, tree: DeviceTree) -> tuple[str, bytes]:
    """The path and message of one ``rpc`` request as the kubelet makes it: Allocate of one GPU, or
    GetPreferredAllocation of one out of every GPU of the node."""
    ids = [device.id for device in tree.of(tree.resources[0])]
    if rpc == "allocate":
        request: Any = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=ids[:1])])
        return "/v1beta1.DevicePlugin/Allocate", bytes(request)
    request = api.PreferredAllocationRequest(
        container_requests=[api.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=1)]
    )
    return "/v1beta1.DevicePlugin/GetPreferredAllocation", bytes(request)


async def measure(calls: int, profile: Path | None, batch: int = 1, rpc: str = "allocate") -> dict[str, float]:
    """CPU µs, writes and bytes per call of ``rpc`` over ``calls`` requests after the warm-up, ``batch`` of them
    arriving together (in one read, as concurrent callers' requests do)."""
    tree = Inventory.build(MockSettings()).tree(range(MockSettings().gpus))
    resource = tree.resources[0]
    server = ResourceServer(resource, FixedBackend(tree), ServerSettings())
    await server.update(tree.of(resource), tree)
    path, message = request_of(rpc, tree)
    preface, made = requests(path, message, WARMUP_CALLS + calls)
    grpc_server = _Server([server.service], codec=PrecodedCodec())
    protocol = grpc_server._protocol_factory()
    transport = CountingTransport()
    protocol.connection_made(transport)
    protocol.data_received(preface)

    async def answer(request: bytes) -> None:
        protocol.data_received(request)
        # The handler's task, then the flush the corked transport scheduled: a few turns answer a request.
        for _ in range(3):
            await asyncio.sleep(0)

    for request in made[:WARMUP_CALLS]:
        await answer(request)
    writes, sent = transport.writes, transport.bytes
    profiler = cProfile.Profile() if profile is not None else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    timed = made[WARMUP_CALLS:]
    for first in range(0, calls, batch):
        await answer(b"".join(timed[first : first + batch]))
    if profiler is not None:
        profiler.disable()
    cpu_s = time.process_time() - started
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    protocol.connection_lost(None)
    return {
        "cpu_us_per_call": cpu_s / calls * 1e6,
        "writes_per_call": (transport.writes - writes) / calls,
        "bytes_per_call": (transport.bytes - sent) / calls,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--calls", type=click.IntRange(100, 10_000_000), default=5000, show_default=True)
@click.option("--batch", type=click.IntRange(1, 100), default=1, show_default=True, help="Requests per read.")
@click.option("--loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), help="Write a cProfile of the calls.")
@click.option(
    "--rpc",
    type=click.Choice(["allocate", "preferred"]),
    default="allocate",
    show_default=True,
    help="Allocate of one GPU, or GetPreferredAllocation of one of eight.",
)
def main(calls: int, batch: int, loop: str, profile: Path | None, rpc: str) -> None:
    """Print the serving side's CPU time, writes and bytes per call (Allocate unless --rpc says otherwise)."""
    # The plugin logs each RPC at debug; serve runs at warning.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if loop == "uvloop":
        import uvloop

        figures = uvloop.run(measure(calls, profile, batch, rpc))
    else:
        figures = asyncio.run(measure(calls, profile, batch, rpc))
    click.echo(
        f"{figures['cpu_us_per_call']:.1f} µs CPU, {figures['writes_per_call']:.2f} writes, "
        f"{figures['bytes_per_call']:.0f} bytes per call ({rpc}, {calls} calls, {batch} per read, {loop})"
    )


if __name__ == "__main__":
    main(prog_name="python -m benchmarks.server_cpu")
