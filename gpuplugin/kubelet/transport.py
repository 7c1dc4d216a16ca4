"""The resource server's HTTP/2 transport: grpclib's protocol with the writes of concurrent responses coalesced,
and the HPACK work every response repeats done once.

grpclib writes h2's ``data_to_send()`` to the socket after every h2 operation: a unary response's headers, its
message and its trailers each cost a ``send`` of their own. :class:`CorkedTransport` sits between grpclib and the
socket's transport. The first task (or callback) to write in an event-loop turn writes through at once; once a
second one writes in the same turn, its writes and everything after them wait and leave as one write at the end of
the turn. A lone call, the kubelet's way (one admission at a time), is answered as soon as each frame is made: the
client wakes on the response's first frame and reads the rest while the server still makes it, which measured
faster than one write at the end; responses finished in the same turn under concurrent calls share one ``send``.

Nothing is left unwritten: the end of the turn is scheduled with its first write, and ``close`` writes what waits
before closing the socket. Only ``abort`` and a lost connection drop it, where the socket can take nothing more.

:class:`PrecodedHeadersEncoder` answers the header lists every OK response repeats (its headers, its trailers) with
HPACK blocks encoded once. They are encoded to reference only HPACK's static table and never to enter the dynamic
one, so they mean the same whatever the connection's dynamic table holds; a pending table size update (the peer
changed its table size) goes through the ordinary encoder, which must put it first in the next block.

:class:`RepeatedHeadersDecoder` decodes once a request header block made only of indexed fields, the form the
kubelet's grpc-go client sends from its second request on (the same seven headers, each already in the table). Such
a block does not change the decoder's table, so its meaning stays the same until something else changes the table:
any other block, or a new table size or limit, and then it is decoded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, cast

from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.protocol import H2Protocol
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple

#: Waiting bytes written at once rather than at the end of the turn: a large stream of messages in one turn still
#: reaches the socket's transport, whose write buffer limits are what make grpclib wait (``pause_writing``).
FLUSH_AT_BYTES = 64 * 1024


#: Who wrote first in the current turn, before anyone has: a task, or None for a callback such as data_received.
_NOBODY = object()


class CorkedTransport(asyncio.Transport):
    """A write transport that writes the first writer's frames of a turn through, and joins the writes of every
    later writer in the same turn into one write at the turn's end."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._turn_writer: object = _NOBODY
        self.writes = 0
        """Writes made to the wrapped transport: each is one ``send`` where the socket takes it at once."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        writer = asyncio.current_task(self._loop)
        if self._turn_writer is _NOBODY:
            self._turn_writer = writer
            self._loop.call_soon(self._end_turn)
        if writer is self._turn_writer and not self._waiting:
            self._write(bytes(data))
            return
        self._waiting.append(bytes(data))
        self._waiting_bytes += len(data)
        if self._waiting_bytes >= FLUSH_AT_BYTES:
            self.flush()

    def _end_turn(self) -> None:
        self._turn_writer = _NOBODY
        self.flush()

    def flush(self) -> None:
        """Write what waits now, as one write."""
        if not self._waiting:
            return
        data = self._waiting[0] if len(self._waiting) == 1 else b"".join(self._waiting)
        self._waiting.clear()
        self._waiting_bytes = 0
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._transport.is_closing():
            # The socket is going; asyncio would only count (and, repeated, log) a write into it.
            return
        self.writes += 1
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        # Trailers or a GOAWAY written just before closing still reach the peer: asyncio sends a closing
        # transport's buffer before it closes the socket.
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self.discard()
        self._transport.abort()

    def discard(self) -> None:
        """Forget what waits: the socket is gone and can take nothing more."""
        self._waiting.clear()
        self._waiting_bytes = 0

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._waiting_bytes + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


Headers = tuple[tuple[bytes, bytes], ...]

#: What grpclib's server sends, as h2 hands it to the encoder, for every OK unary response and stream end: the
#: response headers (proto codec, no initial metadata) and the trailers of an OK status without trailing metadata.
OK_RESPONSE_HEADERS: Headers = ((b":status", b"200"), (b"content-type", f"{GRPC_CONTENT_TYPE}+proto".encode()))
OK_TRAILERS: Headers = ((b"grpc-status", b"0"),)


def context_free_block(headers: Headers) -> bytes:
    """The HPACK block of ``headers`` that neither reads nor changes a dynamic table: static-table indexes and
    never-indexed literals only."""
    return Encoder().encode([NeverIndexedHeaderTuple(name, value) for name, value in headers])


class PrecodedHeadersEncoder(Encoder):
    """h2's HPACK encoder, answering the header lists it was given with blocks encoded once."""

    def __init__(self, known: Sequence[Headers] = (OK_RESPONSE_HEADERS, OK_TRAILERS)) -> None:
        super().__init__()
        self._blocks = {headers: context_free_block(headers) for headers in known}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        # h2 passes a list of (bytes, bytes) tuples; anything else (a dict, a generator) is encoded as usual.
        if type(headers) is list and not self.header_table.resized:
            try:
                block = self._blocks.get(tuple(headers))
            except TypeError:  # an unhashable entry: not one of ours
                block = None
            if block is not None:
                return block
        return super().encode(cast(Iterable[Any], headers), huffman)


#: Bytes that are a whole indexed header field each (indexes 1 to 126): a block of only these changes no table.
_ONE_BYTE_INDEXES = bytes(range(0x81, 0xFF))
#: Distinct repeated blocks remembered; the kubelet sends one per RPC it calls.
REPEATED_BLOCKS_REMEMBERED = 16


class RepeatedHeadersDecoder(Decoder):
    """h2's HPACK decoder, decoding a block of indexed fields only once while the table it refers to is unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._table_changes = 0
        """Counts decodes that may have changed the table: a remembered block is valid only at its count."""
        self._remembered: dict[bytes, tuple[tuple[int, int, int, int], list[HeaderTuple]]] = {}

    def _state(self) -> tuple[int, int, int, int]:
        table = self.header_table
        return (self._table_changes, table.maxsize, self.max_allowed_table_size, self.max_header_list_size)

    def decode(self, data: bytes, raw: bool = False) -> Any:
        if not raw or not data or data.translate(None, _ONE_BYTE_INDEXES):
            self._table_changes += 1
            return super().decode(data, raw)
        state = self._state()
        remembered = self._remembered.get(data)
        if remembered is not None and remembered[0] == state:
            return list(remembered[1])
        headers = list(super().decode(data, raw))
        if len(self._remembered) >= REPEATED_BLOCKS_REMEMBERED:
            self._remembered.clear()
        self._remembered[data] = (state, headers)
        return list(headers)


class CorkedH2Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol writing through a :class:`CorkedTransport`, its OK headers precoded."""

    transport: CorkedTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio.Transport, but have its methods.
        self.transport = CorkedTransport(cast(asyncio.Transport, transport), asyncio.get_running_loop())
        super().connection_made(self.transport)
        # Replaced before any header block was encoded or decoded (the connection preface is SETTINGS only): no
        # HPACK state is lost, and later SETTINGS changes reach the new encoder and decoder.
        h2_connection = self.connection._connection
        h2_connection.encoder = PrecodedHeadersEncoder()
        decoder = RepeatedHeadersDecoder()
        decoder.max_header_list_size = h2_connection.decoder.max_header_list_size
        decoder.max_allowed_table_size = h2_connection.decoder.max_allowed_table_size
        h2_connection.decoder = decoder

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:
            self.transport.discard()
        super().connection_lost(exc)
