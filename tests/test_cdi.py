"""The CDI spec writer: valid specs, atomic rewrites only on change, cleanup, and following the served devices."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiofiles.os
import pytest
import yaml
from grpclib import GRPCError
from grpclib.const import Status

from gpuplugin.core.model import ContainerSpec, Device, DeviceNode, DeviceTree, frozen_mapping
from gpuplugin.daemon.probes import not_ready_reasons
from gpuplugin.daemon.settings import ConfigError
from gpuplugin.devices.cdi import (
    CDI_VERSION,
    CdiSettings,
    CdiSpecWriter,
    build_specs,
    render,
    spec_file_name,
    spec_writer_for,
)
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.devices.strategies import DeviceListStrategy
from tests.fakes import until

if TYPE_CHECKING:
    from tests.conftest import MockNodeFactory

GPU = "nvidia.com/gpu"
VENDOR = "k8s.device-plugin.nvidia.com"
KIND = f"{VENDOR}/gpu"
FILE = f"{VENDOR}-gpu.json"

# The CDI specification's name rules (SPEC.md, "Kind" and "CDI Devices").
VENDOR_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CLASS_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
SEMVER_RE = re.compile(r"^\d+\.\d+\.\d+$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$")


def assert_valid_spec(spec: Mapping[str, Any]) -> None:
    """Check what the CDI specification requires of a spec file."""
    assert set(spec) <= {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
    assert SEMVER_RE.match(spec["cdiVersion"])
    vendor, slash, cdi_class = spec["kind"].partition("/")
    assert slash and "/" not in cdi_class
    assert len(vendor) <= 253 and VENDOR_RE.match(vendor)
    assert len(cdi_class) <= 63 and CLASS_RE.match(cdi_class) and cdi_class[0].isalpha()
    assert spec["devices"], "a CDI spec needs at least one device"
    names = [d["name"] for d in spec["devices"]]
    assert len(names) == len(set(names))
    for device in spec["devices"]:
        assert set(device) <= {"name", "annotations", "containerEdits"}
        assert DEVICE_NAME_RE.match(device["name"])
        assert device["containerEdits"], "a device without edits is refused by runtimes"
        assert_valid_edits(device["containerEdits"])
    assert_valid_edits(spec.get("containerEdits", {}))


def assert_valid_edits(edits: Mapping[str, Any]) -> None:
    assert set(edits) <= {"env", "deviceNodes", "mounts", "hooks", "additionalGids", "intelRdt"}
    for variable in edits.get("env", []):
        assert ENV_RE.match(variable)
    for node in edits.get("deviceNodes", []):
        assert node["path"].startswith("/") and node["hostPath"].startswith("/")
        assert set(node.get("permissions", "")) <= set("rwm")


def gpu(index: int, *, resource: str = GPU, runtime_id: str | None = None, control: bool = True) -> Device:
    uuid = f"GPU-{index:04d}"
    nodes = [DeviceNode("/dev/nvidia" + str(index), "/dev/nvidia" + str(index))]
    if control:
        nodes += [DeviceNode("/dev/nvidiactl", "/dev/nvidiactl"), DeviceNode("/dev/nvidia-uvm", "/dev/nvidia-uvm")]
    return Device(
        id=uuid,
        resource=resource,
        gpu=uuid,
        attributes=frozen_mapping({"index": str(index)}),
        spec=ContainerSpec(
            list_env=frozen_mapping({"NVIDIA_VISIBLE_DEVICES": runtime_id or uuid}), device_nodes=tuple(nodes)
        ),
    )


CDI_ONLY = DeviceListStrategy.from_mapping({"deviceListStrategy": ["cdi-cri"]}, "flags.plugin")


def served(*devices: Device, strategy: DeviceListStrategy = CDI_ONLY) -> DeviceTree:
    return strategy.apply(DeviceTree(devices=devices))


# The specs.


def test_spec_describes_each_device_with_nodes_and_runtime_id() -> None:
    """Each GPU is a CDI device named by its runtime ID, with its own node and no environment of its own."""
    specs = build_specs(served(gpu(0), gpu(1)))
    assert list(specs) == [KIND]
    spec = specs[KIND]
    assert_valid_spec(spec)
    assert spec["cdiVersion"] == CDI_VERSION == "0.6.0" and spec["kind"] == KIND
    assert spec["devices"] == [
        {
            "name": f"GPU-000{i}",
            "containerEdits": {
                "deviceNodes": [{"path": f"/dev/nvidia{i}", "hostPath": f"/dev/nvidia{i}", "permissions": "rw"}],
            },
        }
        for i in (0, 1)
    ]


def test_nodes_every_device_needs_are_common_edits() -> None:
    """Nodes present in every device (/dev/nvidiactl, /dev/nvidia-uvm) move to the spec's common containerEdits."""
    spec = build_specs(served(gpu(0), gpu(1)))[KIND]
    assert [n["path"] for n in spec["containerEdits"]["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia-uvm"]


def test_node_missing_from_one_device_stays_per_device() -> None:
    """A node not present in every device stays in the devices that have it."""
    spec = build_specs(served(gpu(0), gpu(1, control=False)))[KIND]
    assert "containerEdits" not in spec
    assert len(spec["devices"][0]["containerEdits"]["deviceNodes"]) == 3


def test_replicas_are_one_cdi_device_per_gpu() -> None:
    """Time-sliced replicas of a GPU become one CDI device named by the GPU's runtime ID."""
    shared = TimeSlicing.from_mapping({"renameByDefault": True, "resources": [{"name": GPU, "replicas": 4}]})
    specs = build_specs(CDI_ONLY.apply(shared.apply(DeviceTree(devices=(gpu(0), gpu(1))))))
    assert list(specs) == [f"{VENDOR}/gpu.shared"]
    assert [d["name"] for d in specs[f"{VENDOR}/gpu.shared"]["devices"]] == ["GPU-0000", "GPU-0001"]
    assert_valid_spec(specs[f"{VENDOR}/gpu.shared"])


def test_one_spec_per_resource_class() -> None:
    """Devices of different resources get a spec per CDI kind, each in `<vendor>-<class>.json`."""
    specs = build_specs(served(gpu(0), gpu(1, resource="nvidia.com/mig-1g.18gb", runtime_id="MIG-0001")))
    assert sorted(specs) == [KIND, f"{VENDOR}/mig-1g.18gb"]
    assert [spec_file_name(k) for k in sorted(specs)] == [FILE, f"{VENDOR}-mig-1g.18gb.json"]
    for spec in specs.values():
        assert_valid_spec(spec)


def test_index_runtime_id_names_the_device() -> None:
    """With the index device-id strategy the CDI device is named by the index the backend chose."""
    spec = build_specs(served(gpu(0, runtime_id="0")))[KIND]
    assert [d["name"] for d in spec["devices"]] == ["0"]
    assert "env" not in spec["devices"][0]["containerEdits"]


def test_invalid_cdi_names_are_left_out() -> None:
    """A runtime ID that is no valid CDI device name is left out rather than making the whole file invalid."""
    specs = build_specs(served(gpu(0), gpu(1, runtime_id="MIG-GPU-1/1/0")))
    assert [d["name"] for d in specs[KIND]["devices"]] == ["GPU-0000"]


def test_specs_from_an_envvar_tree_use_the_backend_spec() -> None:
    """Without a CDI strategy in the tree, the writer describes devices from the backend's own specs."""
    spec = build_specs(DeviceTree(devices=(gpu(0),)), vendor="example.com")["example.com/gpu"]
    assert_valid_spec(spec)
    assert [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]] == [
        "/dev/nvidia0",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
    ]


def test_yaml_rendering_holds_the_same_spec() -> None:
    """The YAML rendering parses back to the same spec as the JSON one."""
    spec = build_specs(served(gpu(0), gpu(1)))[KIND]
    assert yaml.safe_load(render(spec, "yaml")) == json.loads(render(spec, "json")) == spec


def test_writer_only_for_cdi_strategies() -> None:
    """spec_writer_for gives a writer with the strategy's vendor when a CDI strategy is on, else None."""
    settings = CdiSettings(spec_dir=Path("/tmp/nowhere"))
    assert spec_writer_for(DeviceListStrategy(), settings) is None
    with_cdi = DeviceListStrategy.from_mapping(
        {"deviceListStrategy": "envvar,cdi-annotations", "cdiVendor": "example.com"}, "flags.plugin"
    )
    writer = spec_writer_for(with_cdi, settings)
    assert writer is not None and writer.vendor == "example.com" and writer.settings is settings


def test_settings_defaults_and_values() -> None:
    """cdiSpecDir defaults to /var/run/cdi and JSON; both can be set, other keys are left alone."""
    assert CdiSettings.from_mapping({"deviceListStrategy": "cdi-cri"}) == CdiSettings(Path("/var/run/cdi"), "json")
    assert CdiSettings.from_mapping({"cdiSpecDir": "/etc/cdi", "cdiSpecFormat": "yaml"}) == CdiSettings(
        Path("/etc/cdi"), "yaml"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cdiSpecDir": "run/cdi"}, "flags.plugin.cdiSpecDir: must be an absolute directory path, got 'run/cdi'"),
        ({"cdiSpecDir": 5}, "flags.plugin.cdiSpecDir: must be an absolute directory path, got 5"),
        ({"cdiSpecFormat": "toml"}, "flags.plugin.cdiSpecFormat: must be one of json, yaml, got 'toml'"),
        ("cdi", "flags.plugin: expected mapping, got 'cdi'"),
    ],
)
def test_invalid_settings_name_the_field(data: Any, message: str) -> None:
    """Invalid CDI settings raise ConfigError naming the field."""
    with pytest.raises(ConfigError) as caught:
        CdiSettings.from_mapping(data, "flags.plugin")
    assert str(caught.value) == message


# The writer.


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return tmp_path / "cdi"


def writer_for(spec_dir: Path, spec_format: Any = "json", retry_first_s: float = 1.0) -> CdiSpecWriter:
    return CdiSpecWriter(CdiSettings(spec_dir=spec_dir, format=spec_format, retry_first_s=retry_first_s))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


async def test_publish_writes_a_valid_spec_file(spec_dir: Path) -> None:
    """Publishing writes `<vendor>-<class>.json`, readable by all, parsing to a valid spec, with no temp file left."""
    writer = writer_for(spec_dir)
    await writer.publish(served(gpu(0), gpu(1)))
    path = spec_dir / FILE
    spec = json.loads(path.read_text())
    assert_valid_spec(spec)
    assert spec == build_specs(served(gpu(0), gpu(1)))[KIND]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert writer.files == (path,)
    assert leftovers(spec_dir) == []
    await writer.aclose()


async def test_yaml_format_writes_yaml(spec_dir: Path) -> None:
    """With the yaml format the file is `<vendor>-<class>.yaml` and holds the spec in YAML."""
    writer = writer_for(spec_dir, "yaml")
    await writer.publish(served(gpu(0)))
    assert yaml.safe_load((spec_dir / f"{VENDOR}-gpu.yaml").read_text())["kind"] == KIND
    await writer.aclose()


async def test_rewrites_only_when_content_changes(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tree published again writes nothing; a changed tree writes the file again."""
    replaced: list[str] = []
    real_replace = aiofiles.os.replace

    async def counting_replace(src: Any, dst: Any) -> None:
        replaced.append(str(dst))
        await real_replace(src, dst)

    monkeypatch.setattr(aiofiles.os, "replace", counting_replace)
    writer = writer_for(spec_dir)
    await writer.publish(served(gpu(0), gpu(1)))
    inode = (spec_dir / FILE).stat().st_ino
    for _ in range(3):
        await writer.publish(served(gpu(0), gpu(1)))
    assert replaced == [str(spec_dir / FILE)]
    assert (spec_dir / FILE).stat().st_ino == inode
    await writer.publish(served(gpu(0)))
    assert len(replaced) == 2
    await writer.aclose()


async def test_replace_is_atomic(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the rename the target holds the old content and a complete temp file in the same directory the new."""
    writer = writer_for(spec_dir)
    await writer.publish(served(gpu(0), gpu(1)))
    old = (spec_dir / FILE).read_bytes()
    new = render(build_specs(served(gpu(0)))[KIND], "json")
    seen: list[tuple[bytes, bytes, Path]] = []
    real_replace = aiofiles.os.replace

    async def observing_replace(src: Any, dst: Any) -> None:
        seen.append((Path(dst).read_bytes(), Path(src).read_bytes(), Path(src)))
        await real_replace(src, dst)

    monkeypatch.setattr(aiofiles.os, "replace", observing_replace)
    await writer.publish(served(gpu(0)))
    ((target_before, temporary, temporary_path),) = seen
    assert target_before == old and temporary == new
    assert temporary_path.parent == spec_dir
    assert temporary_path.suffix not in (".json", ".yaml"), "runtimes must not pick up a half-written spec"
    assert not temporary_path.exists()
    assert (spec_dir / FILE).read_bytes() == new
    await writer.aclose()


async def test_readers_never_see_a_partial_file(spec_dir: Path) -> None:
    """A reader polling while specs are rewritten many times only ever reads one complete version or the other."""
    writer = writer_for(spec_dir)
    trees = [served(*(gpu(i) for i in range(8))), served(gpu(0))]
    versions = {render(build_specs(t)[KIND], "json") for t in trees}
    await writer.publish(trees[0])
    reads: list[bytes] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            reads.append((spec_dir / FILE).read_bytes())
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    for k in range(40):
        await writer.publish(trees[k % 2])
    stop.set()
    await task
    assert len(reads) > 40
    assert set(reads) <= versions
    assert leftovers(spec_dir) == []
    await writer.aclose()


async def test_failed_write_keeps_old_file_and_retries(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails leaves the old file and no temp file, raises nothing, and the next publish writes it."""
    writer = writer_for(spec_dir)
    await writer.publish(served(gpu(0), gpu(1)))
    old = (spec_dir / FILE).read_bytes()
    real_replace = aiofiles.os.replace

    async def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aiofiles.os, "replace", failing_replace)
    await writer.publish(served(gpu(0)))
    assert (spec_dir / FILE).read_bytes() == old
    assert leftovers(spec_dir) == []
    monkeypatch.setattr(aiofiles.os, "replace", real_replace)
    await writer.publish(served(gpu(0)))
    assert [d["name"] for d in json.loads((spec_dir / FILE).read_text())["devices"]] == ["GPU-0000"]
    await writer.aclose()


async def test_vanished_kind_is_removed(spec_dir: Path) -> None:
    """When a resource's devices vanish, its spec file is removed and the others stay."""
    writer = writer_for(spec_dir)
    mig = gpu(1, resource="nvidia.com/mig-1g.18gb", runtime_id="MIG-0001")
    await writer.publish(served(gpu(0), mig))
    assert sorted(p.name for p in spec_dir.iterdir()) == [FILE, f"{VENDOR}-mig-1g.18gb.json"]
    await writer.publish(served(gpu(0)))
    assert sorted(p.name for p in spec_dir.iterdir()) == [FILE]
    await writer.publish(DeviceTree())
    assert list(spec_dir.iterdir()) == []
    await writer.aclose()


async def test_aclose_removes_only_what_it_wrote(spec_dir: Path) -> None:
    """aclose removes every spec the writer wrote and leaves other files in the directory alone."""
    spec_dir.mkdir()
    foreign = spec_dir / "nvidia.com-gpu.yaml"
    foreign.write_text("cdiVersion: 0.5.0\n")
    writer = writer_for(spec_dir)
    await writer.publish(served(gpu(0)))
    await writer.aclose()
    assert list(spec_dir.iterdir()) == [foreign]
    assert writer.files == ()


async def test_unwritable_directory_is_logged_not_raised(tmp_path: Path) -> None:
    """A spec directory that cannot be created makes publish log, not raise, so devices are still served."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = writer_for(blocker / "cdi")
    await writer.publish(served(gpu(0)))
    assert writer.files == ()
    await writer.aclose()


# End to end: the manager, the mock backend and the kubelet simulator over real unix sockets (conftest's mock_node).


def spec_names(path: Path) -> list[str]:
    try:
        return [d["name"] for d in json.loads(path.read_text())["devices"]]
    except FileNotFoundError:
        return []


async def test_spec_file_follows_the_served_devices(workdir: Path, mock_node: MockNodeFactory) -> None:
    """The spec appears at start describing every CDI name Allocate gives, follows an unplug, and goes at shutdown."""
    strategy = DeviceListStrategy.from_mapping({"deviceListStrategy": ["cdi-cri", "cdi-annotations"]})
    writer = spec_writer_for(strategy, CdiSettings(spec_dir=workdir / "cdi", retry_first_s=0.05))
    assert writer is not None
    path = workdir / "cdi" / FILE
    async with mock_node([strategy.apply], [writer]) as n:
        gpus = n.gpus()
        spec = json.loads(path.read_text())
        assert_valid_spec(spec)
        assert [d["name"] for d in spec["devices"]] == gpus
        response = await n.allocate(*gpus)
        assert [c.name for c in response.cdi_devices] == [f"{spec['kind']}={d['name']}" for d in spec["devices"]]
        nodes = [e["deviceNodes"][0]["path"] for e in (d["containerEdits"] for d in spec["devices"])]
        assert nodes == ["/dev/nvidia0", "/dev/nvidia1"] and list(response.devices) == []
        n.backend.unplug(1)
        # The spec follows the tree after the kubelet's stream does, so poll the file rather than the kubelet.
        await until(lambda: spec_names(path) == gpus[:1])
        n.backend.plug(1)
        await until(lambda: spec_names(path) == gpus)
    assert not path.exists()
    assert os.listdir(workdir / "cdi") == []


async def test_shared_resource_gets_its_own_spec(workdir: Path, mock_node: MockNodeFactory) -> None:
    """With renamed time-slicing replicas, the spec is `<vendor>-gpu.shared.json` with one device per GPU."""
    shared = TimeSlicing.from_mapping({"renameByDefault": True, "resources": [{"name": GPU, "replicas": 3}]})
    strategy = DeviceListStrategy.from_mapping({"deviceListStrategy": "cdi-cri"})
    writer = CdiSpecWriter(CdiSettings(spec_dir=workdir / "cdi"))
    async with mock_node([shared.apply, strategy.apply], [writer], resources=[f"{GPU}.shared"]) as n:
        spec = json.loads((workdir / "cdi" / f"{VENDOR}-gpu.shared.json").read_text())
        assert_valid_spec(spec)
        assert [d["name"] for d in spec["devices"]] == n.gpus()
    assert os.listdir(workdir / "cdi") == []


# Truthful readiness: a spec that is not on disk is a problem, never a name Allocate gives.


async def test_a_spec_that_cannot_be_written_is_a_problem_until_a_retry_writes_it(tmp_path: Path) -> None:
    """An unwritable spec directory sets `problem` and `missing` names the devices; the background retry writes
    the spec once the directory can be made, and both clear."""
    blocker = tmp_path / "cdi"
    blocker.write_text("")
    writer = writer_for(blocker, retry_first_s=0.01)
    await writer.publish(served(gpu(0), gpu(1)))
    assert writer.problem is not None and str(blocker / FILE) in writer.problem
    assert "cannot create the directory" in writer.problem
    names = [f"{KIND}=GPU-0000", f"{KIND}=GPU-0001"]
    assert writer.missing(names) == names
    blocker.unlink()
    await until(lambda: writer.problem is None)
    assert writer.missing(names) == []
    assert spec_names_in(blocker / FILE) == ["GPU-0000", "GPU-0001"]
    await writer.aclose()


async def test_a_failed_rewrite_leaves_only_the_old_devices_on_disk(
    spec_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a new spec cannot replace the old one, the devices the old file describes still count as on disk and
    the new one does not."""
    writer = writer_for(spec_dir, retry_first_s=30.0)
    await writer.publish(served(gpu(0)))

    async def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(aiofiles.os, "replace", failing_replace)
    await writer.publish(served(gpu(0), gpu(1)))
    assert writer.problem == f"{spec_dir / FILE}: cannot write: Read-only file system"
    assert writer.missing([f"{KIND}=GPU-0000", f"{KIND}=GPU-0001"]) == [f"{KIND}=GPU-0001"]
    monkeypatch.undo()
    await writer.aclose()
    assert writer.problem is None


def spec_names_in(path: Path) -> list[str]:
    return [d["name"] for d in json.loads(path.read_text())["devices"]]


async def test_allocate_refuses_devices_without_a_spec_and_readyz_says_why(
    workdir: Path, mock_node: MockNodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the spec unwritable, Allocate fails FAILED_PRECONDITION naming the CDI device and the node is not ready
    (the reason names the file); once a retry writes it, Allocate answers and the CDI reason is gone."""
    real_replace = aiofiles.os.replace

    async def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(aiofiles.os, "replace", failing_replace)
    strategy = DeviceListStrategy.from_mapping({"deviceListStrategy": "cdi-cri"})
    writer = spec_writer_for(strategy, CdiSettings(spec_dir=workdir / "cdi", retry_first_s=0.05))
    assert writer is not None
    async with mock_node([strategy.apply], [writer]) as n:
        gpus = n.gpus()
        with pytest.raises(GRPCError) as refused:
            await n.allocate(gpus[0])
        assert refused.value.status is Status.FAILED_PRECONDITION
        assert f"no CDI spec on disk for '{KIND}={gpus[0]}'" in str(refused.value.message)
        assert not n.manager.ready
        reasons = not_ready_reasons(n.manager)
        assert reasons[0] == f"CDI spec not written: {workdir / 'cdi' / FILE}: cannot write: Read-only file system"
        monkeypatch.setattr(aiofiles.os, "replace", real_replace)
        await until(lambda: writer.problem is None, 5)
        response = await n.allocate(gpus[0])
        assert [c.name for c in response.cdi_devices] == [f"{KIND}={gpus[0]}"]
        assert not [r for r in not_ready_reasons(n.manager) if r.startswith("CDI")]
