"""Settings of the whole plugin, from the command line, the environment and a config file, in that precedence."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpuplugin.health import HealthPolicy, HealthPolicyError
from gpuplugin.logs import LogFormat
from gpuplugin.manager import ManagerSettings

CONFIG_VERSION = "v1"
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A setting is wrong; the message names it and what was expected. Retrying does not help."""


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


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line or in the environment (click resolves those two); None means not given."""

    backend: str | None = None
    kubelet_dir: Path | None = None
    log_format: str | None = None
    log_level: str | None = None
    state_dir: Path | None = None
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per backend name: the options its own flags set; only the chosen backend's apply."""


def parse_config(text: str, source: str) -> dict[str, Any]:
    """Parse and check the top level of a config file."""
    try:
        data = yaml.safe_load(text)
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
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{source}: version: must be {CONFIG_VERSION!r}, got {version!r}")
    return data


def resolve(overrides: Overrides, config: Mapping[str, Any], env: Mapping[str, str], source: str) -> PluginSettings:
    """Merge: command line and environment first, then the config file, then the defaults."""
    plugin = _section(config, "plugin", source)
    backend_section = _section(config, "backend", source)
    backend = overrides.backend or _str(backend_section, "name", source, "backend", "mock")
    options = {**_section(backend_section, backend, source, "backend"), **overrides.backend_options.get(backend, {})}
    defaults = PluginSettings()
    kubelet_dir = overrides.kubelet_dir or Path(
        _str(plugin, "kubeletDir", source, "plugin", str(defaults.manager.server.kubelet_dir))
    )
    log_level = overrides.log_level or _str(plugin, "logLevel", source, "plugin", defaults.log_level)
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{source}: plugin.logLevel: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = overrides.log_format or _str(plugin, "logFormat", source, "plugin", defaults.log_format)
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: plugin.logFormat: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    state_dir = overrides.state_dir or Path(_str(plugin, "stateDir", source, "plugin", str(defaults.state_dir)))
    try:
        health = _health(_section(config, "health", source), source).with_env(env)
    except HealthPolicyError as exc:
        raise ConfigError(str(exc)) from None
    return PluginSettings(
        backend=backend,
        backend_options=options,
        manager=dataclasses.replace(
            defaults.manager, server=dataclasses.replace(defaults.manager.server, kubelet_dir=kubelet_dir)
        ),
        health=health,
        log_format=log_format,
        log_level=log_level.lower(),
        state_dir=state_dir,
    )


def _health(section: Mapping[str, Any], source: str) -> HealthPolicy:
    base = HealthPolicy()
    known = {"ignoredXids", "fatalXids", "enabledXids", "recoveryQuietPeriodSeconds", "enabled"}
    _no_unknown(section, known, source, "health")
    quiet = section.get("recoveryQuietPeriodSeconds", base.recovery_quiet_period_s)
    if not isinstance(quiet, int | float) or isinstance(quiet, bool) or quiet < 0:
        raise ConfigError(f"{source}: health.recoveryQuietPeriodSeconds: must be a number ≥ 0, got {quiet!r}")
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
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ConfigError(f"{source}: health.{key}: must be a list of XID numbers, got {value!r}")
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
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{source}: {path}.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
