"""Settings of the mock backend: how many fake GPUs, what they look like and how they are connected."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import aiofiles
import msgspec
from msgspec import Meta

from gpuplugin.core.config import MAX_CONFIG_BYTES, AbsolutePath, Text, decode, decode_config, parse_config
from gpuplugin.core.errors import ConfigError
from gpuplugin.core.model import ContainerSpec, Device

#: Where the control socket lives unless told otherwise: the core's default state directory.
DEFAULT_CONTROL_SOCKET = Path("/run/gpuplugin/mock.sock")
#: An NVSwitch gives each H100/H200 18 NVLink links.
DEFAULT_NVLINKS = 18
#: The link table grows with the square of this; more is almost surely a typo.
MAX_GPUS = 1024
#: The most memory a fake GPU may report (MiB): 1 TiB, several times any GPU's.
MAX_MEMORY_MIB = 1024 * 1024
#: Linux's most NUMA nodes (MAX_NUMNODES with NODES_SHIFT 10); NUMA node IDs travel to the kubelet as int64.
MAX_NUMA_NODES = 1024
#: NVLink links between a pair of GPUs at most: NVLink 5 gives a GPU 18, so this is room, not a target.
MAX_NVLINKS = 64
#: NVLink groups at most: pairs covering every GPU; each pair of GPUs is checked against every group.
MAX_NVLINK_GROUPS = MAX_GPUS // 2
#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


@dataclass(frozen=True, slots=True)
class NVLinkGroup:
    """GPUs fully connected by NVLink (one NVSwitch domain, or a directly linked pair)."""

    gpus: tuple[int, ...]
    """GPU indices in the group."""
    links: int = DEFAULT_NVLINKS
    """Active NVLink links between each pair of the group (count, 1 to ``MAX_NVLINKS`` = 64)."""


def even_pairs(gpus: int) -> tuple[tuple[int, ...], ...]:
    """(0, 1), (2, 3), …: two GPUs behind each PCIe switch, as on HGX boards."""
    return tuple(tuple(range(i, min(i + 2, gpus))) for i in range(0, gpus, 2))


@dataclass(frozen=True, slots=True)
class MockSettings:
    """What the fake node looks like. ``from_options`` derives the topology defaults from ``gpus``."""

    gpus: int = 8
    """Number of fake GPUs (count, 1 to ``MAX_GPUS`` = 1024); an HGX board has 8."""
    model: str = "NVIDIA H200"
    """Product name each GPU reports."""
    memory_mib: int = 143771
    """Memory of each GPU (MiB, 1 to ``MAX_MEMORY_MIB``), what an H200 reports."""
    resource: str = "nvidia.com/gpu"
    """Extended resource name the GPUs are served as."""
    node_name: str = "mock-node"
    """Seed of the GPU UUIDs (text): the same name gives the same UUIDs on every start. ``from_options`` takes the
    Kubernetes node's name (``NODE_NAME``, from the downward API) unless set, so every node has its own UUIDs."""
    numa_nodes: int = 2
    """NUMA nodes (count, 1 to ``MAX_NUMA_NODES`` = 1024) the GPUs are split across evenly, the first GPUs on
    NUMA node 0."""
    nvlink_groups: tuple[NVLinkGroup, ...] = (NVLinkGroup(tuple(range(8))),)
    """NVLink domains (at most ``MAX_NVLINK_GROUPS``); a pair in several groups has the sum of their links.
    Default: one NVSwitch for all GPUs."""
    pcie_switches: tuple[tuple[int, ...], ...] = even_pairs(8)
    """GPU indices behind each PCIe switch, a GPU behind one at most. Default: consecutive pairs."""
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    """Unix socket (path) of the fault-injection control server; from_options puts it in the state directory."""
    device_node_host_path: str = "/dev/null"
    """Host device node (path) mounted as ``/dev/nvidiaN``: /dev/null exists on every node, so pods start."""

    def __post_init__(self) -> None:
        _check_settings(self)

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], *, state_dir: Path | None = None, env: Mapping[str, str] = os.environ
    ) -> MockSettings:
        """Validate settings given as plain values (a YAML mapping, command-line flags); None means unset."""
        values = {str(k).replace("-", "_"): v for k, v in options.items() if v is not None and k != "config"}
        section = decode(values, MockSection, "mock", lax=True)
        default = cls()
        gpus = section.gpus or default.gpus
        groups, switches = section.nvlink_groups, section.pcie_switches
        return cls(
            gpus=gpus,
            model=section.model or default.model,
            memory_mib=section.memory_mib or default.memory_mib,
            resource=section.resource or default.resource,
            node_name=section.node_name or env.get("NODE_NAME") or default.node_name,
            numa_nodes=section.numa_nodes or default.numa_nodes,
            nvlink_groups=(NVLinkGroup(tuple(range(gpus))),) if groups is None else tuple(map(_group, groups)),
            pcie_switches=even_pairs(gpus) if switches is None else tuple(tuple(s) for s in switches),
            control_socket=Path(
                section.control_socket or (DEFAULT_CONTROL_SOCKET if state_dir is None else state_dir / "mock.sock")
            ),
            device_node_host_path=section.device_node_host_path or default.device_node_host_path,
        )


def _group(group: GpuIndices | LinkGroupSection) -> NVLinkGroup:
    """A group as written: a list of GPU indices, or ``{gpus, links}``."""
    return NVLinkGroup(tuple(group)) if isinstance(group, list) else NVLinkGroup(tuple(group.gpus), group.links)


GpuIndex = Annotated[int, Meta(ge=0, le=MAX_GPUS - 1)]
GpuIndices = Annotated[list[GpuIndex], Meta(max_length=MAX_GPUS)]


class LinkGroupSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An NVLink group written as ``{gpus: [...], links: N}``."""

    gpus: GpuIndices
    links: Annotated[int, Meta(ge=1, le=MAX_NVLINKS)] = DEFAULT_NVLINKS


class MockSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The mock backend's section (``backend.mock``, or its own file), as written: the keys MockSettings has."""

    gpus: Annotated[int, Meta(ge=1, le=MAX_GPUS)] | None = None
    model: Text | None = None
    memory_mib: Annotated[int, Meta(ge=1, le=MAX_MEMORY_MIB)] | None = None
    resource: Text | None = None
    node_name: Text | None = None
    numa_nodes: Annotated[int, Meta(ge=1, le=MAX_NUMA_NODES)] | None = None
    nvlink_groups: Annotated[list[GpuIndices | LinkGroupSection], Meta(max_length=MAX_NVLINK_GROUPS)] | None = None
    pcie_switches: Annotated[list[GpuIndices], Meta(max_length=MAX_GPUS)] | None = None
    control_socket: Text | None = None
    device_node_host_path: AbsolutePath | None = None


async def load_settings(options: Mapping[str, Any], *, state_dir: Path | None = None) -> MockSettings:
    """Settings from the YAML file named by option ``config`` (if any), overridden by the other options."""
    path = options.get("config")
    if path is None:
        return MockSettings.from_options(options, state_dir=state_dir)
    source = f"mock.config: {path}"
    try:
        async with aiofiles.open(Path(path), "rb") as f:
            data = await f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"mock.config: cannot read {path}: {e.strerror or e}") from None
    loaded = parse_config(decode_config(data, source), source)
    return MockSettings.from_options({**loaded, **options}, state_dir=state_dir)


def _check_settings(s: MockSettings) -> None:
    """Checks across fields, and the model's rules, that hold however the settings were built (from options or in
    code); each value's own type and range are MockSection's."""
    try:
        Device(id="GPU-check", resource=s.resource, gpu="GPU-check", spec=ContainerSpec())
    except ValueError as e:
        raise ConfigError(f"mock.resource: {e}") from None
    if not s.device_node_host_path.startswith("/"):
        raise ConfigError(f"mock.device_node_host_path: must be an absolute path, got {s.device_node_host_path!r}")
    if len(str(s.control_socket).encode()) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"mock.control_socket: {str(s.control_socket)!r} is longer than the {MAX_SOCKET_PATH_BYTES} bytes "
            "a unix socket path may have"
        )
    for i, group in enumerate(s.nvlink_groups):
        _check_indices(f"mock.nvlink_groups[{i}]", group.gpus, s.gpus)
    switch_of: dict[int, int] = {}
    for i, switch in enumerate(s.pcie_switches):
        _check_indices(f"mock.pcie_switches[{i}]", switch, s.gpus)
        for gpu in switch:
            if gpu in switch_of:
                raise ConfigError(f"mock.pcie_switches[{i}]: GPU {gpu} is already behind switch {switch_of[gpu]}")
            switch_of[gpu] = i


def _check_indices(name: str, indices: tuple[int, ...], gpus: int) -> None:
    for gpu in indices:
        if not 0 <= gpu < gpus:
            raise ConfigError(f"{name}: GPU index {gpu} out of range 0..{gpus - 1}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{name}: lists a GPU twice: {list(indices)}")
