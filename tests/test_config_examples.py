"""The example config files in deploy/examples: each loads, its backend section parses, and it serves what it says."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from gpuplugin.backends.mock import MockSettings
from gpuplugin.backends.nvml import DeviceIdStrategy, NvmlBackend, NvmlSettings
from gpuplugin.backends.partitioned import Layout, PartitionedBackend, PartitionedSettings, Strategy, build_parent
from gpuplugin.backends.partitioned.backend import parent_context
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.model import AllocationPolicyKind
from gpuplugin.daemon.agent import make_backend, pipeline, served_tree, settings_from_text
from gpuplugin.daemon.settings import ConfigFile, Flags, Overrides, PluginFlags, PluginSection, PluginSettings
from gpuplugin.devices.cdi import CdiSpecWriter
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.devices.strategies import VOLUME_MOUNTS_ROOT, DeviceListStrategyKind

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "examples"
GPU = "nvidia.com/gpu"

#: Per example: the resources (name → device count) its served tree has on the mock backend's 8 GPUs; None for
#: files that name the NVML backend, whose discovery needs a GPU.
EXAMPLES: Mapping[str, Mapping[str, int] | None] = {
    "nvidia-compatible.yaml": {"nvidia.com/gpu.shared": 8 * 4},
    # GPU 0: 8 replicas, GPUs 1-6: 4 each, GPU 7 whole.
    "time-slicing.yaml": {"nvidia.com/shared-gpu": 8 + 6 * 4, GPU: 1},
    "mig-mixed.yaml": None,
    "mps.yaml": None,
    "mps-partitions.yaml": None,
    "mig-mock.yaml": {"nvidia.com/mig-1g.18gb": 8 * 7},
    "cdi.yaml": {GPU: 8},
    "volume-mounts.yaml": {GPU: 8},
    "health.yaml": {GPU: 8},
    "mock-kind.yaml": {GPU: 8},
    "full.yaml": {GPU: 8},
}
#: Files that leave the backend to the DaemonSet overlay: they must also load with the NVML backend chosen.
OVERLAY_CHOSEN = [n for n in sorted(EXAMPLES) if "backend" not in yaml.safe_load((EXAMPLES_DIR / n).read_text())]
#: NVIDIA's keys that load but configure NVIDIA's own tools; full.yaml shows them as comments only.
IGNORED_NVIDIA_FLAGS = {"gfd"}
IGNORED_NVIDIA_PLUGIN_FLAGS = {"nvidiaCTKPath", "containerDriverRoot"}


def keys(schema: type[msgspec.Struct]) -> set[str]:
    """The keys a section's schema reads, as the file spells them."""
    return {f.encode_name for f in msgspec.structs.fields(schema)}


def text_of(name: str) -> str:
    return (EXAMPLES_DIR / name).read_text(encoding="utf-8")


def load(name: str, overrides: Overrides | None = None) -> PluginSettings:
    return settings_from_text(text_of(name), name, overrides or Overrides(), env={})


def check_backend_options(settings: PluginSettings) -> None:
    """The resolved backend options parse with the backend's own parser (the parent's too)."""
    options = settings.backend_options
    if settings.backend == "mock":
        MockSettings.from_options(options, state_dir=settings.state_dir)
    elif settings.backend == "nvml":
        NvmlSettings.from_options(options)
    else:
        assert settings.backend == "partitioned"
        partitioned = PartitionedSettings.from_options(options)
        parent = parent_context(partitioned, BackendContext(options=options, state_dir=settings.state_dir))
        if partitioned.parent == "nvml":
            NvmlSettings.from_options(parent.options)
        else:
            MockSettings.from_options(parent.options, state_dir=settings.state_dir)


def test_every_example_is_checked() -> None:
    """Every file in deploy/examples has an entry here, so a new example cannot go untested."""
    assert sorted(p.name for p in EXAMPLES_DIR.iterdir()) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_loads_and_every_backend_section_parses(name: str, workdir: Path) -> None:
    """An example is version v1, commented, loads, builds its pipeline and backend, and its backend sections parse."""
    text = text_of(name)
    data = yaml.safe_load(text)
    assert data["version"] == "v1"
    assert text.startswith("# "), "an example starts by saying what it is for"
    settings = load(name, Overrides(state_dir=workdir))
    pipeline(settings)
    check_backend_options(settings)
    sections = data.get("backend", {})
    if "mock" in sections:
        MockSettings.from_options(sections["mock"], state_dir=workdir)
    if "nvml" in sections:
        NvmlSettings.from_options(sections["nvml"])
    if "partitioned" in sections:
        PartitionedSettings.from_options(sections["partitioned"])
    make_backend(settings)


@pytest.mark.parametrize("name", OVERLAY_CHOSEN)
def test_overlay_chosen_example_loads_with_the_nvml_backend(name: str) -> None:
    """A file that leaves the backend to the overlay also loads with --backend nvml, NVIDIA's flags applied."""
    settings = load(name, Overrides(backend="nvml"))
    assert settings.backend == "nvml"
    check_backend_options(settings)
    assert isinstance(make_backend(settings), NvmlBackend)


@pytest.mark.parametrize("name", [n for n, served in sorted(EXAMPLES.items()) if served is not None])
async def test_mock_example_serves_the_promised_resources(name: str, workdir: Path) -> None:
    """On the mock backend, an example's served tree has exactly the resources and device counts it promises."""
    tree = await served_tree(load(name, Overrides(state_dir=workdir)))
    assert dict(Counter(d.resource for d in tree.devices)) == EXAMPLES[name]


async def test_nvidia_compatible_example_shares_every_gpu_one_replica_per_container(workdir: Path) -> None:
    """NVIDIA's file: renameByDefault serves 4 replicas per GPU as .shared, at most one per container."""
    settings = load("nvidia-compatible.yaml", Overrides(state_dir=workdir))
    tree = await served_tree(settings)
    rules = tree.rules_of("nvidia.com/gpu.shared")
    assert rules.max_devices_per_container == 1
    assert rules.allocation_policy is AllocationPolicyKind.DISTRIBUTED
    nvml = NvmlSettings.from_options(load("nvidia-compatible.yaml", Overrides(backend="nvml")).backend_options)
    assert (nvml.fail_on_init_error, nvml.pass_device_specs, nvml.driver_root) == (True, False, "/")
    assert nvml.device_id_strategy is DeviceIdStrategy.UUID


async def test_time_slicing_example_counts_per_gpu_and_packs(workdir: Path) -> None:
    """time-slicing.yaml: GPU 0 has 8 replicas, GPU 7 stays whole, and the renamed replicas are packed."""
    tree = await served_tree(load("time-slicing.yaml", Overrides(state_dir=workdir)))
    per_gpu = Counter(d.attributes["index"] for d in tree.of("nvidia.com/shared-gpu"))
    assert per_gpu == {"0": 8, **{str(i): 4 for i in range(1, 7)}}
    assert [d.attributes["index"] for d in tree.of(GPU)] == ["7"]
    rules = tree.rules_of("nvidia.com/shared-gpu")
    assert rules.allocation_policy is AllocationPolicyKind.PACKED
    assert rules.max_devices_per_container == 1


async def test_cdi_example_names_cdi_devices_and_writes_their_spec(workdir: Path) -> None:
    """cdi.yaml: each GPU's Allocate names its CDI device and keeps the variable; the spec file describes them."""
    settings = load("cdi.yaml", Overrides(state_dir=workdir))
    assert settings.strategies.strategies == (DeviceListStrategyKind.CDI_CRI, DeviceListStrategyKind.ENVVAR)
    assert settings.cdi.spec_dir == Path("/var/run/cdi")
    tree = await served_tree(settings)
    for device in tree.devices:
        assert device.spec.cdi_devices == (f"k8s.device-plugin.nvidia.com/gpu={device.id}",)
        assert device.spec.list_env["NVIDIA_VISIBLE_DEVICES"] == device.id
    # The same writer the daemon builds, pointed at a temporary directory instead of the host's /var/run/cdi.
    _, sinks = pipeline(dataclasses.replace(settings, cdi=dataclasses.replace(settings.cdi, spec_dir=workdir)))
    (writer,) = sinks
    assert isinstance(writer, CdiSpecWriter)
    await writer.publish(tree)
    spec = json.loads((workdir / "k8s.device-plugin.nvidia.com-gpu.json").read_text())
    assert spec["kind"] == "k8s.device-plugin.nvidia.com/gpu"
    assert sorted(d["name"] for d in spec["devices"]) == sorted(d.id for d in tree.devices)
    await writer.aclose()
    assert not list(workdir.glob("*.json"))


async def test_volume_mounts_example_mounts_one_path_per_gpu(workdir: Path) -> None:
    """volume-mounts.yaml: the variable names the mounts directory and each GPU is one mount in it."""
    tree = await served_tree(load("volume-mounts.yaml", Overrides(state_dir=workdir)))
    for device in tree.devices:
        assert device.spec.env["NVIDIA_VISIBLE_DEVICES"] == VOLUME_MOUNTS_ROOT
        assert "NVIDIA_VISIBLE_DEVICES" not in device.spec.list_env
        assert [m.container_path for m in device.spec.mounts] == [f"{VOLUME_MOUNTS_ROOT}/{device.id}"]
    nvml = load("volume-mounts.yaml", Overrides(backend="nvml"))
    assert NvmlSettings.from_options(nvml.backend_options).pass_device_specs


def test_health_example_sets_the_policy() -> None:
    """health.yaml: its XID lists and quiet period become the health policy, 94 ignored and 74 fatal."""
    health = load("health.yaml").health
    assert health == HealthPolicy(
        ignored_xids=frozenset({13, 31, 43, 45, 68, 94, 109}),
        fatal_xids=frozenset({48, 74, 79, 92, 95, 119, 120}),
        forced_xids=frozenset({31}),
        recovery_quiet_period_s=120.0,
        checks_enabled=True,
    )


async def test_mock_kind_example_has_two_nvlink_domains(workdir: Path) -> None:
    """mock-kind.yaml: GPUs 0-3 and 4-7 are two NVLink domains, metrics on :9400, a 5 s quiet period."""
    settings = load("mock-kind.yaml", Overrides(state_dir=workdir))
    assert str(settings.probes.address) == ":9400" and settings.health.recovery_quiet_period_s == 5.0
    tree = await served_tree(settings)
    ids = [d.id for d in tree.devices]
    assert tree.link(ids[0], ids[3]).nvlinks == 18
    assert tree.link(ids[3], ids[4]).nvlinks == 0


async def test_mig_mixed_example_layout_fits_an_h200(workdir: Path) -> None:
    """mig-mixed.yaml: mixed over NVML, GPUs whole by default, and GPU 1's layout fits an H200 (tried on mock)."""
    settings = load("mig-mixed.yaml", Overrides(state_dir=workdir))
    partitioned = PartitionedSettings.from_options(settings.backend_options)
    assert (partitioned.parent, partitioned.strategy, partitioned.layout) == ("nvml", Strategy.MIXED, Layout())
    assert partitioned.layouts == {1: Layout(profiles=("3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"))}
    backend = make_backend(settings)
    assert isinstance(backend, PartitionedBackend) and isinstance(backend.parent, NvmlBackend)
    # The same layouts over two mock H200s: the layout fits, GPU 0 stays whole.
    on_mock = dataclasses.replace(partitioned, parent="mock", parent_options={"gpus": 2})
    mock = PartitionedBackend(on_mock, build_parent(on_mock, BackendContext(state_dir=workdir)))
    await mock.start()
    try:
        tree = await mock.discover()
    finally:
        await mock.aclose()
    assert dict(Counter(d.resource for d in tree.devices)) == {
        GPU: 1,
        "nvidia.com/mig-3g.71gb": 1,
        "nvidia.com/mig-2g.35gb": 1,
        "nvidia.com/mig-1g.18gb": 2,
    }


def test_full_example_shows_the_defaults(workdir: Path) -> None:
    """full.yaml sets every setting to its default: it loads to the settings of an empty file."""
    overrides = Overrides(state_dir=workdir)
    full = load("full.yaml", overrides)
    empty = settings_from_text("version: v1\n", "empty.yaml", overrides, env={})
    assert full.sharing == TimeSlicing()
    assert dataclasses.replace(full, backend_options={}, sharing=None) == dataclasses.replace(empty, backend_options={})
    sections = yaml.safe_load(text_of("full.yaml"))["backend"]
    assert MockSettings.from_options(sections["mock"], state_dir=workdir) == MockSettings.from_options(
        {}, state_dir=workdir
    )
    assert NvmlSettings.from_options(sections["nvml"]) == NvmlSettings()
    assert PartitionedSettings.from_options(sections["partitioned"]) == PartitionedSettings()


def test_full_example_lists_every_setting_with_a_comment() -> None:
    """full.yaml names every setting of the schema and every backend's, and comments each one."""
    text = text_of("full.yaml")
    data: dict[str, Any] = yaml.safe_load(text)
    assert set(data) == keys(ConfigFile)
    assert set(data["plugin"]) == keys(PluginSection)
    assert set(data["backend"]) == {"name", "mock", "nvml", "partitioned"}
    assert set(data["backend"]["mock"]) == {f.name for f in fields(MockSettings)} | {"config"}
    assert set(data["backend"]["nvml"]) == {f.name for f in msgspec.structs.fields(NvmlSettings)}
    assert set(data["backend"]["partitioned"]) == {f.name for f in fields(PartitionedSettings)}
    assert set(data["health"]) == {"enabled", "ignoredXids", "fatalXids", "enabledXids", "recoveryQuietPeriodSeconds"}
    assert set(data["allocation"]) == {"policy"}
    assert set(data["flags"]) == keys(Flags) - IGNORED_NVIDIA_FLAGS
    assert set(data["flags"]["plugin"]) == keys(PluginFlags) - IGNORED_NVIDIA_PLUGIN_FLAGS
    for key in IGNORED_NVIDIA_FLAGS | IGNORED_NVIDIA_PLUGIN_FLAGS:
        assert f"# {key}:" in text
    time_slicing = data["sharing"]["timeSlicing"]
    assert set(time_slicing) == {"renameByDefault", "failRequestsGreaterThanOne", "allocationPolicy", "resources"}
    for key in ("name", "replicas", "rename", "devices", "perGpu", "allocationPolicy"):
        assert re.search(rf"^\s*#\s+(- )?{key}: .+# \w", text, re.MULTILINE), f"resources[].{key} is not shown"
    uncommented = []
    previous = ""
    for line in text.splitlines():
        setting = re.match(r"^\s*(\w+): *(\S.*)?$", line)
        # A setting with a value (not a section heading) says what it does, above it or at its end.
        if setting and setting.group(2) and not previous.lstrip().startswith("#") and " # " not in line:
            uncommented.append(line.strip())
        if line.strip():
            previous = line
    assert not uncommented
