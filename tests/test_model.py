"""The device model: validation as the kubelet applies it, the tree's lookups, and merging container specs."""

from __future__ import annotations

import dataclasses

import pytest

from gpuplugin.core.model import (
    MAX_DEVICE_ID_LENGTH,
    ContainerSpec,
    Device,
    DeviceNode,
    DeviceTree,
    Link,
    Mount,
    PCIeLevel,
    SpecConflict,
    frozen_mapping,
    links_from_pairs,
    merge_specs,
)
from tests.fakes import GPU_RESOURCE, SHARED_RESOURCE, gpu_tree


def device(id: str = "GPU-0", resource: str = GPU_RESOURCE, gpu: str | None = None) -> Device:
    return Device(id=id, resource=resource, gpu=gpu or id, spec=ContainerSpec())


def test_device_id_of_63_characters_is_accepted() -> None:
    """A device ID of exactly 63 characters, the kubelet's limit, is accepted."""
    assert MAX_DEVICE_ID_LENGTH == 63
    assert device("x" * 63).id == "x" * 63


@pytest.mark.parametrize("bad_id", ["", "x" * 64, "GPU-" + "0" * 60])
def test_device_id_empty_or_longer_than_63_is_rejected(bad_id: str) -> None:
    """An empty device ID, or one longer than 63 characters, is rejected naming the ID."""
    with pytest.raises(ValueError, match="63"):
        device(bad_id)


@pytest.mark.parametrize(
    "resource",
    ["nvidia.com/gpu", "nvidia.com/mig-1g.18gb", "nvidia.com/gpu.shared", "example.com/a", "x/y", "a-b.c-d/e_f-g.h"],
)
def test_extended_resource_names_are_accepted(resource: str) -> None:
    """Extended resource names (domain/name outside kubernetes.io) are accepted."""
    assert device(resource=resource).resource == resource


@pytest.mark.parametrize(
    "resource",
    [
        "gpu",
        "",
        "/gpu",
        "nvidia.com/",
        "nvidia.com/gpu/extra",
        "nvidia.com/-gpu",
        "nvidia.com/gpu-",
        "-nvidia.com/gpu",
        "nvidia.com/g pu",
        "kubernetes.io/gpu",
        "gpu.kubernetes.io/gpu",
        "node.kubernetes.io/gpu",
    ],
)
def test_non_extended_resource_names_are_rejected(resource: str) -> None:
    """Names without a domain, malformed ones and those in the kubernetes.io domain are rejected."""
    with pytest.raises(ValueError, match="extended resource"):
        device(resource=resource)


@pytest.mark.parametrize("resource", ["NVIDIA.com/gpu", "nvidia_corp.com/gpu", "nvidia.com/" + "g" * 64])
def test_names_the_kubelet_refuses_are_rejected(resource: str) -> None:
    """Names the kubelet refuses (uppercase or underscore in the domain, name over 63 characters) are rejected."""
    with pytest.raises(ValueError, match="extended resource"):
        device(resource=resource)


def test_device_is_frozen() -> None:
    """A device cannot be changed in place."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        device().id = "GPU-1"  # type: ignore[misc]


def test_tree_rejects_duplicate_ids_within_a_resource() -> None:
    """A tree with one ID twice under one resource is rejected naming the ID and resource."""
    with pytest.raises(ValueError, match=r"'GPU-1' appears twice under example\.com/gpu"):
        DeviceTree(devices=(device("GPU-0"), device("GPU-1"), device("GPU-1")))


def test_tree_allows_one_id_under_two_resources() -> None:
    """The same ID under two resource names is two devices, not a duplicate."""
    tree = DeviceTree(devices=(device("GPU-0"), device("GPU-0", SHARED_RESOURCE)))
    assert tree.resources == (GPU_RESOURCE, SHARED_RESOURCE)


def test_by_resource_groups_in_first_seen_order() -> None:
    """by_resource groups devices per resource, resources and devices in tree order."""
    devices = (
        device("b", SHARED_RESOURCE),
        device("GPU-1"),
        device("a", SHARED_RESOURCE),
        device("GPU-0"),
    )
    grouped = DeviceTree(devices=devices).by_resource()
    assert list(grouped) == [SHARED_RESOURCE, GPU_RESOURCE]
    assert [d.id for d in grouped[SHARED_RESOURCE]] == ["b", "a"]
    assert [d.id for d in grouped[GPU_RESOURCE]] == ["GPU-1", "GPU-0"]
    assert DeviceTree(devices=devices).of(GPU_RESOURCE) == grouped[GPU_RESOURCE]
    assert DeviceTree().by_resource() == {}


def test_gpus_lists_physical_gpus_once_in_first_seen_order() -> None:
    """gpus lists each physical GPU once, replicas and partitions folded onto their GPU."""
    tree = gpu_tree(3, replicas=2)
    assert tree.gpus() == ("GPU-0", "GPU-1", "GPU-2")
    replicas_first = DeviceTree(devices=(device("GPU-1::0", SHARED_RESOURCE, "GPU-1"), device("GPU-0")))
    assert replicas_first.gpus() == ("GPU-1", "GPU-0")


def test_link_is_symmetric_and_defaults_to_no_link() -> None:
    """link finds a pair in either order; an unknown pair is Link() (no NVLink, across the system)."""
    nvlink = Link(nvlinks=4, pcie=PCIeLevel.SINGLE)
    tree = DeviceTree(
        devices=(device("GPU-0"), device("GPU-1"), device("GPU-2")),
        links=links_from_pairs([("GPU-0", "GPU-1", nvlink), ("GPU-2", "GPU-2", Link(nvlinks=9))]),
    )
    assert tree.link("GPU-0", "GPU-1") == nvlink
    assert tree.link("GPU-1", "GPU-0") == nvlink
    assert tree.link("GPU-0", "GPU-2") == Link(nvlinks=0, pcie=PCIeLevel.SYSTEM)
    assert tree.link("GPU-2", "GPU-2") == Link()
    assert len(tree.links) == 1


def test_gpu_tree_helper_links() -> None:
    """The test tree pairs GPUs by NVLink and puts the rest on PCIe by NUMA node."""
    tree = gpu_tree(4)
    assert tree.link("GPU-0", "GPU-1").nvlinks == 2
    assert tree.link("GPU-2", "GPU-3").nvlinks == 2
    assert tree.link("GPU-1", "GPU-2") == Link(pcie=PCIeLevel.SYSTEM)
    assert [d.numa_node for d in tree.devices] == [0, 0, 1, 1]


def spec(
    env: dict[str, str] | None = None,
    list_env: dict[str, str] | None = None,
    nodes: tuple[DeviceNode, ...] = (),
    mounts: tuple[Mount, ...] = (),
    annotations: dict[str, str] | None = None,
    cdi: tuple[str, ...] = (),
) -> ContainerSpec:
    return ContainerSpec(
        env=frozen_mapping(env or {}),
        list_env=frozen_mapping(list_env or {}),
        device_nodes=nodes,
        mounts=mounts,
        annotations=frozen_mapping(annotations or {}),
        cdi_devices=cdi,
    )


def test_merge_joins_list_env_in_order_without_duplicates() -> None:
    """List variables are joined with commas in device order, each value once."""
    merged = merge_specs(
        [
            spec(list_env={"NVIDIA_VISIBLE_DEVICES": "GPU-2", "EXTRA": "a"}),
            spec(list_env={"NVIDIA_VISIBLE_DEVICES": "GPU-0"}),
            spec(list_env={"NVIDIA_VISIBLE_DEVICES": "GPU-2", "EXTRA": "b"}),
        ]
    )
    assert dict(merged.list_env) == {"NVIDIA_VISIBLE_DEVICES": "GPU-2,GPU-0", "EXTRA": "a,b"}


def test_merge_lists_shared_nodes_and_mounts_once() -> None:
    """Device nodes and mounts shared by several devices appear once, in first-seen order."""
    ctl = DeviceNode("/dev/nvidiactl", "/dev/nvidiactl")
    libs = Mount("/usr/lib/nvidia", "/usr/local/nvidia")
    merged = merge_specs(
        [
            spec(nodes=(DeviceNode("/dev/nvidia1", "/dev/nvidia1"), ctl), mounts=(libs,), cdi=("v.com/gpu=1",)),
            spec(nodes=(DeviceNode("/dev/nvidia0", "/dev/nvidia0"), ctl), mounts=(libs,), cdi=("v.com/gpu=0",)),
            spec(nodes=(ctl,), mounts=(libs,), cdi=("v.com/gpu=1",)),
        ]
    )
    assert [n.container_path for n in merged.device_nodes] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia0"]
    assert merged.mounts == (libs,)
    assert merged.cdi_devices == ("v.com/gpu=1", "v.com/gpu=0")


def test_merge_keeps_agreeing_env_and_annotations() -> None:
    """Plain variables and annotations that devices agree on are kept once."""
    merged = merge_specs(
        [
            spec(env={"A": "1"}, annotations={"k": "v", "x": "1"}),
            spec(env={"A": "1", "B": "2"}, annotations={"k": "v"}),
        ]
    )
    assert dict(merged.env) == {"A": "1", "B": "2"}
    assert dict(merged.annotations) == {"k": "v", "x": "1"}


def test_merge_conflicting_env_is_a_spec_conflict() -> None:
    """Two devices setting one variable to different values is a SpecConflict naming the variable."""
    with pytest.raises(SpecConflict, match="CUDA_MPS_PIPE_DIRECTORY"):
        merge_specs([spec(env={"CUDA_MPS_PIPE_DIRECTORY": "/a"}), spec(env={"CUDA_MPS_PIPE_DIRECTORY": "/b"})])


def test_merge_conflicting_annotation_is_a_spec_conflict() -> None:
    """Two devices setting one annotation to different values is a SpecConflict naming it."""
    with pytest.raises(SpecConflict, match=r"example\.com/mode"):
        merge_specs([spec(annotations={"example.com/mode": "a"}), spec(annotations={"example.com/mode": "b"})])


def test_merge_of_nothing_is_empty_and_results_are_read_only() -> None:
    """Merging no specs gives an empty spec; merged mappings cannot be changed."""
    assert merge_specs([]) == ContainerSpec()
    merged = merge_specs([spec(env={"A": "1"})])
    with pytest.raises(TypeError):
        merged.env["A"] = "2"  # type: ignore[index]


def test_merge_joins_list_annotations_in_order_without_duplicates() -> None:
    """List annotations are joined with commas in device order, each value once."""
    merged = merge_specs(
        [
            ContainerSpec(list_annotations=frozen_mapping({"cdi.k8s.io/gpu": "v.com/gpu=1"})),
            ContainerSpec(list_annotations=frozen_mapping({"cdi.k8s.io/gpu": "v.com/gpu=0"})),
            ContainerSpec(list_annotations=frozen_mapping({"cdi.k8s.io/gpu": "v.com/gpu=1"})),
        ]
    )
    assert dict(merged.list_annotations) == {"cdi.k8s.io/gpu": "v.com/gpu=1,v.com/gpu=0"}
