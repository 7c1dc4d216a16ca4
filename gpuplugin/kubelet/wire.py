"""Exact, fast protobuf (proto3) decoders for the requests the kubelet sends (the responses are encoded in codec).

betterproto2's generic decoding costs far more than the handlers themselves, so the four request types are decoded
here by hand. Each class has grpclib's ``FromString(bytes)`` and the attribute names of the generated messages, so it
can stand in for them in a ``Handler``. Unknown fields of every wire type are skipped, fields may come in any order,
and anything malformed raises :class:`WireError`, never another exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

__all__ = [
    "AllocateRequest",
    "ContainerAllocateRequest",
    "ContainerPreferredAllocationRequest",
    "Empty",
    "PreStartContainerRequest",
    "PreferredAllocationRequest",
    "WireError",
]


class WireError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


# Single-byte keys (field number << 3 | wire type) of the fields we read; other encodings of the same key (padded
# varints) are legal too and reach the same branches, because keys are compared after decoding.
_KEY_1_LEN: Final = 1 << 3 | 2
_KEY_2_LEN: Final = 2 << 3 | 2
_KEY_3_VARINT: Final = 3 << 3 | 0
_STRING_KEYS: Final = (_KEY_1_LEN, _KEY_2_LEN)
_MAX_KEY: Final = 0xFFFF_FFFF
"""Keys are 32-bit: field numbers go up to 2**29 - 1."""

_T = TypeVar("_T")


def _varint_rest(data: bytes, i: int, first: int) -> tuple[int, int]:
    """The varint whose first byte ``first`` (with its continuation bit set) ended just before ``i``; (value, next)."""
    value = first & 0x7F
    shift = 7
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _skip(data: bytes, i: int, end: int, key: int) -> int:
    """Skip the value of the field whose key was read just before ``i``; returns where the next field starts."""
    if key > _MAX_KEY or key >> 3 == 0:
        raise WireError(f"invalid field key {key}")
    wire_type = key & 7
    if wire_type == 0:
        first = data[i]
        i = i + 1 if first < 0x80 else _varint_rest(data, i + 1, first)[1]
    elif wire_type == 2:
        n = data[i]
        i += 1
        if n >= 0x80:
            n, i = _varint_rest(data, i, n)
        i += n
    elif wire_type == 1:
        i += 8
    elif wire_type == 5:
        i += 4
    else:
        # Groups (3, 4) are proto2-only and never sent by the kubelet; 6 and 7 do not exist.
        raise WireError(f"unsupported wire type {wire_type} (field {key >> 3})")
    if i > end:
        raise WireError("field runs past the end of its message")
    return i


# The decoders below each write out the key and length reads instead of sharing a helper: a call per field makes an
# Allocate request of eight IDs about a third slower to decode.


def _strings_1(data: bytes, i: int, end: int) -> list[str]:
    """The strings of ``repeated string ... = 1`` in the message at ``data[i:end]``; other fields are skipped."""
    out: list[str] = []
    while i < end:
        key = data[i]
        i += 1
        if key >= 0x80:
            key, i = _varint_rest(data, i, key)
        if key == _KEY_1_LEN:
            n = data[i]
            i += 1
            if n >= 0x80:
                n, i = _varint_rest(data, i, n)
            j = i + n
            if j > end:
                raise WireError("string runs past the end of its message")
            out.append(data[i:j].decode("utf-8"))
            i = j
        else:
            i = _skip(data, i, end, key)
    return out


def _repeated_1(data: bytes, parse: Callable[[bytes, int, int], _T]) -> list[_T]:
    """``parse(data, start, end)`` of each ``repeated <message> ... = 1`` entry of the message; other fields skipped."""
    out: list[_T] = []
    i = 0
    end = len(data)
    while i < end:
        key = data[i]
        i += 1
        if key >= 0x80:
            key, i = _varint_rest(data, i, key)
        if key == _KEY_1_LEN:
            n = data[i]
            i += 1
            if n >= 0x80:
                n, i = _varint_rest(data, i, n)
            j = i + n
            if j > end:
                raise WireError("message runs past the end of the buffer")
            out.append(parse(data, i, j))
            i = j
        else:
            i = _skip(data, i, end, key)
    return out


@dataclass(slots=True)
class ContainerAllocateRequest:
    """One container's devices in an Allocate request."""

    devices_ids: list[str]

    @classmethod
    def _decode(cls, data: bytes, i: int, end: int) -> ContainerAllocateRequest:
        return cls(_strings_1(data, i, end))


@dataclass(slots=True)
class AllocateRequest:
    """``v1beta1.AllocateRequest``."""

    container_requests: list[ContainerAllocateRequest]

    @classmethod
    def FromString(cls, data: bytes) -> AllocateRequest:
        """Decode the wire form; raises WireError if it is malformed."""
        return cls(_guarded(data, lambda d: _repeated_1(d, ContainerAllocateRequest._decode)))


@dataclass(slots=True)
class ContainerPreferredAllocationRequest:
    """One container's choice in a GetPreferredAllocation request."""

    available_deviceIDs: list[str]
    must_include_deviceIDs: list[str]
    allocation_size: int

    @classmethod
    def _decode(cls, data: bytes, i: int, end: int) -> ContainerPreferredAllocationRequest:
        available: list[str] = []
        must_include: list[str] = []
        size = 0
        while i < end:
            key = data[i]
            i += 1
            if key >= 0x80:
                key, i = _varint_rest(data, i, key)
            if key in _STRING_KEYS:
                n = data[i]
                i += 1
                if n >= 0x80:
                    n, i = _varint_rest(data, i, n)
                j = i + n
                if j > end:
                    raise WireError("string runs past the end of its message")
                (available if key == _KEY_1_LEN else must_include).append(data[i:j].decode("utf-8"))
                i = j
            elif key == _KEY_3_VARINT:
                size = data[i]
                i += 1
                if size >= 0x80:
                    size, i = _varint_rest(data, i, size)
                    # int32: negative values are sent sign-extended to 64 bits; keep the low 32 bits, signed.
                    size = ((size & 0xFFFF_FFFF) ^ 0x8000_0000) - 0x8000_0000
                if i > end:
                    raise WireError("allocation_size runs past the end of its message")
            else:
                i = _skip(data, i, end, key)
        return cls(available, must_include, size)


@dataclass(slots=True)
class PreferredAllocationRequest:
    """``v1beta1.PreferredAllocationRequest``."""

    container_requests: list[ContainerPreferredAllocationRequest]

    @classmethod
    def FromString(cls, data: bytes) -> PreferredAllocationRequest:
        """Decode the wire form; raises WireError if it is malformed."""
        return cls(_guarded(data, lambda d: _repeated_1(d, ContainerPreferredAllocationRequest._decode)))


@dataclass(slots=True)
class PreStartContainerRequest:
    """``v1beta1.PreStartContainerRequest``."""

    devices_ids: list[str]

    @classmethod
    def FromString(cls, data: bytes) -> PreStartContainerRequest:
        """Decode the wire form; raises WireError if it is malformed."""
        return cls(_guarded(data, lambda d: _strings_1(d, 0, len(d))))


@dataclass(slots=True)
class Empty:
    """``v1beta1.Empty``: whatever arrives is ignored, as nothing in it could change the answer."""

    @classmethod
    def FromString(cls, data: bytes) -> Empty:
        """The one Empty; ``data`` is not looked at."""
        return _EMPTY


def _guarded(data: bytes, decode: Callable[[bytes], _T]) -> _T:
    """Run ``decode``, turning the ways malformed bytes fail into WireError."""
    if type(data) is not bytes:
        data = bytes(data)  # grpclib passes bytes; a memoryview would not slice to bytes
    try:
        return decode(data)
    except (IndexError, UnicodeDecodeError) as exc:
        raise WireError(_why(exc)) from None


_EMPTY: Final = Empty()


def _why(exc: IndexError | UnicodeDecodeError) -> str:
    # An IndexError can only come from reading past the buffer in the middle of a varint or key.
    return "invalid UTF-8 in a string field" if isinstance(exc, UnicodeDecodeError) else "truncated message"
