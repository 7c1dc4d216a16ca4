"""A protobuf codec that also sends bytes as they are, so responses can be encoded once and sent many times."""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec


class PrecodedCodec(ProtoCodec):
    """grpclib's codec, plus: a ``bytes`` message is already the encoded wire form."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)


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
