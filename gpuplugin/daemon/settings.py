"""Settings of the whole plugin, from the command line, the environment and a config file, in that precedence."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta

from gpuplugin.core.config import MAX_CONFIG_BYTES, AbsolutePath, Section, Text, decode, decode_config, parse_config
from gpuplugin.core.errors import ConfigError
from gpuplugin.daemon.logs import LogFormat
from gpuplugin.daemon.manager import ManagerSettings
from gpuplugin.daemon.probes import ListenAddress, ProbeSettings
from gpuplugin.devices.cdi import CdiSettings
from gpuplugin.devices.health import MAX_PROBE_RETRY_S, MAX_QUIET_PERIOD_S, MAX_XID, HealthPolicy
from gpuplugin.devices.sharing import ResourceSection, TimeSlicing, TimeSlicingSection
from gpuplugin.devices.strategies import DeviceListStrategy

if TYPE_CHECKING:
    from gpuplugin.devices.mps import MpsSharing

__all__ = ["MAX_CONFIG_BYTES", "ConfigError", "Overrides", "PluginSettings", "decode_config", "parse_config", "resolve"]

LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """Everything ``gpuplugin serve`` needs."""

    backend: str = "mock"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    """The chosen backend's section of the config file, with its command-line flags on top."""
    manager: ManagerSettings = field(default_factory=ManagerSettings)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    log_format: LogFormat = "auto"
    log_level: str = "info"
    state_dir: Path = Path("/run/gpuplugin")
    """Sockets and files that live as long as the process (the mock backend's control socket)."""
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    sharing: TimeSlicing | None = None
    """Time-slicing replicas (``sharing.timeSlicing``); None: every device served once."""
    mps: MpsSharing | None = None
    """MPS replicas with enforced limits (``sharing.mps``, with ``flags.mpsRoot``); None: no MPS sharing."""
    strategies: DeviceListStrategy = field(default_factory=DeviceListStrategy)
    """How Allocate names devices to the runtime (``flags.plugin.deviceListStrategy``)."""
    cdi: CdiSettings = field(default_factory=CdiSettings)
    instance_wait_s: float | None = None
    """How long (seconds, 0 or more) to wait for another instance's lock on the state directory; None: as long as
    it takes (a rollout's new pod takes over when the old one stops), 0: exit at once with one line."""


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line or in the environment (click resolves those two); None means not given."""

    backend: str | None = None
    kubelet_dir: Path | None = None
    log_format: str | None = None
    log_level: str | None = None
    state_dir: Path | None = None
    metrics_address: str | None = None
    mig_strategy: str | None = None
    device_list_strategy: str | None = None
    """Comma-separated, as NVIDIA's ``--device-list-strategy``."""
    instance_wait_s: float | None = None
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per backend name: the options its own flags set; only the chosen backend's apply."""


def read_config(path: Path) -> str:
    """Read a config file (blocking: before the event loop starts); ConfigError naming the file if it cannot be."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return decode_config(data, str(path))


Xid = Annotated[int, Meta(ge=0, le=MAX_XID)]


MigStrategy = Literal["none", "single", "mixed"]
MIG_STRATEGIES: tuple[str, ...] = get_args(MigStrategy)


class PluginSection(Section):
    """``plugin``: where the plugin talks to the kubelet, what it logs and where it serves its probes."""

    kubelet_dir: AbsolutePath | None = None
    log_format: LogFormat | None = None
    log_level: Text | None = None
    """One of LOG_LEVELS in any case; checked once merged with ``--log-level``."""
    state_dir: AbsolutePath | None = None
    metrics_address: Text | None = None
    """``HOST:PORT``, or ``-`` for no probe server."""
    plugins_registry_dir: AbsolutePath | None = None


class BackendSection(msgspec.Struct, kw_only=True):
    """``backend``: which backend, and each backend's own section under its name, read by that backend. Other keys
    are let through: a backend installed by entry point reads a section of its own name."""

    name: Text = "mock"
    mock: dict[str, Any] | None = None
    nvml: dict[str, Any] | None = None
    partitioned: dict[str, Any] | None = None


class HealthSection(Section):
    """``health``: which XIDs count, how long a recoverable GPU stays quiet, or no checks at all."""

    ignored_xids: frozenset[Xid] | None = None
    fatal_xids: frozenset[Xid] | None = None
    enabled_xids: frozenset[Xid] | None = None
    recovery_quiet_period_seconds: Annotated[float, Meta(ge=0, le=MAX_QUIET_PERIOD_S)] | None = None
    probe_retry_first_seconds: Annotated[float, Meta(gt=0, le=MAX_PROBE_RETRY_S)] | None = None
    probe_retry_max_seconds: Annotated[float, Meta(gt=0, le=MAX_PROBE_RETRY_S)] | None = None
    enabled: bool = True


class AllocationSection(Section):
    """``allocation``: the default policy of shared devices (time-slicing, MPS and partitions)."""

    policy: Literal["distributed", "packed"] | None = None


class PluginFlags(Section):
    """NVIDIA's ``flags.plugin``; the device-list and CDI keys are read by their own settings."""

    pass_device_specs: bool | None = None
    device_list_strategy: Any = None
    device_id_strategy: Text | None = msgspec.field(default=None, name="deviceIDStrategy")
    cdi_annotation_prefix: Any = None
    cdi_vendor: Any = None
    cdi_spec_dir: Any = None
    cdi_spec_format: Any = None
    # Accepted so that NVIDIA's files load; they configure NVIDIA's own tooling, which we do not run.
    nvidia_ctk_path: Any = msgspec.field(default=None, name="nvidiaCTKPath")
    container_driver_root: Any = None


class Flags(Section):
    """NVIDIA's ``flags``; ``gfd`` is accepted so that NVIDIA's files load (feature discovery is not ours)."""

    mig_strategy: MigStrategy | None = None
    fail_on_init_error: bool | None = None
    nvidia_driver_root: AbsolutePath | None = None
    nvidia_dev_root: AbsolutePath | None = None
    plugin: PluginFlags | None = None
    gfd: Any = None
    mps_root: AbsolutePath | None = None


class SharingSection(Section):
    """NVIDIA's ``sharing``: one of ``timeSlicing`` and ``mps``; ``mps`` is read by MpsSharing, whose module (and
    its daemons' machinery) is imported only when MPS sharing is configured."""

    time_slicing: TimeSlicingSection[ResourceSection] | None = None
    mps: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.mps is not None and self.time_slicing is not None:
            raise ConfigError.at("mps", "cannot be combined with sharing.timeSlicing; choose one")


class ConfigFile(Section):
    """A whole config file: ours, and NVIDIA's v1 sections that we read (``flags``, ``sharing``)."""

    version: Literal["v1"] = "v1"
    plugin: PluginSection | None = None
    backend: BackendSection | None = None
    health: HealthSection | None = None
    allocation: AllocationSection | None = None
    flags: Flags | None = None
    sharing: SharingSection | None = None


#: NVIDIA's sections we do not implement, with what to use instead.
_UNSUPPORTED = {
    "resources": "renaming by pattern is not supported; use sharing.timeSlicing.resources[].rename",
    "imex": "IMEX channels are not supported",
}


def resolve(overrides: Overrides, config: Mapping[str, Any], env: Mapping[str, str], source: str) -> PluginSettings:
    """Merge: command line and environment first, then the config file, then the defaults."""
    for key in config:
        if key in _UNSUPPORTED:
            raise ConfigError(f"{source}: {key}: {_UNSUPPORTED[key]}")
    file = decode(config, ConfigFile, source=source)
    plugin = file.plugin or PluginSection()
    flags = file.flags or Flags()
    defaults = PluginSettings()
    server = defaults.manager.server
    log_level = overrides.log_level or plugin.log_level or defaults.log_level
    if log_level.lower() not in LOG_LEVELS:
        option = "--log-level" if overrides.log_level else f"{source}: plugin.logLevel"
        raise ConfigError(f"{option}: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = overrides.log_format or plugin.log_format or defaults.log_format
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    address_text = overrides.metrics_address or plugin.metrics_address or "-"
    option = "--metrics-address" if overrides.metrics_address else f"{source}: plugin.metricsAddress"
    address = ListenAddress.parse(address_text, option) if address_text != "-" else None
    with _prefixed(source):
        health = _health(file.health or HealthSection()).with_env(env)
    policy = (file.allocation or AllocationSection()).policy
    backend, options = _backend(overrides, file, policy)
    # The sections below are read by their own settings, which name the field but not the file.
    plugin_flags = dict((config.get("flags") or {}).get("plugin") or {})
    if overrides.device_list_strategy is not None:
        plugin_flags["deviceListStrategy"] = overrides.device_list_strategy
    sharing = file.sharing or SharingSection()
    time_slicing = sharing.time_slicing
    if time_slicing is not None and time_slicing.allocation_policy is None:
        time_slicing = msgspec.structs.replace(time_slicing, allocation_policy=policy)
    mps = sharing.mps if sharing.mps is None or policy is None else {"allocationPolicy": policy, **sharing.mps}
    with _prefixed(source):
        return PluginSettings(
            backend=backend,
            backend_options=options,
            probes=ProbeSettings(address=address),
            manager=dataclasses.replace(
                defaults.manager,
                server=dataclasses.replace(
                    server,
                    kubelet_dir=overrides.kubelet_dir or Path(plugin.kubelet_dir or server.kubelet_dir),
                    plugins_registry_dir=Path(plugin.plugins_registry_dir or server.plugins_registry_dir),
                ),
            ),
            health=health,
            log_format=log_format,
            log_level=log_level.lower(),
            state_dir=overrides.state_dir or Path(plugin.state_dir or defaults.state_dir),
            sharing=None if time_slicing is None else TimeSlicing.from_section(time_slicing, "sharing.timeSlicing"),
            mps=None if mps is None else _mps(mps, flags),
            strategies=DeviceListStrategy.from_mapping(plugin_flags, "flags.plugin"),
            cdi=CdiSettings.from_mapping(plugin_flags, "flags.plugin"),
            instance_wait_s=overrides.instance_wait_s,
        )


def _backend(overrides: Overrides, file: ConfigFile, shared_policy: str | None) -> tuple[str, dict[str, Any]]:
    """The backend's name and options: its config section, NVIDIA's flags for NVML, then command-line flags."""
    section = file.backend or BackendSection()
    flags = file.flags or Flags()
    plugin_flags = flags.plugin or PluginFlags()
    backend = overrides.backend or section.name
    raw = getattr(section, backend, None) if backend in _BUILT_IN else None
    options = dict(raw or {})
    nvml_flags = {
        key: value
        for key, value in (
            ("fail_on_init_error", flags.fail_on_init_error),
            ("driver_root", flags.nvidia_driver_root),
            ("device_root", flags.nvidia_dev_root),
            ("pass_device_specs", plugin_flags.pass_device_specs),
            ("device_id_strategy", plugin_flags.device_id_strategy),
        )
        if value is not None
    }
    mig = overrides.mig_strategy or flags.mig_strategy or "none"
    if mig not in MIG_STRATEGIES:
        raise ConfigError(f"--mig-strategy: must be one of {', '.join(MIG_STRATEGIES)}, got {mig!r}")
    if backend == "nvml" and mig != "none":
        # NVIDIA's migStrategy on the NVML backend: serve MIG devices, keep MIG-disabled GPUs whole.
        backend, options = (
            "partitioned",
            {"parent": "nvml", "parent_options": options, "strategy": mig, "layout": "none"},
        )
    if backend == "nvml":
        return backend, {**nvml_flags, **options, **overrides.backend_options.get("nvml", {})}
    if backend == "partitioned":
        parent = str(options.get("parent", "mock"))
        parent_options = options.get("parent_options") or {}
        if not isinstance(parent_options, dict):
            raise ConfigError("backend.partitioned.parent_options: must be a mapping")
        options["parent_options"] = {
            **(nvml_flags if parent == "nvml" else {}),
            **parent_options,
            **overrides.backend_options.get(parent, {}),
        }
        if shared_policy is not None:
            options.setdefault("allocation_policy", shared_policy)
        return backend, {**options, **overrides.backend_options.get("partitioned", {})}
    return backend, {**options, **overrides.backend_options.get(backend, {})}


#: Backends whose sections the schema names; another backend's section is its own business.
_BUILT_IN = frozenset(f.encode_name for f in msgspec.structs.fields(BackendSection)) - {"name"}


def _mps(section: dict[str, Any], flags: Flags) -> MpsSharing:
    from gpuplugin.devices.mps import MpsSharing  # here: only MPS sharing needs it (daemons, subprocesses: ~10 ms)

    root = None if flags.mps_root is None else Path(flags.mps_root)
    return MpsSharing.from_mapping(section, root=root)


def _health(section: HealthSection) -> HealthPolicy:
    base = HealthPolicy()
    quiet = section.recovery_quiet_period_seconds
    first, longest = section.probe_retry_first_seconds, section.probe_retry_max_seconds
    first_s = base.probe_retry_first_s if first is None else float(first)
    max_s = base.probe_retry_max_s if longest is None else float(longest)
    if first_s > max_s:
        raise ConfigError.at(
            "health.probeRetryFirstSeconds", f"must be at most health.probeRetryMaxSeconds ({max_s:g}), got {first_s:g}"
        )
    return HealthPolicy(
        ignored_xids=base.ignored_xids if section.ignored_xids is None else section.ignored_xids,
        fatal_xids=base.fatal_xids if section.fatal_xids is None else section.fatal_xids,
        forced_xids=base.forced_xids if section.enabled_xids is None else section.enabled_xids,
        recovery_quiet_period_s=base.recovery_quiet_period_s if quiet is None else float(quiet),
        probe_retry_first_s=first_s,
        probe_retry_max_s=max_s,
        checks_enabled=section.enabled,
    )


@contextlib.contextmanager
def _prefixed(source: str) -> Iterator[None]:
    """Name the file in errors raised by the sections' own parsers."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
