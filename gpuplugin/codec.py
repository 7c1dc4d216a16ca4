"""A protobuf codec that also sends bytes as they are, so responses can be encoded once and sent many times."""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from gpuplugin.wire import WireError

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
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def repeated_field(number: int, encoded_messages: list[bytes]) -> bytes:
    """The wire form of a message whose only field is ``repeated <message> = number``, from encoded entries."""
    tag = encode_varint(number << 3 | 2)
    return b"".join(tag + encode_varint(len(m)) + m for m in encoded_messages)
