"""Settings of the mock backend: how many fake GPUs, what they look like and how they are connected."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiofiles

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.limits import MAX_CONFIG_VALUES, within_values
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
#: The largest mock config file read (bytes), as for the plugin's own config.
MAX_CONFIG_BYTES = 1024 * 1024
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
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in options.items():
            key = str(raw_key).replace("-", "_")
            if value is None or key == "config":
                continue
            if key not in known:
                raise ConfigError(f"mock.{key}: unknown setting; known: {', '.join(sorted(known))}")
            values[key] = value

        default = cls()
        gpus = _integer("mock.gpus", values.get("gpus", default.gpus), minimum=1, maximum=MAX_GPUS)
        socket_default = DEFAULT_CONTROL_SOCKET if state_dir is None else Path(state_dir) / "mock.sock"
        groups = values.get("nvlink_groups")
        switches = values.get("pcie_switches")
        return cls(
            gpus=gpus,
            model=_text("mock.model", values.get("model", default.model)),
            memory_mib=_integer(
                "mock.memory_mib", values.get("memory_mib", default.memory_mib), minimum=1, maximum=MAX_MEMORY_MIB
            ),
            resource=_text("mock.resource", values.get("resource", default.resource)),
            node_name=_text("mock.node_name", values.get("node_name", env.get("NODE_NAME") or default.node_name)),
            numa_nodes=_integer(
                "mock.numa_nodes", values.get("numa_nodes", default.numa_nodes), minimum=1, maximum=MAX_NUMA_NODES
            ),
            nvlink_groups=(NVLinkGroup(tuple(range(gpus))),) if groups is None else _nvlink_groups(groups),
            pcie_switches=even_pairs(gpus) if switches is None else _index_lists("mock.pcie_switches", switches),
            control_socket=Path(_text("mock.control_socket", values.get("control_socket", socket_default))),
            device_node_host_path=_text(
                "mock.device_node_host_path", values.get("device_node_host_path", default.device_node_host_path)
            ),
        )


async def load_settings(options: Mapping[str, Any], *, state_dir: Path | None = None) -> MockSettings:
    """Settings from the YAML file named by option ``config`` (if any), overridden by the other options."""
    path = options.get("config")
    if path is None:
        return MockSettings.from_options(options, state_dir=state_dir)
    try:
        async with aiofiles.open(Path(path), "rb") as f:
            data = await f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"mock.config: cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"mock.config: {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"mock.config: {path} is not UTF-8 text (byte {e.start})") from None
    import yaml  # here: a mock without a config file never loads it

    try:
        loaded = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"mock.config: {path} is nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"mock.config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"mock.config: {path} must hold a mapping of mock settings, got {type(loaded).__name__}")
    if not within_values(loaded, MAX_CONFIG_VALUES):
        raise ConfigError(
            f"mock.config: {path} holds more than {MAX_CONFIG_VALUES} values once its aliases are expanded"
        )
    return MockSettings.from_options({**loaded, **options}, state_dir=state_dir)


def _integer(name: str, value: object, *, minimum: int, maximum: int = MAX_GPUS - 1) -> int:
    """An integer from ``minimum`` to ``maximum``; the default maximum is a GPU index's."""
    # Command-line flags arrive as text; YAML gives ints. bool is an int to Python, never to an operator.
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdecimal() and len(value.strip()) <= 20:
        number = int(value.strip())
    if number is None or not minimum <= number <= maximum:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else repr(value[:40] + "…")
        raise ConfigError(f"{name}: must be an integer from {minimum} to {maximum}, got {shown}")
    return number


def _text(name: str, value: object) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: must be a non-empty string, got {value!r}")
    return value


def _sequence(name: str, value: object, maximum: int = MAX_GPUS) -> Sequence[object]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"{name}: must be a list, got {type(value).__name__}")
    if len(value) > maximum:
        raise ConfigError(f"{name}: has {len(value)} entries, at most {maximum}")
    return value


def _index_lists(name: str, value: object) -> tuple[tuple[int, ...], ...]:
    return tuple(
        tuple(_integer(f"{name}[{i}][{j}]", gpu, minimum=0) for j, gpu in enumerate(_sequence(f"{name}[{i}]", group)))
        for i, group in enumerate(_sequence(name, value))
    )


def _nvlink_groups(value: object) -> tuple[NVLinkGroup, ...]:
    groups: list[NVLinkGroup] = []
    for i, group in enumerate(_sequence("mock.nvlink_groups", value, MAX_NVLINK_GROUPS)):
        name = f"mock.nvlink_groups[{i}]"
        links: object = DEFAULT_NVLINKS
        if isinstance(group, Mapping):
            unknown = set(group) - {"gpus", "links"}
            if unknown:
                raise ConfigError(f"{name}: unknown keys {sorted(map(str, unknown))}; known: gpus, links")
            if "gpus" not in group:
                raise ConfigError(f"{name}.gpus: missing; a group is a list of GPU indices or {{gpus, links}}")
            links = group.get("links", DEFAULT_NVLINKS)
            group, name = group["gpus"], f"{name}.gpus"
        gpus = tuple(_integer(f"{name}[{j}]", gpu, minimum=0) for j, gpu in enumerate(_sequence(name, group)))
        groups.append(
            NVLinkGroup(gpus, _integer(f"mock.nvlink_groups[{i}].links", links, minimum=1, maximum=MAX_NVLINKS))
        )
    return tuple(groups)


def _check_settings(s: MockSettings) -> None:
    """Checks that hold however the settings were built (from options or in code)."""
    _integer("mock.gpus", s.gpus, minimum=1, maximum=MAX_GPUS)
    _integer("mock.memory_mib", s.memory_mib, minimum=1, maximum=MAX_MEMORY_MIB)
    _integer("mock.numa_nodes", s.numa_nodes, minimum=1, maximum=MAX_NUMA_NODES)
    if len(s.nvlink_groups) > MAX_NVLINK_GROUPS:
        raise ConfigError(f"mock.nvlink_groups: has {len(s.nvlink_groups)} groups, at most {MAX_NVLINK_GROUPS}")
    for name in ("model", "node_name", "device_node_host_path"):
        _text(f"mock.{name}", getattr(s, name))
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
        _integer(f"mock.nvlink_groups[{i}].links", group.links, minimum=1, maximum=MAX_NVLINKS)
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
