"""The precoded codec and the hand-built wire form of the responses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import PrecodedCodec, encode_preferred_response, encode_varint, repeated_field


def decode_varint(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the varint at the start of ``data``."""
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    raise ValueError("truncated varint")


def test_precoded_bytes_pass_through() -> None:
    """A bytes message is sent as it is, whatever the declared type."""
    encoded = bytes(api.DevicePluginOptions(pre_start_required=True))
    assert PrecodedCodec().encode(encoded, api.DevicePluginOptions) is encoded
    assert PrecodedCodec().encode(b"", api.Empty) == b""


def test_messages_are_encoded_and_decode_back() -> None:
    """A message is encoded as protobuf, and the codec decodes it back to an equal message."""
    codec = PrecodedCodec()
    message = api.ListAndWatchResponse(
        devices=[api.Device(id="GPU-0", health="Healthy", topology=api.TopologyInfo(nodes=[api.NumaNode(id=1)]))]
    )
    encoded = codec.encode(message, api.ListAndWatchResponse)
    assert encoded == bytes(message)
    assert codec.decode(encoded, api.ListAndWatchResponse) == message


def test_message_of_another_type_is_refused() -> None:
    """A message that is neither bytes nor the declared type is refused, as grpclib's codec does."""
    with pytest.raises(TypeError):
        PrecodedCodec().encode(api.Empty(), api.DevicePluginOptions)


CONTAINERS = [
    api.ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": "GPU-1,GPU-0", "A": "1"},
        mounts=[api.Mount(container_path="/c", host_path="/h", read_only=True)],
        devices=[api.DeviceSpec(container_path="/dev/nvidia0", host_path="/dev/nvidia0", permissions="rw")],
        annotations={"example.com/gpu": "GPU-1"},
        cdi_devices=[api.CdiDevice(name="example.com/gpu=GPU-1")],
    ),
    api.ContainerAllocateResponse(),
    api.ContainerAllocateResponse(envs={"X": "y" * 300}),
]


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_repeated_field_decodes_as_allocate_response(count: int) -> None:
    """repeated_field(1, encoded containers) decodes as an AllocateResponse with those containers, empty ones too."""
    containers = CONTAINERS[:count]
    wire = repeated_field(1, [bytes(c) for c in containers])
    assert api.AllocateResponse.parse(wire) == api.AllocateResponse(container_responses=containers)
    assert wire == bytes(api.AllocateResponse(container_responses=containers))


def test_repeated_field_uses_the_field_number() -> None:
    """The tag carries the field number with wire type 2 (length-delimited)."""
    assert repeated_field(1, [b"ab"]) == b"\x0a\x02ab"
    assert repeated_field(20, [b""]) == b"\xa2\x01\x00"


@given(st.lists(st.lists(st.text(max_size=150), max_size=12), max_size=4))
def test_preferred_response_matches_betterproto(chosen: list[list[str]]) -> None:
    """encode_preferred_response is byte for byte betterproto2's PreferredAllocationResponse."""
    expected = bytes(
        api.PreferredAllocationResponse(
            container_responses=[api.ContainerPreferredAllocationResponse(device_i_ds=ids) for ids in chosen]
        )
    )
    assert encode_preferred_response([[i.encode() for i in ids] for ids in chosen]) == expected


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**32, b"\x80\x80\x80\x80\x10"),
    ],
)
def test_encode_varint(value: int, wire: bytes) -> None:
    """encode_varint writes protobuf's base-128 varint, least significant group first."""
    assert encode_varint(value) == wire


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_encode_varint_round_trips(value: int) -> None:
    """Any unsigned 64-bit value encodes to a varint that decodes back to it, using every byte."""
    wire = encode_varint(value)
    assert decode_varint(wire) == (value, len(wire))
    assert len(wire) == max(1, (value.bit_length() + 6) // 7)
