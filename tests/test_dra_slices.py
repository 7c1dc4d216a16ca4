"""The pure parts of the DRA driver: ResourceSlices built from device trees, device names, allocation results
read from ResourceClaim objects, and the checkpoint's file format."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.backends.nvml.discovery import discover
from gpuplugin.backends.nvml.fake import FakeGpu, FakeNvml
from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.core.model import ContainerSpec, Device, DeviceTree, frozen_mapping
from gpuplugin.dra.checkpoint import CheckpointCorrupt, PreparedClaim, decode, encode
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef, ClaimUnavailable, allocated_devices
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import MAX_NAME_LENGTH, device_names, label_of
from gpuplugin.dra.slices import MAX_DEVICES_PER_SLICE, build_slices, device_attributes, semver
from tests.test_deploy import validate

SETTINGS = DriverSettings(node_name="node-a")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def mock_tree(gpus: int = 2, unhealthy: tuple[int, ...] = ()) -> DeviceTree:
    return Inventory.build(MockSettings(gpus=gpus, nvlink_groups=(), pcie_switches=())).tree(range(gpus), unhealthy)


def devices_of(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [device for s in slices for device in s["spec"]["devices"]]


def partition(parent: Device, gi: int) -> Device:
    return Device(
        id=f"MIG-0000000{gi}-aaaa-bbbb-cccc-dddddddddddd",
        resource="nvidia.com/mig-1g.18gb",
        gpu=parent.gpu,
        spec=ContainerSpec(),
        numa_node=parent.numa_node,
        instance=(gi, 0),
        attributes=frozen_mapping(
            {"profile": "1g.18gb", "parent_uuid": parent.id, "parent_index": "0", "memory_mib": "16384"}
        ),
    )


def test_mock_gpus_become_a_valid_v1_slice_of_the_nodes_pool() -> None:
    """Two mock GPUs: one resource.k8s.io/v1 slice the API's models accept, in the node's pool at the generation."""
    tree = mock_tree()
    (slice_,) = build_slices(tree, SETTINGS, generation=3, owner={"name": "node-a", "uid": "u-1"})
    validate(slice_)
    spec = slice_["spec"]
    assert (spec["driver"], spec["nodeName"]) == ("gpu.gpuplugin.dev", "node-a")
    assert spec["pool"] == {"name": "node-a", "generation": 3, "resourceSliceCount": 1}
    assert slice_["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    first = spec["devices"][0]
    assert first["name"] == tree.devices[0].id.lower()
    assert first["attributes"] == {
        "type": {"string": "gpu"},
        "uuid": {"string": tree.devices[0].id},
        "productName": {"string": "NVIDIA H200"},
        "index": {"int": 0},
        "pciBusID": {"string": "00000000:10:00.0"},
        "numaNode": {"int": 0},
    }
    assert first["capacity"] == {"memory": {"value": "143771Mi"}}


def test_nvml_attributes_are_typed_and_versions_are_semver() -> None:
    """Minor is an int; driver, CUDA and compute capability versions become semver for CEL comparisons."""
    gpu = Device(
        id="GPU-1",
        resource="nvidia.com/gpu",
        gpu="GPU-1",
        spec=ContainerSpec(),
        attributes=frozen_mapping(
            {
                "uuid": "GPU-1",
                "minor": "3",
                "driver_version": "550.54.15",
                "cuda_version": "12.4",
                "compute_capability": "9.0",
                "error": "ignored",
            }
        ),
    )
    attributes = build_slices(DeviceTree((gpu,)), SETTINGS, 1)[0]["spec"]["devices"][0]["attributes"]
    assert attributes["minor"] == {"int": 3}
    assert attributes["driverVersion"] == {"version": "550.54.15"}
    assert attributes["cudaVersion"] == {"version": "12.4.0"}
    assert attributes["computeCapability"] == {"version": "9.0.0"}
    assert "error" not in attributes


def test_partitions_are_devices_of_their_own_with_profile_and_parent() -> None:
    """A MIG partition is a device of its own: type partition, its profile, its parent, its own memory."""
    gpu = mock_tree(1).devices[0]
    tree = DeviceTree((gpu, partition(gpu, 1), partition(gpu, 2)))
    (slice_,) = build_slices(tree, SETTINGS, 1)
    validate(slice_)
    parts = slice_["spec"]["devices"][1:]
    assert len(parts) == 2
    for part in parts:
        assert part["attributes"]["type"] == {"string": "partition"}
        assert part["attributes"]["profile"] == {"string": "1g.18gb"}
        assert part["attributes"]["parentUUID"] == {"string": gpu.id}
        assert part["attributes"]["parentIndex"] == {"int": 0}
        assert "uuid" not in part["attributes"]
        assert part["capacity"] == {"memory": {"value": "16384Mi"}}


def test_unhealthy_devices_leave_the_slice() -> None:
    """An unhealthy GPU is not published, so nothing new is allocated on it; a node with none left has an empty
    slice, keeping its pool known."""
    tree = mock_tree(2, unhealthy=(1,))
    assert [d["name"] for d in devices_of(build_slices(tree, SETTINGS, 1))] == [tree.devices[0].id.lower()]
    (empty,) = build_slices(mock_tree(1, unhealthy=(0,)), SETTINGS, 2)
    validate(empty)
    assert empty["spec"]["devices"] == []


def test_more_than_128_devices_are_split_over_slices_of_one_pool() -> None:
    """130 devices: two slices, both saying the pool has two, with distinct names and every device once."""
    tree = mock_tree(MAX_DEVICES_PER_SLICE + 2)
    slices = build_slices(tree, SETTINGS, 1)
    assert [len(s["spec"]["devices"]) for s in slices] == [MAX_DEVICES_PER_SLICE, 2]
    assert {s["spec"]["pool"]["resourceSliceCount"] for s in slices} == {2}
    assert len({s["metadata"]["name"] for s in slices}) == 2
    assert len({d["name"] for d in devices_of(slices)}) == len(tree.devices)


@pytest.mark.parametrize(
    "device_id", ["GPU-6f0c1b7e-4a51-5c1e-9a3e-2f6d1c0b8a47", "0", "3:1", "MIG-x/y", "a" * 63, "_"]
)
def test_device_names_are_dns_labels_stable_per_id(device_id: str) -> None:
    """Any device ID gives a DNS label of at most 63 characters, the same every time."""
    name = label_of(device_id)
    assert DNS_LABEL.match(name) and len(name) <= MAX_NAME_LENGTH
    assert label_of(device_id) == name


def test_ids_that_would_clash_as_labels_get_distinct_names() -> None:
    """IDs that differ only in characters a label cannot hold keep distinct names (a hash suffix)."""
    assert label_of("3:1") != label_of("3/1")
    gpu = mock_tree(1).devices[0]
    assert list(device_names(DeviceTree((gpu,)))) == [gpu.id.lower()]


def test_versions_that_are_not_numbers_are_left_out() -> None:
    """``semver`` pads dotted numbers and refuses anything else."""
    assert (semver("12"), semver("535.104.05"), semver("r535")) == ("12.0.0", "535.104.5", None)


def resource_claim(uid: str, results: Any) -> dict[str, Any]:
    return {"metadata": {"uid": uid}, "status": {"allocation": {"devices": {"results": results}}}}


def test_allocation_results_of_our_driver_are_read_from_the_claim() -> None:
    """Results of other drivers are skipped; ours keep their request, pool and device."""
    claim = ClaimRef("ns", "c", "u-1")
    results = [
        {"request": "gpu", "driver": "gpu.gpuplugin.dev", "pool": "node-a", "device": "gpu-0"},
        {"request": "nic", "driver": "nic.example.com", "pool": "node-a", "device": "eth0"},
    ]
    assert allocated_devices(resource_claim("u-1", results), claim, "gpu.gpuplugin.dev") == (
        AllocatedDevice("gpu", "node-a", "gpu-0"),
    )


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (resource_claim("u-2", []), "has UID 'u-2', not 'u-1'"),
        ({"metadata": {"uid": "u-1"}, "status": {}}, "is not allocated"),
        (resource_claim("u-1", [{"driver": "gpu.gpuplugin.dev", "pool": 1}]), "malformed allocation result"),
    ],
)
def test_claims_of_another_uid_or_unallocated_are_unavailable(obj: dict[str, Any], message: str) -> None:
    """A recreated claim, one not allocated yet, or a malformed result raises ClaimUnavailable saying which."""
    with pytest.raises(ClaimUnavailable, match=re.escape(message)):
        allocated_devices(obj, ClaimRef("ns", "c", "u-1"), "gpu.gpuplugin.dev")


def test_checkpoint_round_trips_and_names_the_file_when_corrupt(tmp_path: Path) -> None:
    """What is encoded decodes to the same claims; broken content raises CheckpointCorrupt naming the file."""
    claims = {"u-1": PreparedClaim(ClaimRef("ns", "c", "u-1"), (AllocatedDevice("gpu", "node-a", "gpu-0"),))}
    path = tmp_path / "checkpoint.json"
    assert decode(encode(claims), path) == claims
    for broken in (b"{", b'{"version": 2, "claims": {}}', b'{"version": 1, "claims": {"u": {"name": 1}}}'):
        with pytest.raises(CheckpointCorrupt, match=re.escape(str(path))):
            decode(broken, path)


def test_driver_settings_refuse_names_kubernetes_would_refuse() -> None:
    """A node or driver name that is no DNS subdomain is refused with the field named."""
    with pytest.raises(ValueError, match=r"dra.nodeName: must be a lowercase DNS subdomain"):
        DriverSettings(node_name="Node_A")
    with pytest.raises(ValueError, match=r"dra.driverName"):
        DriverSettings(node_name="n", driver_name="")


def test_ids_differing_only_in_case_keep_distinct_names() -> None:
    """``GPU-1`` and ``gpu-1`` in one tree both get hashed names, neither hides the other."""
    devices = tuple(
        Device(id=i, resource="nvidia.com/gpu", gpu=i, spec=ContainerSpec()) for i in ("GPU-1", "gpu-1", "gpu-2")
    )
    names = device_names(DeviceTree(devices))
    assert [d.id for d in names.values()] == ["GPU-1", "gpu-1", "gpu-2"]
    assert "gpu-2" in names and "gpu-1" not in names


_ID = st.text(alphabet=string.ascii_letters + string.digits + "-_:./", min_size=1, max_size=63)
TEXT = st.text(max_size=80)


@settings(max_examples=200, deadline=None, database=None)
@given(
    ids=st.lists(_ID, min_size=0, max_size=140, unique=True),
    values=st.dictionaries(st.sampled_from(["model", "index", "minor", "memory_mib", "cuda_version", "profile"]), TEXT),
    numa=st.none() | st.integers(-1, 7),
)
def test_any_tree_gives_slices_the_api_accepts(ids: list[str], values: dict[str, str], numa: int | None) -> None:
    """Any device IDs and attribute texts: unique DNS-label names, at most 128 devices a slice, every device once,
    string attributes within the API's 64 characters, and the API's models accept every slice."""
    devices = tuple(
        Device(
            id=i,
            resource="nvidia.com/gpu",
            gpu=i,
            spec=ContainerSpec(),
            numa_node=numa,
            attributes=frozen_mapping(values),
        )
        for i in ids
    )
    slices = build_slices(DeviceTree(devices), SETTINGS, 1)
    found = devices_of(slices)
    names = [d["name"] for d in found]
    assert len(names) == len(set(names)) == len(ids)
    assert all(DNS_LABEL.match(n) and len(n) <= MAX_NAME_LENGTH for n in names)
    assert all(len(s["spec"]["devices"]) <= MAX_DEVICES_PER_SLICE for s in slices)
    for device in found:
        for attribute in device["attributes"].values():
            assert len(attribute.get("string", "")) <= 64
    for slice_ in slices:
        validate(slice_)


def test_an_nvml_gpu_publishes_the_driver_and_cuda_versions_as_versions() -> None:
    """A GPU discovered through NVML carries ``driverVersion`` and ``cudaVersion`` as semver, which CEL compares."""
    fake = FakeNvml([FakeGpu("GPU-0", 0, "00000000:10:00.0")], driver_version="580.159.04", cuda_driver_version=13000)
    fake.nvmlInit()
    (device,) = discover(fake, NvmlSettings(sysfs_root="/nonexistent")).tree.devices
    attributes = device_attributes(device)
    assert attributes["driverVersion"] == {"version": "580.159.4"}
    assert attributes["cudaVersion"] == {"version": "13.0.0"}
