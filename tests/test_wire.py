"""The hand-written request decoders agree with betterproto2 and the protobuf wire format."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuplugin.kubelet import wire
from gpuplugin.kubelet.api import v1beta1 as api

INT32 = st.integers(-(2**31), 2**31 - 1)
#: Any unicode (hypothesis leaves out surrogates, which UTF-8 cannot carry); sometimes long enough for 2-byte lengths.
IDS = st.lists(st.one_of(st.text(max_size=12), st.text(min_size=100, max_size=200)), max_size=6)
MAX_FIELD = 2**29 - 1

allocate_requests = st.builds(
    lambda ids: api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=i) for i in ids]),
    st.lists(IDS, max_size=4),
)
preferred_requests = st.builds(
    lambda cs: api.PreferredAllocationRequest(
        container_requests=[
            api.ContainerPreferredAllocationRequest(
                available_deviceIDs=a, must_include_deviceIDs=m, allocation_size=size
            )
            for a, m, size in cs
        ]
    ),
    st.lists(st.tuples(IDS, IDS, INT32), max_size=4),
)
pre_start_requests = st.builds(lambda ids: api.PreStartContainerRequest(devices_ids=ids), IDS)


def from_allocate(message: api.AllocateRequest) -> wire.AllocateRequest:
    """What wire should decode from ``message``'s encoding, field by field."""
    return wire.AllocateRequest(
        [wire.ContainerAllocateRequest(list(c.devices_ids)) for c in message.container_requests]
    )


def from_preferred(message: api.PreferredAllocationRequest) -> wire.PreferredAllocationRequest:
    """What wire should decode from ``message``'s encoding, field by field."""
    return wire.PreferredAllocationRequest(
        [
            wire.ContainerPreferredAllocationRequest(
                list(c.available_deviceIDs), list(c.must_include_deviceIDs), c.allocation_size
            )
            for c in message.container_requests
        ]
    )


def from_pre_start(message: api.PreStartContainerRequest) -> wire.PreStartContainerRequest:
    """What wire should decode from ``message``'s encoding, field by field."""
    return wire.PreStartContainerRequest(list(message.devices_ids))


# Hand encoding, with the freedoms the wire format allows: padded varints, any field order, unknown fields.


def varint(value: int, padding: int = 0) -> bytes:
    """``value`` (non-negative) as a varint, padded with ``padding`` redundant continuation bytes."""
    out = bytearray()
    while True:
        out.append(value & 0x7F | 0x80)
        value >>= 7
        if not value:
            break
    out.extend([0x80] * padding)
    out[-1] &= 0x7F
    return bytes(out)


def pad(draw: st.DrawFn, value: int) -> bytes:
    """``value`` as a varint padded to a drawn length of at most 10 bytes."""
    return varint(value, draw(st.integers(0, 10 - len(varint(value)))))


def key(draw: st.DrawFn, number: int, wire_type: int) -> bytes:
    """A field key, sometimes padded."""
    return pad(draw, number << 3 | wire_type)


def length_delimited(draw: st.DrawFn, number: int, payload: bytes) -> bytes:
    """A length-delimited field, key and length sometimes padded."""
    return key(draw, number, 2) + pad(draw, len(payload)) + payload


@st.composite
def unknown_field(draw: st.DrawFn, known: Sequence[int]) -> bytes:
    """A field of a number not in ``known``, of each wire type proto3 has, with a valid payload."""
    number = draw(st.integers(1, MAX_FIELD).filter(lambda n: n not in known))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    if wire_type == 0:
        return key(draw, number, 0) + pad(draw, draw(st.integers(0, 2**64 - 1)))
    if wire_type == 2:
        return length_delimited(draw, number, draw(st.binary(max_size=300)))
    return key(draw, number, wire_type) + draw(st.binary(min_size=8, max_size=8))[: 8 if wire_type == 1 else 4]


def shuffled(draw: st.DrawFn, fields: list[tuple[int, bytes]], known: Sequence[int]) -> bytes:
    """The encoded fields in a drawn order that keeps each field number's own order, with unknown fields mixed in."""
    order = draw(st.permutations([number for number, _ in fields]))
    queues: dict[int, list[bytes]] = {}
    for number, encoded in fields:
        queues.setdefault(number, []).append(encoded)
    parts = [queues[number].pop(0) for number in order]
    for _ in range(draw(st.integers(0, 3))):
        parts.insert(draw(st.integers(0, len(parts))), draw(unknown_field(known)))
    return b"".join(parts)


def string_fields(draw: st.DrawFn, number: int, ids: Sequence[str]) -> list[tuple[int, bytes]]:
    """``repeated string`` entries, one field each."""
    return [(number, length_delimited(draw, number, i.encode())) for i in ids]


@st.composite
def hand_preferred(draw: st.DrawFn) -> tuple[bytes, wire.PreferredAllocationRequest]:
    """A PreferredAllocationRequest hand-encoded in any order with unknown fields, and what it decodes to."""
    containers = []
    top: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 3))):
        available, must = draw(IDS), draw(IDS)
        # Occurrences of the scalar beyond the first are legal; the last one wins.
        sizes = draw(st.lists(INT32, max_size=3))
        fields = string_fields(draw, 1, available) + string_fields(draw, 2, must)
        fields += [(3, key(draw, 3, 0) + pad(draw, s & (2**64 - 1))) for s in sizes]
        body = shuffled(draw, fields, known=(1, 2, 3))
        top.append((1, length_delimited(draw, 1, body)))
        containers.append(wire.ContainerPreferredAllocationRequest(available, must, sizes[-1] if sizes else 0))
    return shuffled(draw, top, known=(1,)), wire.PreferredAllocationRequest(containers)


@st.composite
def hand_allocate(draw: st.DrawFn) -> tuple[bytes, wire.AllocateRequest]:
    """An AllocateRequest hand-encoded with unknown fields at both levels, and what it decodes to."""
    containers = []
    top: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 3))):
        ids = draw(IDS)
        top.append((1, length_delimited(draw, 1, shuffled(draw, string_fields(draw, 1, ids), known=(1,)))))
        containers.append(wire.ContainerAllocateRequest(ids))
    return shuffled(draw, top, known=(1,)), wire.AllocateRequest(containers)


@st.composite
def hand_pre_start(draw: st.DrawFn) -> tuple[bytes, wire.PreStartContainerRequest]:
    """A PreStartContainerRequest hand-encoded with unknown fields, and what it decodes to."""
    ids = draw(IDS)
    return shuffled(draw, string_fields(draw, 1, ids), known=(1,)), wire.PreStartContainerRequest(ids)


# Round trips against betterproto2.


@given(allocate_requests)
def test_allocate_matches_betterproto(message: api.AllocateRequest) -> None:
    """AllocateRequest decodes as betterproto2 encodes and parses it."""
    data = bytes(message)
    assert (
        wire.AllocateRequest.FromString(data)
        == from_allocate(api.AllocateRequest.parse(data))
        == from_allocate(message)
    )


@given(preferred_requests)
def test_preferred_matches_betterproto(message: api.PreferredAllocationRequest) -> None:
    """PreferredAllocationRequest decodes as betterproto2 encodes and parses it, negative sizes included."""
    data = bytes(message)
    decoded = wire.PreferredAllocationRequest.FromString(data)
    assert decoded == from_preferred(api.PreferredAllocationRequest.parse(data)) == from_preferred(message)


@given(pre_start_requests)
def test_pre_start_matches_betterproto(message: api.PreStartContainerRequest) -> None:
    """PreStartContainerRequest decodes as betterproto2 encodes and parses it."""
    data = bytes(message)
    assert wire.PreStartContainerRequest.FromString(data) == from_pre_start(api.PreStartContainerRequest.parse(data))


@given(preferred_requests, preferred_requests)
def test_concatenated_messages_merge(
    first: api.PreferredAllocationRequest, second: api.PreferredAllocationRequest
) -> None:
    """Two encodings one after the other decode as one message with both messages' containers."""
    decoded = wire.PreferredAllocationRequest.FromString(bytes(first) + bytes(second))
    assert decoded.container_requests == (
        from_preferred(first).container_requests + from_preferred(second).container_requests
    )


# The freedoms of the wire format: order, unknown fields, padded varints.


@given(hand_preferred())
def test_preferred_any_order_unknown_fields_padding(case: tuple[bytes, wire.PreferredAllocationRequest]) -> None:
    """Shuffled fields, unknown fields of every wire type and padded varints decode to the same request."""
    data, expected = case
    assert wire.PreferredAllocationRequest.FromString(data) == expected


@given(hand_allocate())
def test_allocate_any_order_unknown_fields_padding(case: tuple[bytes, wire.AllocateRequest]) -> None:
    """Unknown fields at both levels and padded varints are skipped in an AllocateRequest."""
    data, expected = case
    assert wire.AllocateRequest.FromString(data) == expected


@given(hand_pre_start())
def test_pre_start_unknown_fields_padding(case: tuple[bytes, wire.PreStartContainerRequest]) -> None:
    """Unknown fields and padded varints are skipped in a PreStartContainerRequest."""
    data, expected = case
    assert wire.PreStartContainerRequest.FromString(data) == expected


def test_unpadded_hand_encoding_agrees_with_betterproto() -> None:
    """Unknown fields betterproto2 also skips: both parsers agree on the same bytes."""
    unknown = b"\x10\x05" + b"\x19" + bytes(8) + b"\x22\x02hi" + b"\x2d" + bytes(4)
    body = unknown + b"\x0a\x00"
    data = unknown + b"\x0a" + bytes([len(body)]) + body + unknown
    assert wire.AllocateRequest.FromString(data) == from_allocate(api.AllocateRequest.parse(data))
    assert wire.AllocateRequest.FromString(data) == wire.AllocateRequest([wire.ContainerAllocateRequest([""])])


def test_known_number_with_another_wire_type_is_unknown() -> None:
    """A known field number with the wrong wire type is skipped as an unknown field, as protobuf does."""
    container = b"\x08\x07" + b"\x0a\x01a" + b"\x1a\x01x" + b"\x18\x04" + b"\x15" + bytes(4)
    assert wire.PreferredAllocationRequest.FromString(b"\x0a" + bytes([len(container)]) + container) == (
        wire.PreferredAllocationRequest([wire.ContainerPreferredAllocationRequest(["a"], [], 4)])
    )
    assert wire.AllocateRequest.FromString(b"\x08\x01\x0a\x00") == wire.AllocateRequest(
        [wire.ContainerAllocateRequest([])]
    )


@pytest.mark.parametrize(
    ("encoded", "size"),
    [
        (varint(2**64 - 1), -1),
        (varint(2**64 - 2**31), -(2**31)),
        (varint(2**32 - 1), -1),  # 5 bytes: int32 keeps the low 32 bits
        (varint(2**32 + 7), 7),
        (varint(5, padding=9), 5),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", -1),  # bits past the 64th are dropped
    ],
)
def test_allocation_size_is_int32(encoded: bytes, size: int) -> None:
    """allocation_size keeps the low 32 bits of its varint, signed, however long the varint."""
    container = b"\x18" + encoded
    decoded = wire.PreferredAllocationRequest.FromString(b"\x0a" + bytes([len(container)]) + container)
    assert decoded.container_requests[0].allocation_size == size


# Malformed input.

DECODERS: list[Callable[[bytes], Any]] = [
    wire.AllocateRequest.FromString,
    wire.PreferredAllocationRequest.FromString,
    wire.PreStartContainerRequest.FromString,
]


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x0a", id="no length"),
        pytest.param(b"\x0a\x05abc", id="length past the end"),
        pytest.param(b"\x0a\x80", id="truncated length varint"),
        pytest.param(b"\x8a", id="truncated key"),
        pytest.param(b"\x0a" + b"\x80" * 10 + b"\x00", id="11-byte varint"),
        pytest.param(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", id="huge length"),
        pytest.param(b"\x02\x00", id="field number 0"),
        pytest.param(varint(2**32 | 0x0A) + b"\x00", id="key past 32 bits"),
        pytest.param(b"\x13\x14", id="group start"),
        pytest.param(b"\x14", id="group end"),
        pytest.param(b"\x16\x00", id="wire type 6"),
        pytest.param(b"\x17\x00", id="wire type 7"),
        pytest.param(b"\x10", id="unknown varint truncated"),
        pytest.param(b"\x10\xff", id="unknown varint continues past the end"),
        pytest.param(b"\x11" + bytes(7), id="unknown fixed64 truncated"),
        pytest.param(b"\x15" + bytes(3), id="unknown fixed32 truncated"),
        pytest.param(b"\x12\x02a", id="unknown length-delimited truncated"),
    ],
)
def test_malformed_is_a_wire_error(decode: Callable[[bytes], Any], data: bytes) -> None:
    """Truncation, bad keys, overlong varints and group or reserved wire types raise WireError."""
    with pytest.raises(wire.WireError):
        decode(data)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_is_a_wire_error(bad: bytes) -> None:
    """Invalid UTF-8 (stray bytes, overlong forms, surrogates, cut sequences, past U+10FFFF) raises WireError."""
    field = b"\x0a" + bytes([len(bad)]) + bad
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.PreStartContainerRequest.FromString(field)
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.AllocateRequest.FromString(b"\x0a" + bytes([len(field)]) + field)
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.PreferredAllocationRequest.FromString(b"\x0a" + bytes([len(field) + 2]) + b"\x18\x01" + field)


@pytest.mark.parametrize(
    "container",
    [
        pytest.param(b"\x0a\x05ab", id="string"),
        pytest.param(b"\x18\x80", id="varint"),
        pytest.param(b"\x18", id="no value"),
        pytest.param(b"\x15\x00\x00", id="fixed32"),
        pytest.param(b"\x8a", id="key"),
    ],
)
def test_field_past_its_container_is_a_wire_error(container: bytes) -> None:
    """A field inside a container that runs past the container's end is refused, though the buffer goes on."""
    following = b"\x0a\x00" * 3  # three empty containers
    for decode in DECODERS[:2]:
        decode(following)  # raises nothing by itself
        data = b"\x0a" + bytes([len(container)]) + container + following
        with pytest.raises(wire.WireError):
            decode(data)


@pytest.mark.parametrize(
    ("messages", "decode"),
    [
        pytest.param(allocate_requests, wire.AllocateRequest.FromString, id="allocate"),
        pytest.param(preferred_requests, wire.PreferredAllocationRequest.FromString, id="preferred"),
    ],
)
@given(data=st.data())
def test_truncated_request_is_a_wire_error(
    messages: st.SearchStrategy[Any], decode: Callable[[bytes], Any], data: st.DataObject
) -> None:
    """Cutting an AllocateRequest or a PreferredAllocationRequest inside its last container raises WireError."""
    message = data.draw(messages.filter(lambda m: bool(m.container_requests)))
    encoded = bytes(message)
    last = bytes(type(message)(container_requests=message.container_requests[-1:]))
    cut = data.draw(st.integers(len(encoded) - len(last) + 1, len(encoded) - 1))
    with pytest.raises(wire.WireError):
        decode(encoded[:cut])


@given(st.binary(max_size=200))
def test_garbage_decodes_or_is_a_wire_error(data: bytes) -> None:
    """Any bytes decode or raise WireError, never another exception (and never hang: hypothesis has a deadline)."""
    for decode in DECODERS:
        with contextlib.suppress(wire.WireError):
            decode(data)


@given(preferred_requests, st.data())
def test_mutated_requests_decode_or_are_wire_errors(
    message: api.PreferredAllocationRequest, data: st.DataObject
) -> None:
    """Valid requests with bytes flipped or cut still decode or raise WireError, nothing else."""
    encoded = bytearray(bytes(message))
    for _ in range(data.draw(st.integers(1, 4))):
        if encoded:
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    mutated = bytes(encoded[: data.draw(st.integers(0, len(encoded)))])
    for decode in DECODERS:
        with contextlib.suppress(wire.WireError):
            decode(mutated)


# The rest of the API.


def test_empty_ignores_its_content() -> None:
    """Empty decodes from anything, garbage included, to the one Empty."""
    assert wire.Empty.FromString(b"") is wire.Empty.FromString(b"\xff\x13") == wire.Empty()


def test_other_bytes_like_inputs() -> None:
    """A memoryview or bytearray decodes like the bytes it holds."""
    data = bytes(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["GPU-0"])]))
    expected = wire.AllocateRequest([wire.ContainerAllocateRequest(["GPU-0"])])
    assert wire.AllocateRequest.FromString(memoryview(data)) == expected  # type: ignore[arg-type]
    assert wire.AllocateRequest.FromString(bytearray(data)) == expected  # type: ignore[arg-type]


def test_wire_error_is_a_value_error() -> None:
    """WireError is a ValueError, so callers that expect a decode error to be one still catch it."""
    assert issubclass(wire.WireError, ValueError)


def test_repr_names_the_fields() -> None:
    """The repr shows the betterproto2 attribute names, for logs and failing tests."""
    request = wire.PreferredAllocationRequest([wire.ContainerPreferredAllocationRequest(["a"], ["b"], -1)])
    assert repr(request) == (
        "PreferredAllocationRequest(container_requests=[ContainerPreferredAllocationRequest("
        "available_deviceIDs=['a'], must_include_deviceIDs=['b'], allocation_size=-1)])"
    )
