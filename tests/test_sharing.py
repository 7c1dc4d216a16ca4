"""Time-slicing replicas: the transform on its own, its config validation, and end to end through the kubelet."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from gpuplugin.core.errors import DevicesRefuseConfig
from gpuplugin.core.model import (
    AllocationPolicyKind,
    ContainerSpec,
    Device,
    DeviceNode,
    DeviceTree,
    Health,
    ResourceRules,
    frozen_mapping,
)
from gpuplugin.daemon.manager import TreeTransform
from gpuplugin.daemon.settings import ConfigError
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.testing.admission import AdmissionError

if TYPE_CHECKING:
    from tests.conftest import MockNodeFactory

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
PATH = "sharing.timeSlicing"


def gpu(index: int, *, resource: str = GPU, device_id: str | None = None) -> Device:
    uuid = device_id or f"GPU-{index:04d}"
    return Device(
        id=uuid,
        resource=resource,
        gpu=uuid,
        numa_node=index % 2,
        attributes=frozen_mapping({"index": str(index), "model": "H200"}),
        spec=ContainerSpec(
            list_env=frozen_mapping({"NVIDIA_VISIBLE_DEVICES": uuid}),
            device_nodes=(DeviceNode("/dev/null", f"/dev/nvidia{index}"),),
        ),
    )


def tree(*devices: Device, rules: Mapping[str, ResourceRules] | None = None) -> DeviceTree:
    return DeviceTree(devices=devices, rules=MappingProxyType(dict(rules or {})))


def sharing(**section: Any) -> TimeSlicing:
    return TimeSlicing.from_mapping(section, PATH)


def ids_of(t: DeviceTree, resource: str) -> list[str]:
    return [d.id for d in t.of(resource)]


# The transform.


def test_each_device_becomes_replicas_with_its_gpu_spec_and_attributes() -> None:
    """Every GPU becomes N replicas `<id>::<n>` keeping gpu, spec, NUMA node and attributes, plus the replica number."""
    original = tree(gpu(0), gpu(1))
    shared = sharing(resources=[{"name": GPU, "replicas": 3}]).apply(original)
    assert ids_of(shared, GPU) == [f"GPU-000{g}::{n}" for g in (0, 1) for n in range(3)]
    for device in shared.devices:
        source = original.devices[int(device.attributes["index"])]
        assert device.gpu == source.id
        assert device.spec == source.spec
        assert device.numa_node == source.numa_node
        assert device.attributes["model"] == "H200"
        assert device.attributes["replica"] == device.id.rsplit("::", 1)[1]


def test_health_and_instance_are_kept() -> None:
    """A replica inherits its GPU's discovered health and partition instance."""
    sick = Device(id="MIG-1", resource=GPU, gpu="GPU-0", spec=ContainerSpec(), health=Health.UNHEALTHY, instance=(1, 0))
    shared = sharing(resources=[{"name": GPU, "replicas": 2}]).apply(tree(sick))
    assert [(d.health, d.instance, d.gpu) for d in shared.devices] == [(Health.UNHEALTHY, (1, 0), "GPU-0")] * 2


def test_rename_by_default_serves_shared_name() -> None:
    """renameByDefault serves the replicas as `<name>.shared` and leaves nothing under the original name."""
    shared = sharing(renameByDefault=True, resources=[{"name": GPU, "replicas": 2}]).apply(tree(gpu(0)))
    assert shared.resources == (SHARED,)
    assert ids_of(shared, SHARED) == ["GPU-0000::0", "GPU-0000::1"]


def test_explicit_rename_wins_over_rename_by_default() -> None:
    """A resource's own `rename` is used even with renameByDefault."""
    config = sharing(renameByDefault=True, resources=[{"name": GPU, "replicas": 2, "rename": "example.com/slice"}])
    assert config.apply(tree(gpu(0))).resources == ("example.com/slice",)


def test_devices_selects_gpus_by_index_and_uuid_others_stay_whole() -> None:
    """Only GPUs named in `devices` (index or UUID) are replicated; the rest stay whole under the original name."""
    config = sharing(renameByDefault=True, resources=[{"name": GPU, "replicas": 2, "devices": [0, "GPU-0002"]}])
    shared = config.apply(tree(gpu(0), gpu(1), gpu(2)))
    assert ids_of(shared, GPU) == ["GPU-0001"]
    assert ids_of(shared, SHARED) == ["GPU-0000::0", "GPU-0000::1", "GPU-0002::0", "GPU-0002::1"]


def test_per_gpu_counts_override_replicas_and_one_means_unshared() -> None:
    """perGpu sets single GPUs' replica counts; a count of 1 leaves that GPU whole under the original name."""
    config = sharing(
        renameByDefault=True,
        resources=[{"name": GPU, "replicas": 2, "perGpu": {0: 1, "GPU-0002": 4}}],
    )
    shared = config.apply(tree(gpu(0), gpu(1), gpu(2)))
    assert ids_of(shared, GPU) == ["GPU-0000"]
    assert ids_of(shared, SHARED) == ["GPU-0001::0", "GPU-0001::1"] + [f"GPU-0002::{n}" for n in range(4)]


def test_per_gpu_uuid_entry_wins_over_index_entry() -> None:
    """When a GPU is named by both index and UUID in perGpu, the UUID's count applies."""
    config = sharing(resources=[{"name": GPU, "replicas": 2, "perGpu": {"0": 5, "GPU-0000": 3}}])
    assert len(config.apply(tree(gpu(0))).devices) == 3


def test_other_resources_untouched_and_their_rules_kept() -> None:
    """Devices and rules of resources not named are kept as they are."""
    mig = gpu(9, resource="nvidia.com/mig-1g.18gb", device_id="MIG-9")
    rules = {"nvidia.com/mig-1g.18gb": ResourceRules(max_devices_per_container=4)}
    shared = sharing(resources=[{"name": GPU, "replicas": 2}]).apply(tree(gpu(0), mig, rules=rules))
    assert shared.of("nvidia.com/mig-1g.18gb") == (mig,)
    assert shared.rules["nvidia.com/mig-1g.18gb"] == ResourceRules(max_devices_per_container=4)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        pytest.param({}, ResourceRules(AllocationPolicyKind.DISTRIBUTED, None), id="default"),
        pytest.param(
            {"failRequestsGreaterThanOne": True, "allocationPolicy": "packed"},
            ResourceRules(AllocationPolicyKind.PACKED, 1),
            id="packed-fail",
        ),
    ],
)
def test_rules_of_the_shared_resource(section: dict[str, Any], expected: ResourceRules) -> None:
    """The shared resource gets the chosen policy, and one device per container with failRequestsGreaterThanOne."""
    shared = sharing(renameByDefault=True, resources=[{"name": GPU, "replicas": 2}], **section).apply(tree(gpu(0)))
    assert shared.rules_of(SHARED) == expected


def test_per_resource_policy_overrides_default() -> None:
    """A resource's own allocationPolicy wins over the timeSlicing default."""
    config = sharing(resources=[{"name": GPU, "replicas": 2, "allocationPolicy": "packed"}])
    assert config.apply(tree(gpu(0))).rules_of(GPU).allocation_policy is AllocationPolicyKind.PACKED


def test_replica_id_over_63_characters_names_the_device() -> None:
    """A device whose replica ID would exceed 63 characters makes apply fail with an error naming it."""
    long_id = "GPU-" + "a" * 58
    with pytest.raises(DevicesRefuseConfig, match=long_id):
        sharing(resources=[{"name": GPU, "replicas": 2}]).apply(tree(gpu(0, device_id=long_id)))


@pytest.mark.parametrize("section", [None, {}, {"resources": []}])
def test_nothing_shared_returns_the_same_tree(section: dict[str, Any] | None) -> None:
    """An empty timeSlicing section serves the discovered tree unchanged."""
    original = tree(gpu(0))
    assert TimeSlicing.from_mapping(section, PATH).apply(original) is original


# Validation.

#: The start of the error for a replica count out of range; the value follows.
REPLICAS_RANGE = "resources[0].replicas: must be an integer from 2 to 24672 (what one resource's ListAndWatch message"
REPLICAS_RANGE += " holds), got"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"resources": [{"name": GPU, "replicas": 1}]},
            REPLICAS_RANGE + " 1",
        ),
        (
            {"resources": [{"name": GPU, "replicas": "4"}]},
            REPLICAS_RANGE + " '4'",
        ),
        ({"resources": [{"name": GPU, "replicas": True}]}, "resources[0].replicas: must be an integer from 2 to"),
        (
            {"resources": [{"name": GPU, "replicas": 24673}]},
            "resources[0].replicas: must be an integer from 2 to 24672",
        ),
        ({"resources": [{"name": GPU, "replicas": 10**8}]}, "resources[0].replicas: must be an integer from 2 to"),
        (
            {"resources": [{"name": GPU, "replicas": 2, "perGpu": {0: 24673}}]},
            "resources[0].perGpu.0: must be an integer from 1 to 24672 (1: that GPU is not shared), got 24673",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "devices": list(range(1025))}]},
            "resources[0].devices: has 1025 entries, at most 1024",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "perGpu": dict.fromkeys(range(1025), 2)}]},
            "resources[0].perGpu: has 1025 entries, at most 1024",
        ),
        (
            {"resources": [{"name": GPU}]},
            "resources[0].replicas: missing; it has no default",
        ),
        ({"resources": [{"name": "gpu", "replicas": 2}]}, "resources[0].name: must be an extended resource name"),
        ({"resources": [{"name": "kubernetes.io/gpu", "replicas": 2}]}, "resources[0].name: must be an extended"),
        (
            {"resources": [{"name": GPU, "replicas": 2, "rename": "bad name"}]},
            "resources[0].rename: must be an extended resource name (domain/name), got 'bad name'",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "rename": 7}]},
            "resources[0].rename: must be an extended resource name (domain/name), got 7",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "devices": "some"}]},
            "resources[0].devices: must be one of all (or a list of GPU indices and UUIDs), got 'some'",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "devices": [0, -1]}]},
            "resources[0].devices[1]: must be an integer at least 0 (a GPU's index, or its UUID), got -1",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "perGpu": {0: 0}}]},
            "resources[0].perGpu.0: must be an integer from 1 to 24672 (1: that GPU is not shared), got 0",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "perGpu": [1]}]},
            "resources[0].perGpu: expected mapping (replicas by GPU index or UUID), got [1]",
        ),
        (
            {"resources": [{"name": GPU, "replicas": 2, "perGpu": {-2: 2}}]},
            "resources[0].perGpu.-2: must be an integer at least 0 (a GPU's index, or its UUID), got -2",
        ),
        ({"resources": [{"name": GPU, "replicas": 2, "color": 1}]}, "resources[0].color: unknown setting"),
        ({"resources": [{"name": GPU, "replicas": 2}], "allocationPolicy": "topology"}, "allocationPolicy: must be"),
        ({"renameByDefault": "yes"}, "renameByDefault: must be true or false, got 'yes'"),
        ({"failRequestsGreaterThanOne": 1}, "failRequestsGreaterThanOne: must be true or false, got 1"),
        ({"resources": {"name": GPU}}, "resources: expected list, got {'name': 'nvidia.com/gpu'}"),
        ({"resources": ["nvidia.com/gpu"]}, "resources[0]: expected mapping, got 'nvidia.com/gpu'"),
        ({"replicas": 2}, f"{PATH}.replicas: unknown setting"),
        (
            {"resources": [{"name": GPU, "replicas": 2}, {"name": GPU, "replicas": 3}]},
            "resources[1].name: 'nvidia.com/gpu' is already shared by resources[0]",
        ),
        (
            {
                "resources": [
                    {"name": GPU, "replicas": 2, "rename": "a.com/x"},
                    {"name": "b.com/y", "replicas": 2, "rename": "a.com/x"},
                ]
            },
            "resources[1].rename: 'a.com/x' is already the name of resources[0]",
        ),
        (
            {"renameByDefault": True, "resources": [{"name": "a.com/" + "g" * 60, "replicas": 2}]},
            "resources[0].name: 'a.com/" + "g" * 60 + ".shared' is not an extended resource name",
        ),
    ],
)
def test_invalid_config_names_the_field(section: dict[str, Any], message: str) -> None:
    """Each invalid setting raises ConfigError whose message starts with the full path of the field."""
    with pytest.raises(ConfigError) as caught:
        TimeSlicing.from_mapping(section, PATH)
    text = str(caught.value)
    assert text.startswith((PATH + ".", PATH + ":"))
    assert message in text


def test_top_level_must_be_a_mapping() -> None:
    """A timeSlicing value that is not a mapping is refused naming the section."""
    with pytest.raises(ConfigError, match=r"^sharing\.timeSlicing: expected mapping, got \[\]$"):
        TimeSlicing.from_mapping([], PATH)


def test_nvidia_config_is_accepted_as_is() -> None:
    """A config written for NVIDIA's plugin (renameByDefault, failRequestsGreaterThanOne, devices) loads unchanged."""
    config = TimeSlicing.from_mapping(
        {
            "renameByDefault": False,
            "failRequestsGreaterThanOne": True,
            "resources": [{"name": GPU, "replicas": 10, "devices": "all"}],
        },
        PATH,
    )
    assert config.fail_requests_greater_than_one and config.resources[0].devices is None
    assert config.resources[0].replicas == 10 and config.served_name(config.resources[0]) == GPU


# End to end: the manager, the mock backend and the kubelet simulator over real unix sockets (conftest's mock_node).


def replicas(config: dict[str, Any]) -> list[TreeTransform]:
    return [TimeSlicing.from_mapping(config, PATH).apply]


async def test_replicas_registered_under_the_original_name(mock_node: MockNodeFactory) -> None:
    """Without rename, the kubelet sees every replica under nvidia.com/gpu."""
    async with mock_node(replicas({"resources": [{"name": GPU, "replicas": 3}]})) as n:
        gpus = n.gpus()
        assert sorted(n.kubelet.devices(GPU)) == sorted(f"{g}::{i}" for g in gpus for i in range(3))
        assert n.kubelet.allocatable(GPU) == 6


async def test_replicas_registered_under_the_renamed_name(mock_node: MockNodeFactory) -> None:
    """With renameByDefault the replicas register as nvidia.com/gpu.shared and unselected GPUs stay nvidia.com/gpu."""
    config = {"renameByDefault": True, "resources": [{"name": GPU, "replicas": 4, "devices": [1]}]}
    async with mock_node(replicas(config), resources=[GPU, SHARED]) as n:
        gpus = n.gpus()
        assert n.kubelet.devices(GPU) == {gpus[0]: "Healthy"}
        assert sorted(n.kubelet.devices(SHARED)) == [f"{gpus[1]}::{i}" for i in range(4)]


async def test_per_gpu_replica_counts(mock_node: MockNodeFactory) -> None:
    """perGpu gives each GPU its own replica count, served through the kubelet."""
    config = {"resources": [{"name": GPU, "replicas": 2, "perGpu": {0: 5}}]}
    async with mock_node(replicas(config)) as n:
        gpus = n.gpus()
        served = n.kubelet.devices(GPU)
        assert sum(1 for i in served if i.startswith(gpus[0])) == 5
        assert sum(1 for i in served if i.startswith(gpus[1])) == 2


async def test_two_replicas_of_one_gpu_name_it_once(mock_node: MockNodeFactory) -> None:
    """Allocate of two replicas of one GPU sets NVIDIA_VISIBLE_DEVICES to that GPU once, with its node once."""
    async with mock_node(replicas({"resources": [{"name": GPU, "replicas": 3}]})) as n:
        first = n.gpus()[0]
        response = await n.allocate(f"{first}::0", f"{first}::2")
        assert response.envs["NVIDIA_VISIBLE_DEVICES"] == first
        assert [d.container_path for d in response.devices] == ["/dev/nvidia0"]


async def test_fail_requests_greater_than_one_refuses_two_replicas(mock_node: MockNodeFactory) -> None:
    """With failRequestsGreaterThanOne, Allocate of two replicas fails INVALID_ARGUMENT and one replica works."""
    config = {"failRequestsGreaterThanOne": True, "resources": [{"name": GPU, "replicas": 2}]}
    async with mock_node(replicas(config)) as n:
        first = n.gpus()[0]
        with pytest.raises(GRPCError) as caught:
            await n.allocate(f"{first}::0", f"{first}::1")
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert "at most 1" in str(caught.value.message)
        with pytest.raises(AdmissionError):
            await n.kubelet.admit("two", [{GPU: 2}])
        one = await n.kubelet.admit("one", [{GPU: 1}])
        assert len(one.device_ids(GPU)) == 1


async def test_distributed_spreads_replicas_over_gpus(mock_node: MockNodeFactory) -> None:
    """With the distributed policy, admission spreads replicas over GPUs, least loaded first."""
    async with mock_node(replicas({"resources": [{"name": GPU, "replicas": 4}]})) as n:
        gpus = n.gpus()
        pair = await n.kubelet.admit("pair", [{GPU: 2}])
        assert sorted(i.split("::")[0] for i in pair.device_ids(GPU)) == sorted(gpus)
        singles = [await n.kubelet.admit(f"single-{k}", [{GPU: 1}]) for k in range(2)]
        assert sorted(s.device_ids(GPU)[0].split("::")[0] for s in singles) == sorted(gpus)


async def test_packed_fills_one_gpu_first(mock_node: MockNodeFactory) -> None:
    """With the packed policy, admission takes replicas of one GPU before touching the next."""
    config = {"allocationPolicy": "packed", "resources": [{"name": GPU, "replicas": 4}]}
    async with mock_node(replicas(config)) as n:
        pair = await n.kubelet.admit("pair", [{GPU: 2}])
        (packed_gpu,) = {i.split("::")[0] for i in pair.device_ids(GPU)}
        more = await n.kubelet.admit("more", [{GPU: 2}])
        assert {i.split("::")[0] for i in more.device_ids(GPU)} == {packed_gpu}


async def test_xid_marks_every_replica_of_the_gpu_unhealthy(mock_node: MockNodeFactory) -> None:
    """A fatal XID on one GPU turns all its replicas Unhealthy and leaves the other GPU's replicas Healthy."""
    async with mock_node(replicas({"resources": [{"name": GPU, "replicas": 3}]})) as n:
        gpus = n.gpus()
        n.backend.xid(1, 79)
        await n.kubelet.wait_for(lambda: n.kubelet.allocatable(GPU) == 3, timeout=2)
        health = n.kubelet.devices(GPU)
        assert {health[f"{gpus[1]}::{i}"] for i in range(3)} == {"Unhealthy"}
        assert {health[f"{gpus[0]}::{i}"] for i in range(3)} == {"Healthy"}
