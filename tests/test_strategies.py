"""Device-list strategies: each spec rewrite on its own, combined, validated, and in Allocate end to end."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest

from gpuplugin.core.model import ContainerSpec, Device, DeviceNode, DeviceTree, Mount, frozen_mapping, merge_specs
from gpuplugin.daemon.settings import ConfigError
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.devices.strategies import (
    CDI_EDITS_ATTRIBUTE,
    CDI_NAME_ATTRIBUTE,
    DeviceListStrategy,
    DeviceListStrategyKind,
    cdi_kind,
)
from gpuplugin.kubelet.api import v1beta1 as api

if TYPE_CHECKING:
    from tests.conftest import MockNodeFactory

GPU = "nvidia.com/gpu"
KIND = "k8s.device-plugin.nvidia.com/gpu"
KEY = "cdi.k8s.io/gpuplugin_nvidia.com_gpu"
ROOT = "/var/run/nvidia-container-devices"
PATH = "flags.plugin"
#: CDI's qualified device name: vendor (DNS subdomain) / class = device name (SPEC.md "Kind", "CDI Devices").
QUALIFIED = re.compile(
    r"^[a-z]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
    r"/[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?"
    r"=[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
)
#: A Kubernetes annotation key: an optional DNS-subdomain prefix and a name of at most 63 characters.
ANNOTATION_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(?P<name>[^/]+)$")
ANNOTATION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def gpu(index: int, *, runtime_id: str | None = None, resource: str = GPU) -> Device:
    uuid = f"GPU-{index:04d}"
    return Device(
        id=uuid,
        resource=resource,
        gpu=uuid,
        attributes=frozen_mapping({"index": str(index)}),
        spec=ContainerSpec(
            env=frozen_mapping({"NVIDIA_DRIVER_CAPABILITIES": "all"}),
            list_env=frozen_mapping({"NVIDIA_VISIBLE_DEVICES": runtime_id or uuid}),
            device_nodes=(
                DeviceNode("/dev/nvidia" + str(index), "/dev/nvidia" + str(index)),
                DeviceNode("/dev/nvidiactl", "/dev/nvidiactl"),
            ),
        ),
    )


def strategy(*kinds: str, **extra: Any) -> DeviceListStrategy:
    return DeviceListStrategy.from_mapping({"deviceListStrategy": list(kinds), **extra}, PATH)


def rewrite(device: Device, *kinds: str) -> ContainerSpec:
    return strategy(*kinds).apply(DeviceTree(devices=(device,))).devices[0].spec


def test_envvar_alone_leaves_the_tree_as_it_is() -> None:
    """The default strategy (envvar) serves the backend's specs unchanged."""
    original = DeviceTree(devices=(gpu(0),))
    assert DeviceListStrategy.from_mapping({}, PATH).apply(original) is original
    assert DeviceListStrategy().strategies == (DeviceListStrategyKind.ENVVAR,)


def test_volume_mounts_replace_the_list_with_one_mount_per_device() -> None:
    """volume-mounts sets NVIDIA_VISIBLE_DEVICES to the directory and mounts /dev/null as <root>/<id>."""
    spec = rewrite(gpu(0), "volume-mounts")
    assert dict(spec.env) == {"NVIDIA_DRIVER_CAPABILITIES": "all", "NVIDIA_VISIBLE_DEVICES": ROOT}
    assert "NVIDIA_VISIBLE_DEVICES" not in spec.list_env
    assert spec.mounts == (Mount("/dev/null", f"{ROOT}/GPU-0000", read_only=False),)
    assert spec.device_nodes == gpu(0).spec.device_nodes


def test_cdi_annotations_name_the_device_and_drop_list_and_nodes() -> None:
    """cdi-annotations alone puts `<kind>=<id>` in the resource's annotation and drops the variable and nodes."""
    spec = rewrite(gpu(0), "cdi-annotations")
    assert dict(spec.list_annotations) == {KEY: f"{KIND}=GPU-0000"}
    assert dict(spec.list_env) == {}
    assert spec.device_nodes == ()
    assert spec.cdi_devices == ()
    assert dict(spec.env) == {"NVIDIA_DRIVER_CAPABILITIES": "all"}


def test_cdi_cri_names_the_device_in_cdi_devices() -> None:
    """cdi-cri alone puts `<kind>=<id>` in cdi_devices and drops the variable and nodes."""
    spec = rewrite(gpu(0), "cdi-cri")
    assert spec.cdi_devices == (f"{KIND}=GPU-0000",)
    assert dict(spec.list_env) == {} and spec.device_nodes == () and dict(spec.list_annotations) == {}


def test_cdi_with_envvar_keeps_the_variable_and_nodes() -> None:
    """envvar with cdi-cri keeps NVIDIA_VISIBLE_DEVICES and the device nodes next to the CDI name."""
    spec = rewrite(gpu(0), "envvar", "cdi-cri")
    assert spec.list_env["NVIDIA_VISIBLE_DEVICES"] == "GPU-0000"
    assert spec.device_nodes == gpu(0).spec.device_nodes
    assert spec.cdi_devices == (f"{KIND}=GPU-0000",)


def test_volume_mounts_with_cdi_keep_nodes_as_nvidia_does() -> None:
    """volume-mounts with cdi-annotations mounts the device, names it in the annotation, and keeps the nodes."""
    spec = rewrite(gpu(0), "volume-mounts", "cdi-annotations")
    assert spec.env["NVIDIA_VISIBLE_DEVICES"] == ROOT
    assert [m.container_path for m in spec.mounts] == [f"{ROOT}/GPU-0000"]
    assert spec.list_annotations[KEY] == f"{KIND}=GPU-0000"
    assert spec.device_nodes == gpu(0).spec.device_nodes


def test_envvar_with_volume_mounts_gives_the_directory() -> None:
    """With envvar and volume-mounts, the variable is the mount directory, as NVIDIA's later write wins."""
    spec = rewrite(gpu(0), "envvar", "volume-mounts")
    merged = merge_specs([spec])
    assert {**merged.env, **merged.list_env}["NVIDIA_VISIBLE_DEVICES"] == ROOT


def test_runtime_id_comes_from_the_backend_variable() -> None:
    """Names and mounts use the ID the backend put in NVIDIA_VISIBLE_DEVICES (index strategy), not the device ID."""
    device = gpu(3, runtime_id="3")
    assert rewrite(device, "cdi-cri").cdi_devices == (f"{KIND}=3",)
    assert rewrite(device, "volume-mounts").mounts[0].container_path == f"{ROOT}/3"


def test_cdi_strategies_record_name_and_edits_for_the_spec_writer() -> None:
    """A CDI strategy records the CDI name and the backend's device nodes as the device's containerEdits."""
    device = strategy("cdi-cri").apply(DeviceTree(devices=(gpu(1),))).devices[0]
    assert device.attributes[CDI_NAME_ATTRIBUTE] == f"{KIND}=GPU-0001"
    assert json.loads(device.attributes[CDI_EDITS_ATTRIBUTE]) == {
        "deviceNodes": [
            {"path": "/dev/nvidia1", "hostPath": "/dev/nvidia1", "permissions": "rw"},
            {"path": "/dev/nvidiactl", "hostPath": "/dev/nvidiactl", "permissions": "rw"},
        ],
    }


def test_devices_join_in_one_annotation_and_replicas_once() -> None:
    """Several devices' CDI names join with commas in one annotation; replicas of one GPU appear once."""
    shared = TimeSlicing.from_mapping({"resources": [{"name": GPU, "replicas": 2}]}, "sharing.timeSlicing")
    served = strategy("cdi-annotations", "cdi-cri").apply(shared.apply(DeviceTree(devices=(gpu(0), gpu(1)))))
    merged = merge_specs(d.spec for d in served.devices)
    assert merged.list_annotations[KEY] == f"{KIND}=GPU-0000,{KIND}=GPU-0001"
    assert merged.cdi_devices == (f"{KIND}=GPU-0000", f"{KIND}=GPU-0001")


def test_a_spec_without_the_variable_is_left_alone() -> None:
    """A device whose spec names no GPU in NVIDIA_VISIBLE_DEVICES is not rewritten."""
    plain = Device(id="x0", resource="example.com/thing", gpu="x0", spec=ContainerSpec())
    assert strategy("cdi-cri", "volume-mounts").apply(DeviceTree(devices=(plain,))).devices == (plain,)


@pytest.mark.parametrize(
    ("resource", "vendor", "kind"),
    [
        (GPU, "k8s.device-plugin.nvidia.com", KIND),
        ("nvidia.com/mig-1g.18gb", "k8s.device-plugin.nvidia.com", "k8s.device-plugin.nvidia.com/mig-1g.18gb"),
        ("nvidia.com/gpu.shared", "example.com", "example.com/gpu.shared"),
        ("example.com/3d", "example.com", "example.com/r3d"),
    ],
)
def test_kind_is_vendor_and_resource_class(resource: str, vendor: str, kind: str) -> None:
    """The CDI kind is `<cdiVendor>/<resource name part>`, made a valid CDI class, and names are qualified."""
    assert cdi_kind(vendor, resource) == kind
    name = strategy("cdi-cri", cdiVendor=vendor).cdi_name(resource, "GPU-0000")
    assert name == f"{kind}=GPU-0000" and QUALIFIED.match(name)


@pytest.mark.parametrize(
    ("prefix", "resource"),
    [
        ("cdi.k8s.io/", GPU),
        ("nvidia.cdi.k8s.io/", "nvidia.com/mig-1g.18gb"),
        ("cdi.k8s.io/", "a-very-long-vendor-domain.example.com/" + "x" * 60),
    ],
)
def test_annotation_keys_are_valid_kubernetes_keys(prefix: str, resource: str) -> None:
    """Annotation keys start with cdiAnnotationPrefix and their name part is a valid, ≤ 63-character name."""
    key = strategy("cdi-annotations", cdiAnnotationPrefix=prefix).annotation_key(resource)
    assert key.startswith(prefix)
    match = ANNOTATION_KEY.match(key)
    assert match is not None
    assert len(match["name"]) <= 63 and ANNOTATION_NAME.match(match["name"])


def test_long_resource_names_keep_distinct_keys() -> None:
    """Two long resource names that share a prefix still get different annotation keys."""
    s = strategy("cdi-annotations")
    base = "example.com/" + "x" * 55
    assert s.annotation_key(base + "a") != s.annotation_key(base + "b")


def test_strategy_properties() -> None:
    """cdi_enabled is true with any CDI strategy; only_cdi only when every strategy is a CDI one."""
    assert not strategy("envvar", "volume-mounts").cdi_enabled
    assert strategy("envvar", "cdi-cri").cdi_enabled and not strategy("envvar", "cdi-cri").only_cdi
    assert strategy("cdi-cri", "cdi-annotations").only_cdi


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cdi-cri", ("cdi-cri",)),
        ("envvar,cdi-annotations", ("envvar", "cdi-annotations")),
        (["volume-mounts", "envvar", "volume-mounts"], ("volume-mounts", "envvar")),
    ],
)
def test_strategy_accepts_string_comma_list_and_list(value: Any, expected: tuple[str, ...]) -> None:
    """deviceListStrategy takes NVIDIA's forms: one name, a comma-separated string, or a list (deduplicated)."""
    parsed = DeviceListStrategy.from_mapping({"deviceListStrategy": value, "passDeviceSpecs": True}, PATH)
    assert parsed.strategies == tuple(DeviceListStrategyKind(e) for e in expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"deviceListStrategy": "cdi"}, "flags.plugin.deviceListStrategy: must be one of envvar, volume-mounts"),
        (
            {"deviceListStrategy": ["envvar", 3]},
            "flags.plugin.deviceListStrategy[1]: must be one of envvar, volume-mounts, cdi-annotations, cdi-cri, got 3",
        ),
        (
            {"deviceListStrategy": []},
            "flags.plugin.deviceListStrategy: expected list of length >= 1 (one, or a list of them), got []",
        ),
        (
            {"deviceListStrategy": {"a": 1}},
            "flags.plugin.deviceListStrategy: expected str | list, got {'a': 1}",
        ),
        ({"cdiAnnotationPrefix": "cdi.k8s.io"}, "flags.plugin.cdiAnnotationPrefix: must be a DNS subdomain"),
        ({"cdiAnnotationPrefix": "Bad_Prefix/"}, "flags.plugin.cdiAnnotationPrefix: must be a DNS subdomain"),
        ({"cdiVendor": "nvidia.com/gpu"}, "flags.plugin.cdiVendor: must be a DNS subdomain"),
        ({"cdiVendor": ""}, "flags.plugin.cdiVendor: must be a DNS subdomain"),
    ],
)
def test_invalid_settings_name_the_field(data: dict[str, Any], message: str) -> None:
    """Each invalid setting raises ConfigError whose message starts with the field's path."""
    with pytest.raises(ConfigError) as caught:
        DeviceListStrategy.from_mapping(data, PATH)
    assert str(caught.value).startswith(message)


def test_section_must_be_a_mapping() -> None:
    """A section that is not a mapping is refused naming it."""
    with pytest.raises(ConfigError, match=r"^flags\.plugin: expected mapping, got 'envvar'$"):
        DeviceListStrategy.from_mapping("envvar", PATH)


# End to end: the manager, the mock backend and the kubelet simulator over real unix sockets (conftest's mock_node).


def summary(response: api.ContainerAllocateResponse) -> dict[str, Any]:
    return {
        "envs": dict(response.envs),
        "mounts": [(m.host_path, m.container_path, m.read_only) for m in response.mounts],
        "devices": [(d.host_path, d.container_path, d.permissions) for d in response.devices],
        "annotations": dict(response.annotations),
        "cdi": [c.name for c in response.cdi_devices],
    }


NODES = [("/dev/null", "/dev/nvidia0", "rw"), ("/dev/null", "/dev/nvidia1", "rw")]


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        pytest.param(
            ["envvar"],
            lambda a, b: {
                "envs": {"NVIDIA_VISIBLE_DEVICES": f"{a},{b}"},
                "mounts": [],
                "devices": NODES,
                "annotations": {},
                "cdi": [],
            },
            id="envvar",
        ),
        pytest.param(
            ["volume-mounts"],
            lambda a, b: {
                "envs": {"NVIDIA_VISIBLE_DEVICES": ROOT},
                "mounts": [("/dev/null", f"{ROOT}/{a}", False), ("/dev/null", f"{ROOT}/{b}", False)],
                "devices": NODES,
                "annotations": {},
                "cdi": [],
            },
            id="volume-mounts",
        ),
        pytest.param(
            ["cdi-annotations"],
            lambda a, b: {
                "envs": {},
                "mounts": [],
                "devices": [],
                "annotations": {KEY: f"{KIND}={a},{KIND}={b}"},
                "cdi": [],
            },
            id="cdi-annotations",
        ),
        pytest.param(
            ["cdi-cri"],
            lambda a, b: {
                "envs": {},
                "mounts": [],
                "devices": [],
                "annotations": {},
                "cdi": [f"{KIND}={a}", f"{KIND}={b}"],
            },
            id="cdi-cri",
        ),
        pytest.param(
            ["envvar", "cdi-cri"],
            lambda a, b: {
                "envs": {"NVIDIA_VISIBLE_DEVICES": f"{a},{b}"},
                "mounts": [],
                "devices": NODES,
                "annotations": {},
                "cdi": [f"{KIND}={a}", f"{KIND}={b}"],
            },
            id="envvar+cdi-cri",
        ),
        pytest.param(
            ["volume-mounts", "cdi-annotations", "cdi-cri"],
            lambda a, b: {
                "envs": {"NVIDIA_VISIBLE_DEVICES": ROOT},
                "mounts": [("/dev/null", f"{ROOT}/{a}", False), ("/dev/null", f"{ROOT}/{b}", False)],
                "devices": NODES,
                "annotations": {KEY: f"{KIND}={a},{KIND}={b}"},
                "cdi": [f"{KIND}={a}", f"{KIND}={b}"],
            },
            id="volume-mounts+cdi-both",
        ),
    ],
)
async def test_allocate_response_per_strategy(mock_node: MockNodeFactory, kinds: list[str], expected: Any) -> None:
    """Allocate of two GPUs answers with exactly the envs, mounts, nodes, annotations and CDI names of the strategy."""
    async with mock_node([strategy(*kinds).apply]) as n:
        a, b = n.gpus()
        assert summary(await n.allocate(a, b)) == expected(a, b)


async def test_replicas_with_cdi_name_their_gpu_once(mock_node: MockNodeFactory) -> None:
    """With time-slicing and cdi-cri, two replicas of one GPU give one CDI name in the response."""
    shared = TimeSlicing.from_mapping({"resources": [{"name": GPU, "replicas": 2}]}, "sharing.timeSlicing")
    async with mock_node([shared.apply, strategy("cdi-cri", "cdi-annotations").apply]) as n:
        first = n.gpus()[0]
        response = await n.allocate(f"{first}::0", f"{first}::1")
        assert [c.name for c in response.cdi_devices] == [f"{KIND}={first}"]
        assert dict(response.annotations) == {KEY: f"{KIND}={first}"}
