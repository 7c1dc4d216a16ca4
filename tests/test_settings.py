"""Settings: defaults, the config file, command-line and environment overrides, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuplugin.cli import main
from gpuplugin.daemon.settings import (
    AllocationSection,
    ConfigError,
    Flags,
    HealthSection,
    Overrides,
    PluginSection,
    PluginSettings,
    SharingSection,
    parse_config,
    resolve,
)
from gpuplugin.devices.health import DEFAULT_FATAL_XIDS, DEFAULT_IGNORED_XIDS, HealthPolicy, XidAction

SOURCE = "test.yaml"


def settings_from(text: str, overrides: Overrides | None = None, env: dict[str, str] | None = None) -> PluginSettings:
    return resolve(overrides or Overrides(), parse_config(text, SOURCE), env or {}, SOURCE)


@pytest.mark.parametrize("text", ["", "# nothing\n", "version: v1\n"])
def test_defaults(text: str) -> None:
    """An empty file, or none at all, gives the defaults: mock backend, the kubelet's directory, NVIDIA's XIDs."""
    settings = settings_from(text)
    assert settings == resolve(Overrides(), {}, {}, SOURCE)
    assert settings.backend == "mock"
    assert dict(settings.backend_options) == {}
    assert settings.manager.server.kubelet_dir == Path("/var/lib/kubelet/device-plugins")
    assert settings.log_format == "auto"
    assert settings.log_level == "info"
    assert settings.state_dir == Path("/run/gpuplugin")
    assert settings.health == HealthPolicy()
    assert settings.health.ignored_xids == DEFAULT_IGNORED_XIDS
    assert settings.health.fatal_xids == DEFAULT_FATAL_XIDS


FULL = """
version: v1
plugin:
  kubeletDir: /k/device-plugins
  logFormat: json
  logLevel: debug
  stateDir: /s
backend:
  name: nvml
  nvml:
    migStrategy: mixed
    replicas: 4
  mock:
    gpus: 99
health:
  ignoredXids: [13]
  fatalXids: [79, 200]
  enabledXids: [31]
  recoveryQuietPeriodSeconds: 2.5
  enabled: true
"""


def test_file_values() -> None:
    """Every value in the file is used, and only the chosen backend's section becomes its options."""
    settings = settings_from(FULL)
    assert settings.backend == "nvml"
    assert dict(settings.backend_options) == {"migStrategy": "mixed", "replicas": 4}
    assert settings.manager.server.kubelet_dir == Path("/k/device-plugins")
    assert settings.log_format == "json"
    assert settings.log_level == "debug"
    assert settings.state_dir == Path("/s")
    assert settings.health.ignored_xids == {13}
    assert settings.health.fatal_xids == {79, 200}
    assert settings.health.forced_xids == {31}
    assert settings.health.recovery_quiet_period_s == 2.5
    assert settings.health.classify(200) is XidAction.FATAL
    assert settings.health.classify(43) is XidAction.RECOVER


def test_overrides_beat_the_file() -> None:
    """Command-line / environment values beat the file; the chosen backend's flags merge over its section."""
    overrides = Overrides(
        backend="mock",
        kubelet_dir=Path("/other"),
        log_format="console",
        log_level="warning",
        state_dir=Path("/st"),
        backend_options={"mock": {"gpus": 2, "config": Path("/m.yaml")}, "nvml": {"replicas": 1}},
    )
    settings = settings_from(FULL, overrides)
    assert settings.backend == "mock"
    assert dict(settings.backend_options) == {"gpus": 2, "config": Path("/m.yaml")}
    assert settings.manager.server.kubelet_dir == Path("/other")
    assert settings.log_format == "console"
    assert settings.log_level == "warning"
    assert settings.state_dir == Path("/st")
    partial = settings_from(
        "backend:\n  mock:\n    gpus: 8\n    seed: 1\n", Overrides(backend_options={"mock": {"gpus": 3}})
    )
    assert dict(partial.backend_options) == {"gpus": 3, "seed": 1}


def test_other_backends_flags_do_not_apply() -> None:
    """Flags of a backend that is not chosen leave the chosen backend's options alone."""
    settings = settings_from(FULL, Overrides(backend_options={"mock": {"gpus": 3}}))
    assert settings.backend == "nvml"
    assert dict(settings.backend_options) == {"migStrategy": "mixed", "replicas": 4}


def test_env_dp_variables_apply_on_top_of_the_file() -> None:
    """DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS apply on top of the file's health section."""
    env = {"DP_DISABLE_HEALTHCHECKS": "62", "DP_ENABLE_HEALTHCHECKS": "43"}
    health = settings_from(FULL, env=env).health
    assert health.classify(62) is XidAction.IGNORE
    assert health.forced_xids == {31, 43}
    assert not settings_from("", env={"DP_DISABLE_HEALTHCHECKS": "all"}).health.checks_enabled


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("version: v2\n", "version"),
        ("version: 1\n", "version"),
        ("plugin:\n  logFormat: xml\n", "plugin.logFormat"),
        ("plugin:\n  logFormat: ''\n", "plugin.logFormat"),
        ("plugin:\n  kubeletDir: 5\n", "plugin.kubeletDir"),
        ("plugin:\n  stateDir: [a]\n", "plugin.stateDir"),
        ("plugin:\n  logLevel: ''\n", "plugin.logLevel"),
        ("backend:\n  name: 3\n", "backend.name"),
        ("backend:\n  mock: 3\n", "backend.mock"),
        ("health:\n  ignoredXids: 13\n", "health.ignoredXids"),
        ("health:\n  ignoredXids: [13, x]\n", "health.ignoredXids[1]"),
        ("health:\n  ignoredXids: [true]\n", "health.ignoredXids[0]"),
        ("health:\n  fatalXids: [1.5]\n", "health.fatalXids[0]"),
        ("health:\n  enabledXids: {a: 1}\n", "health.enabledXids"),
        ("health:\n  recoveryQuietPeriodSeconds: -1\n", "health.recoveryQuietPeriodSeconds"),
        ("health:\n  recoveryQuietPeriodSeconds: soon\n", "health.recoveryQuietPeriodSeconds"),
        ("health:\n  recoveryQuietPeriodSeconds: true\n", "health.recoveryQuietPeriodSeconds"),
        ("health:\n  enabled: yes please\n", "health.enabled"),
        ("health:\n  probeRetryFirstSeconds: 0\n", "health.probeRetryFirstSeconds"),
        ("health:\n  probeRetryMaxSeconds: 3601\n", "health.probeRetryMaxSeconds"),
        ("health:\n  probeRetryFirstSeconds: 90\n", "health.probeRetryFirstSeconds"),
        ("health:\n  quietPeriod: 3\n", "health.quietPeriod"),
        ("plugin: 3\n", "plugin"),
        ("plugin: [a]\n", "plugin"),
        ("backend: mock\n", "backend"),
        ("health: []\n", "health"),
    ],
)
def test_bad_field_names_the_field(text: str, field: str) -> None:
    """Every bad field is a ConfigError naming the file and the field."""
    with pytest.raises(ConfigError) as caught:
        settings_from(text)
    assert str(caught.value).startswith(f"{SOURCE}: {field}: ")


def test_probe_retry_waits_come_from_the_health_section() -> None:
    """``health.probeRetryFirstSeconds`` and ``probeRetryMaxSeconds`` set the health policy's probe backoff."""
    policy = settings_from("health:\n  probeRetryFirstSeconds: 2\n  probeRetryMaxSeconds: 120\n").health
    assert (policy.probe_retry_first_s, policy.probe_retry_max_s) == (2.0, 120.0)


def test_bad_log_level_names_the_field() -> None:
    """An unknown log level is a ConfigError naming plugin.logLevel."""
    with pytest.raises(ConfigError, match=r"plugin\.logLevel"):
        settings_from("plugin:\n  logLevel: loud\n")


@pytest.mark.parametrize("text", ["a: [1,\n", "- just\n- a list\n", "just a string\n", "plugin: {\n"])
def test_not_a_mapping_or_not_yaml(text: str) -> None:
    """A file that is not YAML, or not a mapping of sections, is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: "):
        parse_config(text, SOURCE)


def run_cli(tmp_path: Path, *args: str, config: str | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``gpuplugin serve`` with a kubelet directory that exists nowhere the plugin could reach."""
    extra: list[str] = []
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(config, encoding="utf-8")
        extra = ["--config", str(path)]
    runner = CliRunner()
    return runner.invoke(
        main, ["serve", "--kubelet-dir", str(tmp_path / "kubelet"), *extra, *args], env=env, catch_exceptions=True
    )


def assert_one_line_error(result: Any, *needles: str) -> None:
    """Exit 2 (a usage error: retrying does not help) with one line on stderr holding each of ``needles``."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ("version: v9\n", "version"),
        ("plugin:\n  logFormat: xml\n", "plugin.logFormat"),
        ("health:\n  ignoredXids: nope\n", "health.ignoredXids"),
        ("health:\n  recoveryQuietPeriodSeconds: -3\n", "health.recoveryQuietPeriodSeconds"),
        ("version: v1\nhealth:\n  recoveryQuietPeriodSeconds: soon\n", "health.recoveryQuietPeriodSeconds"),
        ("health:\n  bogus: 1\n", "health.bogus"),
        ("backend: 7\n", "backend"),
    ],
)
def test_cli_bad_config_is_one_line(tmp_path: Path, config: str, field: str) -> None:
    """`gpuplugin serve --config bad.yaml` exits non-zero with one line naming the field, no traceback."""
    assert_one_line_error(run_cli(tmp_path, config=config), "bad.yaml", f"{field}:")


def test_cli_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    """`gpuplugin serve --config` with invalid YAML exits non-zero with one line naming the file."""
    assert_one_line_error(run_cli(tmp_path, config="a: [1,\nb: 2\n"), "bad.yaml", "not valid YAML")


def test_cli_unknown_backend_is_one_line(tmp_path: Path) -> None:
    """`gpuplugin serve --backend nope` exits non-zero with one line naming the backend, no traceback."""
    assert_one_line_error(run_cli(tmp_path, "--backend", "nope"), "'nope'", "mock")


def test_cli_bad_dp_env_is_one_line(tmp_path: Path) -> None:
    """A bad DP_DISABLE_HEALTHCHECKS exits non-zero with one line naming the variable."""
    result = run_cli(tmp_path, env={"DP_DISABLE_HEALTHCHECKS": "sometimes"})
    assert_one_line_error(result, "DP_DISABLE_HEALTHCHECKS", "sometimes")


def test_cli_missing_config_file_is_one_line(tmp_path: Path) -> None:
    """A config file that cannot be read exits non-zero with one line naming it."""
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "absent.yaml")])
    assert_one_line_error(result, "absent.yaml")


def test_cli_bad_log_level_is_one_line(tmp_path: Path) -> None:
    """`gpuplugin serve --log-level loud` exits non-zero with one line naming the log level, no traceback."""
    assert_one_line_error(run_cli(tmp_path, "--log-level", "loud"), "loud")


@pytest.mark.parametrize("key", ["kubeletDir", "stateDir"])
def test_relative_directories_in_the_file_are_refused(key: str) -> None:
    """A directory in the file must be absolute: a node's working directory means nothing."""
    with pytest.raises(ConfigError, match=f"plugin.{key}: must be an absolute path"):
        resolve(Overrides(), {"plugin": {key: "relative/dir"}}, {}, "cfg.yaml")


#: Every key the plugin's own schema reads, as a path of keys from the top of the file.
SECTIONS: list[tuple[str, type[msgspec.Struct]]] = [
    ("plugin", PluginSection),
    ("health", HealthSection),
    ("allocation", AllocationSection),
    ("flags", Flags),
    ("sharing", SharingSection),
]
SETTING_PATHS = [
    (section, *rest)
    for section, schema in SECTIONS
    for rest in [(), *[(f.encode_name,) for f in msgspec.structs.fields(schema)]]
] + [
    ("version",),
    ("backend", "name"),
    ("flags", "plugin", "deviceListStrategy"),
    ("flags", "plugin", "cdiSpecDir"),
    ("sharing", "timeSlicing", "resources"),
    ("sharing", "mps", "resources"),
    ("sharing", "mps", "daemon"),
]
#: Steps of a path after its section: ``.key``, ``.'odd key'`` (quoted as repr does), ``[0]`` or a mapping's ``[...]``.
STEPS = r"""(?:\.[\w-]+|\.'(?:[^'\\]|\\.)*'|\."(?:[^"\\]|\\.)*"|\[(?:\d+|\.\.\.)\])*"""
#: What YAML can hold: scalars of every kind (NaN and huge numbers too), lists and text-keyed mappings of them.
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(SETTING_PATHS), value=YAML_VALUES)
def test_any_value_anywhere_is_read_or_refused_naming_its_path(path: tuple[str, ...], value: object) -> None:
    """Any value at any setting is either read or a ConfigError whose message names the file, then a path."""
    config: dict[str, Any] = {}
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    try:
        resolve(Overrides(), config, {}, SOURCE)
    except ConfigError as error:
        message = str(error)
    else:
        return
    assert re.match(rf"^{SOURCE}: {path[0]}{STEPS}: \S", message), message
