"""Settings of the whole plugin, from the command line, the environment and a config file, in that precedence."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuplugin.core.errors import ConfigError, config_key
from gpuplugin.core.limits import MAX_CONFIG_VALUES, within_values
from gpuplugin.daemon.logs import LogFormat
from gpuplugin.daemon.manager import ManagerSettings
from gpuplugin.daemon.probes import ListenAddress, ProbeSettings
from gpuplugin.devices.cdi import CdiSettings
from gpuplugin.devices.health import MAX_QUIET_PERIOD_S, MAX_XID, HealthPolicy
from gpuplugin.devices.mps import MpsSharing, absolute_path
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.devices.strategies import DeviceListStrategy

__all__ = ["MAX_CONFIG_BYTES", "ConfigError", "Overrides", "PluginSettings", "decode_config", "parse_config", "resolve"]

CONFIG_VERSION = "v1"
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: The largest config file read: what a Kubernetes ConfigMap holds (1 MiB). A larger file is refused unread.
MAX_CONFIG_BYTES = 1024 * 1024


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


def decode_config(data: bytes, source: str) -> str:
    """The text of a config file read as at most ``MAX_CONFIG_BYTES + 1`` bytes; ConfigError if too big or not
    UTF-8."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes (1 MiB, what a ConfigMap holds)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None


def read_config(path: Path) -> str:
    """Read a config file (blocking: before the event loop starts); ConfigError naming the file if it cannot be."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return decode_config(data, str(path))


def parse_config(text: str, source: str) -> dict[str, Any]:
    """Parse and check the top level of a config file."""
    import yaml  # here: a plugin started without a config file never pays for it (1 MB, tens of ms)

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(data).__name__}")
    if not within_values(data, MAX_CONFIG_VALUES):
        raise ConfigError(f"{source}: holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are expanded")
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{source}: version: must be {CONFIG_VERSION!r}, got {version!r}")
    return data


#: Top-level sections: ours, and NVIDIA's v1 ones that we read (``flags``, ``sharing``).
_SECTIONS = {"version", "plugin", "backend", "health", "allocation", "flags", "sharing"}
#: NVIDIA's sections we do not implement, with what to use instead.
_UNSUPPORTED = {
    "resources": "renaming by pattern is not supported; use sharing.timeSlicing.resources[].rename",
    "imex": "IMEX channels are not supported",
}
_FLAGS = {"migStrategy", "failOnInitError", "nvidiaDriverRoot", "nvidiaDevRoot", "plugin", "gfd", "mpsRoot"}
_PLUGIN_FLAGS = {
    "passDeviceSpecs",
    "deviceListStrategy",
    "deviceIDStrategy",
    "cdiAnnotationPrefix",
    "cdiVendor",
    "cdiSpecDir",
    "cdiSpecFormat",
    # Accepted so that NVIDIA's files load; they configure NVIDIA's own tooling, which we do not run.
    "nvidiaCTKPath",
    "containerDriverRoot",
}
MIG_STRATEGIES = ("none", "single", "mixed")
SHARED_POLICIES = ("distributed", "packed")


def resolve(overrides: Overrides, config: Mapping[str, Any], env: Mapping[str, str], source: str) -> PluginSettings:
    """Merge: command line and environment first, then the config file, then the defaults."""
    for key in config:
        if key in _UNSUPPORTED:
            raise ConfigError(f"{source}: {key}: {_UNSUPPORTED[key]}")
    _no_unknown(config, _SECTIONS, source, "")
    plugin = _section(config, "plugin", source)
    _no_unknown(plugin, _PLUGIN_SECTION, source, "plugin")
    defaults = PluginSettings()
    kubelet_dir = overrides.kubelet_dir or _path(plugin, "kubeletDir", source, str(defaults.manager.server.kubelet_dir))
    log_level = overrides.log_level or _str(plugin, "logLevel", source, "plugin", defaults.log_level)
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{source}: plugin.logLevel: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = overrides.log_format or _str(plugin, "logFormat", source, "plugin", defaults.log_format)
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: plugin.logFormat: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    state_dir = overrides.state_dir or _path(plugin, "stateDir", source, str(defaults.state_dir))
    registry_dir = _path(plugin, "pluginsRegistryDir", source, str(defaults.manager.server.plugins_registry_dir))
    health = _health(_section(config, "health", source), source).with_env(env)
    address_text = overrides.metrics_address or _str(plugin, "metricsAddress", source, "plugin", "-")
    option = "--metrics-address" if overrides.metrics_address else f"{source}: plugin.metricsAddress"
    address = ListenAddress.parse(address_text, option) if address_text != "-" else None
    flags = _section(config, "flags", source)
    _no_unknown(flags, _FLAGS, source, "flags")
    plugin_flags = dict(_section(flags, "plugin", source, "flags"))
    _no_unknown(plugin_flags, _PLUGIN_FLAGS, source, "flags.plugin")
    if overrides.device_list_strategy is not None:
        plugin_flags["deviceListStrategy"] = overrides.device_list_strategy
    shared_policy = _choice(_section(config, "allocation", source), "policy", SHARED_POLICIES, source, "allocation")
    backend, options = _backend(overrides, config, flags, plugin_flags, shared_policy, source)
    with _prefixed(source):
        sharing = _time_slicing(_section(config, "sharing", source), shared_policy, source)
        mps = _mps(_section(config, "sharing", source), flags, shared_policy)
        strategies = DeviceListStrategy.from_mapping(plugin_flags, "flags.plugin")
        cdi = CdiSettings.from_mapping(plugin_flags, "flags.plugin")
    return PluginSettings(
        backend=backend,
        probes=ProbeSettings(address=address),
        backend_options=options,
        manager=dataclasses.replace(
            defaults.manager,
            server=dataclasses.replace(
                defaults.manager.server, kubelet_dir=kubelet_dir, plugins_registry_dir=registry_dir
            ),
        ),
        health=health,
        log_format=log_format,
        log_level=log_level.lower(),
        state_dir=state_dir,
        sharing=sharing,
        mps=mps,
        strategies=strategies,
        cdi=cdi,
        instance_wait_s=overrides.instance_wait_s,
    )


_PLUGIN_SECTION = {"kubeletDir", "logFormat", "logLevel", "stateDir", "metricsAddress", "pluginsRegistryDir"}


def _backend(
    overrides: Overrides,
    config: Mapping[str, Any],
    flags: Mapping[str, Any],
    plugin_flags: Mapping[str, Any],
    shared_policy: str | None,
    source: str,
) -> tuple[str, dict[str, Any]]:
    """The backend's name and options: its config section, NVIDIA's flags for NVML, then command-line flags."""
    section = _section(config, "backend", source)
    backend = overrides.backend or _str(section, "name", source, "backend", "mock")
    options = dict(_section(section, backend, source, "backend"))
    nvml_flags = {
        key: value
        for key, value in (
            ("fail_on_init_error", flags.get("failOnInitError")),
            ("driver_root", flags.get("nvidiaDriverRoot")),
            ("device_root", flags.get("nvidiaDevRoot")),
            ("pass_device_specs", plugin_flags.get("passDeviceSpecs")),
            ("device_id_strategy", plugin_flags.get("deviceIDStrategy")),
        )
        if value is not None
    }
    mig = overrides.mig_strategy or flags.get("migStrategy", "none")
    if mig not in MIG_STRATEGIES:
        raise ConfigError(f"{source}: flags.migStrategy: must be one of {', '.join(MIG_STRATEGIES)}, got {mig!r}")
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
            raise ConfigError(f"{source}: backend.partitioned.parent_options: must be a mapping")
        options["parent_options"] = {
            **(nvml_flags if parent == "nvml" else {}),
            **parent_options,
            **overrides.backend_options.get(parent, {}),
        }
        if shared_policy is not None:
            options.setdefault("allocation_policy", shared_policy)
        return backend, {**options, **overrides.backend_options.get("partitioned", {})}
    return backend, {**options, **overrides.backend_options.get(backend, {})}


def _time_slicing(sharing: Mapping[str, Any], shared_policy: str | None, source: str) -> TimeSlicing | None:
    _no_unknown(sharing, {"timeSlicing", "mps"}, source, "sharing")
    if sharing.get("mps") is not None and sharing.get("timeSlicing") is not None:
        raise ConfigError.at("sharing.mps", "cannot be combined with sharing.timeSlicing; choose one")
    section = sharing.get("timeSlicing")
    if section is None:
        return None
    if shared_policy is not None and isinstance(section, dict):
        section = {"allocationPolicy": shared_policy, **section}
    return TimeSlicing.from_mapping(section, "sharing.timeSlicing")


def _mps(sharing: Mapping[str, Any], flags: Mapping[str, Any], shared_policy: str | None) -> MpsSharing | None:
    section = sharing.get("mps")
    if section is None:
        return None
    if shared_policy is not None and isinstance(section, dict):
        section = {"allocationPolicy": shared_policy, **section}
    root = flags.get("mpsRoot")
    return MpsSharing.from_mapping(section, root=None if root is None else absolute_path(root, "flags.mpsRoot"))


@contextlib.contextmanager
def _prefixed(source: str) -> Iterator[None]:
    """Name the file in errors raised by the sections' own parsers."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _path(plugin: Mapping[str, Any], key: str, source: str, default: str) -> Path:
    """A directory from the file: absolute, since the daemon's working directory means nothing on a node."""
    text = _str(plugin, key, source, "plugin", default)
    if not text.startswith("/") or "\0" in text:
        raise ConfigError(f"{source}: plugin.{key}: must be an absolute path, got {text!r}")
    return Path(text)


def _choice(section: Mapping[str, Any], key: str, choices: tuple[str, ...], source: str, path: str) -> str | None:
    _no_unknown(section, {key}, source, path)
    value = section.get(key)
    if value is not None and value not in choices:
        raise ConfigError(f"{source}: {path}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _health(section: Mapping[str, Any], source: str) -> HealthPolicy:
    base = HealthPolicy()
    known = {"ignoredXids", "fatalXids", "enabledXids", "recoveryQuietPeriodSeconds", "enabled"}
    _no_unknown(section, known, source, "health")
    quiet = section.get("recoveryQuietPeriodSeconds", base.recovery_quiet_period_s)
    # ``not <=``: NaN fails it too.
    if not isinstance(quiet, int | float) or isinstance(quiet, bool) or not 0 <= quiet <= MAX_QUIET_PERIOD_S:
        raise ConfigError(
            f"{source}: health.recoveryQuietPeriodSeconds: must be a number of seconds from 0 to "
            f"{MAX_QUIET_PERIOD_S:g}, got {quiet!r}"
        )
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{source}: health.enabled: must be true or false, got {enabled!r}")
    return HealthPolicy(
        ignored_xids=_xids(section, "ignoredXids", source, base.ignored_xids),
        fatal_xids=_xids(section, "fatalXids", source, base.fatal_xids),
        forced_xids=_xids(section, "enabledXids", source, base.forced_xids),
        recovery_quiet_period_s=float(quiet),
        checks_enabled=enabled,
    )


def _xids(section: Mapping[str, Any], key: str, source: str, default: frozenset[int]) -> frozenset[int]:
    value = section.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_XID for x in value
    ):
        raise ConfigError(f"{source}: health.{key}: must be a list of XID numbers (0 to {MAX_XID}), got {value!r}")
    return frozenset(value)


def _section(parent: Mapping[str, Any], key: str, source: str, path: str = "") -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        name = f"{path}.{key}" if path else key
        raise ConfigError(f"{source}: {name}: must be a mapping, got {type(value).__name__}")
    return value


def _str(section: Mapping[str, Any], key: str, source: str, path: str, default: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {path}.{key}: must be a non-empty string, got {value!r}")
    return value


def _no_unknown(section: Mapping[str, Any], known: set[str], source: str, path: str) -> None:
    unknown = sorted(config_key(k) for k in set(section) - known)
    if unknown:
        name = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{source}: {name}: unknown setting (known: {', '.join(sorted(known))})")
