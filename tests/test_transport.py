"""The corked transport: a turn's writes leave as one, nothing is left unwritten, and grpclib/h2 still have the
internals it builds on."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc
import grpclib
import h2
import hpack
import pytest
import uvloop
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler
from grpclib.protocol import Connection, H2Protocol
from grpclib.server import Server, Stream
from h2.connection import H2Connection
from hpack import Decoder, Encoder, InvalidTableIndex
from hyperframe.frame import Frame

from benchmarks.server_cpu import requests
from gpuplugin.kubelet.codec import PrecodedCodec
from gpuplugin.kubelet.server import _Server
from gpuplugin.kubelet.transport import (
    FLUSH_AT_BYTES,
    OK_RESPONSE_HEADERS,
    OK_TRAILERS,
    CorkedH2Protocol,
    CorkedTransport,
    PrecodedHeadersEncoder,
    RepeatedHeadersDecoder,
    context_free_block,
)
from tests import test_wire_grpcio
from tests.conftest import MOCK_GPU, MockNodeFactory
from tests.fakes import GPU_RESOURCE, StaticBackend, gpu_tree, short_tmp_dir
from tests.test_wire_grpcio import GrpcioApi, Plugin, allocate_request, device_plugin_stub, running_plugin

#: The grpcio code generated from the proto, shared with the wire tests.
grpcio_api = test_wire_grpcio.grpcio_api


class RecordingTransport(asyncio.Transport):
    """A transport that records what is written to it, and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


def corked() -> tuple[CorkedTransport, RecordingTransport]:
    inner = RecordingTransport()
    return CorkedTransport(inner, asyncio.get_running_loop()), inner


async def write_all(transport: CorkedTransport, *chunks: bytes) -> None:
    """Write ``chunks`` from a task of its own: one writer."""
    for chunk in chunks:
        transport.write(chunk)


async def test_the_first_writer_of_a_turn_writes_through_and_later_ones_share_one_write() -> None:
    """The first task to write in a turn writes each chunk at once; the writes of the tasks after it in the same turn
    wait, in order, and leave as one write at the turn's end."""
    transport, inner = corked()
    await asyncio.gather(
        write_all(transport, b"h1", b"", b"d1", b"t1"),
        write_all(transport, b"h2", b"d2", b"t2"),
        write_all(transport, b"h3"),
    )
    await asyncio.sleep(0)
    assert inner.written == [b"h1", b"d1", b"t1", b"h2d2t2h3"]
    assert transport.writes == 4
    await write_all(transport, b"next")
    assert inner.written[-1] == b"next"


async def second_writer(transport: CorkedTransport, *chunks: bytes, then: Callable[[], object]) -> None:
    """Write ``chunks`` as the second writer of a turn, so that they wait for its end, and call ``then`` in the
    same turn, while they wait."""

    async def write_then() -> None:
        await write_all(transport, *chunks)
        then()

    await asyncio.gather(write_all(transport, b"first"), write_then())
    await asyncio.sleep(0)


async def test_close_writes_what_waits_first() -> None:
    """Closing writes the waiting bytes (trailers, a GOAWAY) before the socket's transport closes."""
    transport, inner = corked()
    await second_writer(transport, b"goaway", then=transport.close)
    assert inner.written == [b"first", b"goaway"]
    assert inner.closing


async def test_abort_and_a_closing_socket_drop_what_waits() -> None:
    """Abort forgets the waiting bytes; a socket already closing gets no write at the turn's end."""
    transport, inner = corked()
    await second_writer(transport, b"lost", then=transport.abort)
    assert inner.written == [b"first"]
    assert inner.aborted
    transport, inner = corked()
    await second_writer(transport, b"late", then=lambda: setattr(inner, "closing", True))
    assert inner.written == [b"first"]
    assert transport.writes == 1


async def test_large_writes_are_not_held_for_the_turn() -> None:
    """Once FLUSH_AT_BYTES wait, they are written at once, so the socket's write buffer limits still apply."""
    transport, inner = corked()
    waiting: list[int] = []
    await second_writer(
        transport, b"x" * (FLUSH_AT_BYTES - 1), then=lambda: waiting.append(transport.get_write_buffer_size())
    )
    assert waiting == [FLUSH_AT_BYTES - 1]
    transport, inner = corked()
    await second_writer(
        transport,
        b"x" * (FLUSH_AT_BYTES - 1),
        b"y",
        then=lambda: waiting.append(len(inner.written[-1])),
    )
    assert waiting == [FLUSH_AT_BYTES - 1, FLUSH_AT_BYTES]
    assert len(inner.written) == 2


def frames(data: bytes) -> list[tuple[str, set[str]]]:
    """The HTTP/2 frames in ``data``: type name and flags."""
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        out.append((type(frame).__name__, set(frame.flags)))
        view = view[9 + length :]
    return out


RESPONSE_FRAMES = [
    ("HeadersFrame", {"END_HEADERS"}),
    ("DataFrame", set()),
    ("HeadersFrame", {"END_HEADERS", "END_STREAM"}),
]


@asynccontextmanager
async def fed_echo() -> AsyncIterator[tuple[CorkedH2Protocol, RecordingTransport, list[bytes]]]:
    """The resource server's protocol serving Echo on a recording transport, its connection set up, and 20 echo
    requests as grpc-go frames them."""
    server = _Server([Echo()], codec=RawCodec())
    protocol = server._protocol_factory()
    assert isinstance(protocol, CorkedH2Protocol)
    inner = RecordingTransport()
    protocol.connection_made(inner)
    preface, made = requests("/test.Echo/Echo", b"ping", 20)
    protocol.data_received(preface)
    await asyncio.sleep(0)
    inner.written.clear()
    try:
        yield protocol, inner, made
    finally:
        protocol.connection_lost(None)
        await server_closed(server)


async def test_a_lone_response_leaves_frame_by_frame_as_it_is_made() -> None:
    """A request alone in its turn is answered within the handler's step, each frame written as it is made: the
    client reads the headers while the server still makes the rest."""
    async with fed_echo() as (protocol, inner, made):
        for request in made[:3]:
            inner.written.clear()
            protocol.data_received(request)
            await asyncio.sleep(0)
            assert [frames(w) for w in inner.written] == [[frame] for frame in RESPONSE_FRAMES]


async def concurrent_writes(count: int) -> list[bytes]:
    """What the server writes answering ``count`` requests that arrive together."""
    async with fed_echo() as (protocol, inner, made):
        protocol.data_received(b"".join(made[:count]))
        for _ in range(3):
            await asyncio.sleep(0)
        return list(inner.written)


async def test_responses_of_one_turn_share_one_write() -> None:
    """16 requests arriving together: the first response leaves frame by frame, the other 15 in one write."""
    written = await concurrent_writes(16)
    assert len(written) == 4
    assert frames(b"".join(written)) == RESPONSE_FRAMES * 16


def test_responses_of_one_turn_share_one_write_on_uvloop() -> None:
    """On uvloop, the loop the plugin serves on, the responses of one turn share a write too."""
    written = uvloop.run(concurrent_writes(16))
    assert len(written) == 4


class Echo:
    """A unary RPC answering its request's bytes."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Echo/Echo": Handler(self.echo, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def echo(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert isinstance(request, bytes)
        await stream.send_message(request)


class RawCodec(PrecodedCodec):
    """Requests stay bytes: the echo service has no message types."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[_Server, str]]:
    """The resource server's grpclib server, serving Echo on a fresh unix socket."""
    with short_tmp_dir() as directory:
        server = _Server([Echo()], codec=RawCodec())
        path = str(directory / "echo.sock")
        await server.start(path=path)
        try:
            yield server, path
        finally:
            server.close()
            await server.wait_closed()


async def call_echo(channel: Channel, message: bytes) -> bytes:
    async with channel.request("/test.Echo/Echo", Cardinality.UNARY_UNARY, bytes, bytes) as stream:
        await stream.send_message(message, end=True)
        reply = await stream.recv_message()
    assert isinstance(reply, bytes)
    return reply


async def test_a_large_response_arrives_whole() -> None:
    """A response larger than FLUSH_AT_BYTES and h2's frame size arrives whole, through the same transport."""
    async with echo_server() as (_, path), Channel(path=path, codec=RawCodec()) as channel:
        big = bytes(range(256)) * 1024
        assert await call_echo(channel, big) == big


def test_grpclib_and_h2_internals_the_server_relies_on() -> None:
    """grpclib's server, protocol and h2 still have what ``_Server`` and ``transport`` use; pyproject pins them."""
    assert grpclib.__version__ == "0.4.9"
    assert h2.__version__.startswith("4.4.")
    assert hpack.__version__.startswith("4.")
    # _Server._protocol_factory rebuilds grpclib's: the attributes it reads and the constructors it calls.
    server = Server([Echo()])
    for name in ("_mapping", "_codec", "_status_details_codec", "__dispatch__", "_handlers", "_config", "_h2_config"):
        assert hasattr(server, name), name
    assert callable(server.__gc_step__)
    assert list(inspect.signature(grpclib.server.Handler).parameters) == [
        "mapping",
        "codec",
        "status_details_codec",
        "dispatch",
    ]
    assert list(inspect.signature(H2Protocol).parameters) == ["handler", "config", "h2_config"]
    # h2's header validation and normalisation are off for the server's connections.
    config = server._h2_config
    assert not config.validate_inbound_headers
    assert not config.validate_outbound_headers
    assert not config.normalize_inbound_headers
    assert not config.normalize_outbound_headers
    assert isinstance(H2Connection.MAX_CLOSED_STREAMS, int)


async def test_the_protocol_writes_only_through_the_corked_transport() -> None:
    """grpclib's Connection gets the transport connection_made is given: every frame goes through the cork."""
    server = _Server([Echo()], codec=RawCodec())
    protocol = server._protocol_factory()
    assert isinstance(protocol, CorkedH2Protocol)
    inner = RecordingTransport()
    protocol.connection_made(inner)
    try:
        assert isinstance(protocol.transport, CorkedTransport)
        assert isinstance(protocol.connection, Connection)
        assert protocol.connection._transport is protocol.transport
        assert isinstance(protocol.connection._connection, H2Connection)
        assert isinstance(protocol.connection._connection.encoder, PrecodedHeadersEncoder)
        assert isinstance(protocol.connection._connection.decoder, RepeatedHeadersDecoder)
        # The connection preface (SETTINGS), the turn's first write, goes out at once.
        assert len(inner.written) == 1
        assert frames(inner.written[0])[0][0] == "SettingsFrame"
    finally:
        protocol.connection_lost(None)
        await server_closed(server)


async def server_closed(server: Server) -> None:
    for handler in server._handlers:
        handler.close()
        await handler.wait_closed()


async def test_list_and_watch_messages_each_leave_at_once(mock_node: MockNodeFactory) -> None:
    """A device-list update on an open ListAndWatch stream is written in the turn it is sent, not held back."""
    async with mock_node([]) as node:
        server = node.manager.servers[MOCK_GPU]
        before = server.transport_writes
        node.backend.lose(0)
        # The simulator sees the GPU go only once the update was written: nothing else would write it later.
        await node.kubelet.wait_for(lambda: node.kubelet.allocatable(MOCK_GPU) == 1, timeout=5)
        assert server.transport_writes == before + 1


@pytest.mark.parametrize("size", [0, 1, 16_383, 16_385])
async def test_echo_sizes_around_frame_boundaries(size: int) -> None:
    """Messages of 0 bytes and around h2's 16 KiB frame size arrive intact."""
    async with echo_server() as (_, path), Channel(path=path, codec=RawCodec()) as channel:
        message = bytes(i % 251 for i in range(size))
        assert await call_echo(channel, message) == message


@pytest.fixture
async def grpcio_plugin(grpcio_api: GrpcioApi) -> AsyncIterator[Plugin]:
    """Four GPUs served to a grpcio kubelet."""
    async with running_plugin(grpcio_api, StaticBackend(gpu_tree(4))) as running:
        yield running


async def test_grpcio_gets_whole_unary_responses(grpcio_plugin: Plugin) -> None:
    """A grpcio client over the unix socket gets each unary response whole: headers, message, OK trailers."""
    async with device_plugin_stub(grpcio_plugin) as stub:
        await grpcio_unary_calls(grpcio_plugin.api.pb2, stub)


async def grpcio_unary_calls(pb2: Any, stub: Any) -> None:
    for _ in range(3):
        call = stub.Allocate(allocate_request(pb2, ["GPU-0"], ["GPU-1", "GPU-2"]))
        response = await call
        assert len(response.container_responses) == 2
        assert all(c.envs for c in response.container_responses)
        assert await call.code() == grpc.StatusCode.OK
        assert await call.initial_metadata() is not None
        assert await call.trailing_metadata() is not None
    refused = stub.Allocate(allocate_request(pb2, ["GPU-9"]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await refused
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GPU-9" in cast(str, raised.value.details())


async def test_grpcio_gets_whole_list_and_watch_messages_and_its_end(grpcio_plugin: Plugin) -> None:
    """ListAndWatch over grpcio: the full list arrives, then on stop the empty list and the stream's OK trailers."""
    async with device_plugin_stub(grpcio_plugin) as stub:
        call = stub.ListAndWatch(grpcio_plugin.api.pb2.Empty())
        first = await call.read()
        assert [d.ID for d in first.devices] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
        await grpcio_plugin.manager.servers[GPU_RESOURCE].stop()
        last = await call.read()
        assert list(last.devices) == []
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


def test_precoded_blocks_decode_whatever_the_peer_table_holds() -> None:
    """The precoded OK headers and trailers decode to themselves on a fresh decoder and on one with a full table."""
    encoder, decoder = PrecodedHeadersEncoder(), Decoder()
    for block in (encoder.encode([(b"x-filler", b"a" * 100)] * 3), encoder.encode([(b"grpc-message", b"m")])):
        decoder.decode(block, raw=True)
    for headers in (OK_RESPONSE_HEADERS, OK_TRAILERS):
        block = encoder.encode(list(headers))
        assert block == context_free_block(headers)
        assert [tuple(h) for h in decoder.decode(block, raw=True)] == list(headers)
        assert [tuple(h) for h in Decoder().decode(block, raw=True)] == list(headers)


def test_a_table_size_change_goes_first_through_the_ordinary_encoder() -> None:
    """After the peer resizes its table, the next block carries the size update; the precoded one follows."""
    encoder, decoder = PrecodedHeadersEncoder(), Decoder()
    encoder.header_table_size = 256
    first = encoder.encode(list(OK_TRAILERS))
    assert first != context_free_block(OK_TRAILERS)
    assert [tuple(h) for h in decoder.decode(first, raw=True)] == list(OK_TRAILERS)
    assert decoder.header_table_size == 256
    assert encoder.encode(list(OK_TRAILERS)) == context_free_block(OK_TRAILERS)
    other = [(b"grpc-status", b"5"), (b"grpc-message", b"gone")]
    assert [tuple(h) for h in decoder.decode(encoder.encode(other), raw=True)] == other


async def test_responses_carry_the_precoded_blocks() -> None:
    """The server's connections send an OK response's headers and trailers as the precoded blocks."""
    async with fed_echo() as (protocol, inner, made):
        protocol.data_received(made[0])
        await asyncio.sleep(0)
        sent = b"".join(inner.written)
    assert context_free_block(OK_RESPONSE_HEADERS) in sent
    assert context_free_block(OK_TRAILERS) in sent


def decoded(decoder: Decoder, block: bytes) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in decoder.decode(block, raw=True)]


def test_repeated_blocks_decode_as_a_plain_decoder_would() -> None:
    """Fed the same blocks, the remembering decoder answers as hpack's own, also for a block of indexed fields only
    seen again after another block changed the table, and after the table size changed."""
    encoder, ours, plain = Encoder(), RepeatedHeadersDecoder(), Decoder()
    request = [(b":method", b"POST"), (b":path", b"/v1beta1.DevicePlugin/Allocate"), (b"te", b"trailers")]
    first, repeated = encoder.encode(request), encoder.encode(request)
    for block in (first, repeated, repeated):
        assert decoded(ours, block) == decoded(plain, block)
    assert decoded(ours, repeated) == request
    # A new entry moves the request's entries down the table: the same bytes now name other headers.
    changing = encoder.encode([(b"x-new", b"1")])
    assert decoded(ours, changing) == decoded(plain, changing)
    assert decoded(ours, repeated) == decoded(plain, repeated) != request
    ours.header_table_size = plain.header_table_size = 0
    with pytest.raises(InvalidTableIndex):
        plain.decode(repeated, raw=True)
    with pytest.raises(InvalidTableIndex):
        ours.decode(repeated, raw=True)


def test_a_repeated_block_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of indexed fields seen again with the table unchanged is answered without decoding it again."""
    encoder, ours = Encoder(), RepeatedHeadersDecoder()
    request = [(b":method", b"POST"), (b"te", b"trailers"), (b"user-agent", b"kubelet")]
    ours.decode(encoder.encode(request), raw=True)
    repeated = encoder.encode(request)
    assert decoded(ours, repeated) == request
    calls: list[bytes] = []
    original = Decoder.decode

    def counting(self: Decoder, data: bytes, raw: bool = False) -> Any:
        calls.append(data)
        return original(self, data, raw)

    monkeypatch.setattr(Decoder, "decode", counting)
    assert decoded(ours, repeated) == request
    assert calls == []
