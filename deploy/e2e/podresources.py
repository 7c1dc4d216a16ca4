"""A client of the kubelet's pod-resources API (v1.PodResourcesLister), through grpcio.

Only what the end-to-end test reads: which devices each container holds (`List`) and which devices the kubelet
can hand out (`GetAllocatableResources`). The messages are decoded by hand from the wire format (field numbers of
k8s.io/kubelet/pkg/apis/podresources/v1/api.proto), so no generated code is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            yield number, data[pos : pos + size]
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} at {pos}")


@dataclass
class ContainerDevices:
    """Devices of one resource."""

    resource: str = ""
    ids: list[str] = field(default_factory=list)


@dataclass
class Container:
    """A container's devices."""

    name: str = ""
    devices: list[ContainerDevices] = field(default_factory=list)


@dataclass
class Pod:
    """A pod's containers' devices."""

    name: str = ""
    namespace: str = ""
    containers: list[Container] = field(default_factory=list)


def _devices(data: bytes) -> ContainerDevices:
    out = ContainerDevices()
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            out.resource = value.decode()
        elif number == 2 and isinstance(value, bytes):
            out.ids.append(value.decode())
    return out


def _container(data: bytes) -> Container:
    out = Container()
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            out.name = value.decode()
        elif number == 2 and isinstance(value, bytes):
            out.devices.append(_devices(value))
    return out


def _pod(data: bytes) -> Pod:
    out = Pod()
    for number, value in fields(data):
        if number == 1 and isinstance(value, bytes):
            out.name = value.decode()
        elif number == 2 and isinstance(value, bytes):
            out.namespace = value.decode()
        elif number == 3 and isinstance(value, bytes):
            out.containers.append(_container(value))
    return out


def _call(method: str, socket: str, timeout: float) -> bytes:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = channel.unary_unary(f"/v1.PodResourcesLister/{method}")
        reply = stub(b"", timeout=timeout)
    assert isinstance(reply, bytes)
    return reply


def list_pods(socket: str = SOCKET, timeout: float = 5) -> list[Pod]:
    """`List`: every pod's containers and the devices they hold."""
    return [_pod(v) for n, v in fields(_call("List", socket, timeout)) if n == 1 and isinstance(v, bytes)]


def allocatable(socket: str = SOCKET, timeout: float = 5) -> dict[str, list[str]]:
    """`GetAllocatableResources`: device IDs by resource name."""
    out: dict[str, list[str]] = {}
    for number, value in fields(_call("GetAllocatableResources", socket, timeout)):
        if number == 1 and isinstance(value, bytes):
            dev = _devices(value)
            out.setdefault(dev.resource, []).extend(dev.ids)
    return out
