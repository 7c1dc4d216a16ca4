"""Encoding on the RPC paths: a codec that sends bytes as they are, and the responses' wire form built by hand.

The requests are decoded by hand too, in ``gpuplugin.kubelet.wire``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from grpclib.encoding.proto import ProtoCodec

from gpuplugin.kubelet.wire import WireError

#: gRPC's default limit on a received message; grpclib has none, and the kubelet never sends a fraction of it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class PrecodedCodec(ProtoCodec):
    """grpclib's codec, plus: a ``bytes`` message is already the encoded wire form; oversized requests are refused."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        # Refused before any decoding: a huge request would otherwise hold the event loop while it is parsed.
        if len(data) > MAX_MESSAGE_BYTES:
            raise WireError(f"the message has {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
        return super().decode(data, message_type)


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def repeated_field(number: int, encoded_messages: list[bytes]) -> bytes:
    """The wire form of a message whose only field is ``repeated <message> = number``, from encoded entries."""
    tag = encode_varint(number << 3 | 2)
    return b"".join([tag + encode_varint(len(m)) + m for m in encoded_messages])


_KEY_1: Final = encode_varint(1 << 3 | 2)
_KEY_1_AND_LENGTHS: Final = [_KEY_1 + bytes([n]) for n in range(0x80)]
"""Key of field 1 (length-delimited) and a one-byte length, for every length that fits one byte."""


def _key_1_and_length(n: int) -> bytes:
    if n < 0x80:
        return _KEY_1_AND_LENGTHS[n]
    return _KEY_1 + encode_varint(n)


def encode_preferred_response(chosen_per_container: Sequence[Sequence[bytes]]) -> bytes:
    """The wire form of a PreferredAllocationResponse: one container response per entry, of UTF-8 device IDs.

    Byte for byte what betterproto2 makes of ``PreferredAllocationResponse(container_responses=[
    ContainerPreferredAllocationResponse(device_i_ds=[...]), ...])``. It is ``repeated_field`` twice over, written
    out with a table of prefixes: device IDs are short, and this runs for every ID of every answer.
    """
    out: list[bytes] = []
    for ids in chosen_per_container:
        body = b"".join([_key_1_and_length(len(i)) + i for i in ids])
        out.append(_key_1_and_length(len(body)))
        out.append(body)
    return b"".join(out)
