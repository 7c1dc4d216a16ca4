"""The proto keeps the kubelet's v1beta1 contract, and the committed generated code matches it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.kubelet.protogen import PROTO_DIR, PROTO_FILES, ROOT, generate

COMMITTED = ROOT / "gpuplugin" / "kubelet" / "api"

#: Every message of the contract (docs/kubelet-contract.md): field name → (number, type).
MESSAGES: Mapping[str, Mapping[str, tuple[int, str]]] = {
    "RegisterRequest": {
        "version": (1, "string"),
        "endpoint": (2, "string"),
        "resource_name": (3, "string"),
        "options": (4, ".v1beta1.DevicePluginOptions"),
    },
    "DevicePluginOptions": {"pre_start_required": (1, "bool"), "get_preferred_allocation_available": (2, "bool")},
    "Empty": {},
    "ListAndWatchResponse": {"devices": (1, "repeated .v1beta1.Device")},
    "Device": {"ID": (1, "string"), "health": (2, "string"), "topology": (3, ".v1beta1.TopologyInfo")},
    "TopologyInfo": {"nodes": (1, "repeated .v1beta1.NUMANode")},
    "NUMANode": {"ID": (1, "int64")},
    "PreferredAllocationRequest": {"container_requests": (1, "repeated .v1beta1.ContainerPreferredAllocationRequest")},
    "ContainerPreferredAllocationRequest": {
        "available_deviceIDs": (1, "repeated string"),
        "must_include_deviceIDs": (2, "repeated string"),
        "allocation_size": (3, "int32"),
    },
    "PreferredAllocationResponse": {
        "container_responses": (1, "repeated .v1beta1.ContainerPreferredAllocationResponse")
    },
    "ContainerPreferredAllocationResponse": {"deviceIDs": (1, "repeated string")},
    "AllocateRequest": {"container_requests": (1, "repeated .v1beta1.ContainerAllocateRequest")},
    "ContainerAllocateRequest": {"devices_ids": (1, "repeated string")},
    "AllocateResponse": {"container_responses": (1, "repeated .v1beta1.ContainerAllocateResponse")},
    "ContainerAllocateResponse": {
        "envs": (1, "map<string, string>"),
        "mounts": (2, "repeated .v1beta1.Mount"),
        "devices": (3, "repeated .v1beta1.DeviceSpec"),
        "annotations": (4, "map<string, string>"),
        "cdi_devices": (5, "repeated .v1beta1.CDIDevice"),
    },
    "Mount": {"container_path": (1, "string"), "host_path": (2, "string"), "read_only": (3, "bool")},
    "DeviceSpec": {"container_path": (1, "string"), "host_path": (2, "string"), "permissions": (3, "string")},
    "CDIDevice": {"name": (1, "string")},
    "PreStartContainerRequest": {"devices_ids": (1, "repeated string")},
    "PreStartContainerResponse": {},
}

#: Every service and method: name → (request, response, server streaming).
SERVICES: Mapping[str, Mapping[str, tuple[str, str, bool]]] = {
    "Registration": {"Register": ("RegisterRequest", "Empty", False)},
    "DevicePlugin": {
        "GetDevicePluginOptions": ("Empty", "DevicePluginOptions", False),
        "ListAndWatch": ("Empty", "ListAndWatchResponse", True),
        "GetPreferredAllocation": ("PreferredAllocationRequest", "PreferredAllocationResponse", False),
        "Allocate": ("AllocateRequest", "AllocateResponse", False),
        "PreStartContainer": ("PreStartContainerRequest", "PreStartContainerResponse", False),
    },
}


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_current(tmp_path: Path) -> None:
    """Regenerating the code from proto/ gives the committed gpuplugin/kubelet/api byte for byte."""
    generate(tmp_path / "api")
    fresh, committed = files_under(tmp_path / "api"), files_under(COMMITTED)
    assert sorted(fresh) == sorted(committed), (
        "gpuplugin/kubelet/api has other files than proto/ generates: run `make proto`"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"gpuplugin/kubelet/api is stale ({', '.join(stale)}): run `make proto`"


@pytest.fixture(scope="module")
def proto_file(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """proto/v1beta1/api.proto compiled by protoc, as a FileDescriptorProto."""
    descriptor_pb2: Any = importlib.import_module("google.protobuf.descriptor_pb2")
    out = tmp_path_factory.mktemp("descriptors") / "api.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", *PROTO_FILES],
        check=True,
        capture_output=True,
    )
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


def describe(field: Any, message: Any) -> str:
    """A field's type as the proto spells it (``repeated string``, ``map<string, string>``, ``.v1beta1.Device``)."""
    descriptor_pb2: Any = importlib.import_module("google.protobuf.descriptor_pb2")
    fdp = descriptor_pb2.FieldDescriptorProto
    if field.type == fdp.TYPE_MESSAGE:
        entry = next((n for n in message.nested_type if f"{n.name}" == field.type_name.rsplit(".", 1)[-1]), None)
        if entry is not None and entry.options.map_entry:
            key, value = (describe(f, entry) for f in entry.field)
            return f"map<{key}, {value}>"
        kind = field.type_name
    else:
        kind = fdp.Type.Name(field.type).removeprefix("TYPE_").lower()
    return f"repeated {kind}" if field.label == fdp.LABEL_REPEATED else kind


def test_package_and_syntax(proto_file: Any) -> None:
    """The proto is proto3 in package v1beta1, so method paths are /v1beta1.<Service>/<Method>."""
    assert proto_file.syntax == "proto3"
    assert proto_file.package == "v1beta1"
    assert not proto_file.dependency


def test_services_and_methods(proto_file: Any) -> None:
    """Registration and DevicePlugin have exactly the contract's methods, types and streaming."""
    services = {
        s.name: {
            m.name: (
                m.input_type.removeprefix(".v1beta1."),
                m.output_type.removeprefix(".v1beta1."),
                m.server_streaming,
            )
            for m in s.method
        }
        for s in proto_file.service
    }
    assert services == SERVICES
    assert not any(m.client_streaming for s in proto_file.service for m in s.method)


def test_message_names(proto_file: Any) -> None:
    """The proto defines exactly the contract's messages."""
    assert sorted(m.name for m in proto_file.message_type) == sorted(MESSAGES)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_fields(proto_file: Any, name: str) -> None:
    """Each message has exactly the contract's field names, numbers and types."""
    (message,) = [m for m in proto_file.message_type if m.name == name]
    fields = {f.name: (f.number, describe(f, message)) for f in message.field}
    assert fields == MESSAGES[name]
    assert not any(f.proto3_optional for f in message.field)
