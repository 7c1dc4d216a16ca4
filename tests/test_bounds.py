"""Bounds: what one resource may serve (its ListAndWatch message must reach the kubelet), every numeric setting's
range, and a config parser that only ever answers with settings or one ConfigError."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.backends.nvml import NvmlSettings
from gpuplugin.backends.partitioned import PartitionedSettings
from gpuplugin.cli import main
from gpuplugin.core.errors import MAX_MESSAGE_CHARS, ConfigError, DevicesRefuseConfig
from gpuplugin.core.limits import (
    KUBELET_MAX_MESSAGE_BYTES,
    LARGE_NUMA_NODE,
    MAX_DEVICE_ENTRY_BYTES,
    MAX_DEVICES_PER_RESOURCE,
    MAX_LIST_MESSAGE_BYTES,
    ResourceTooLarge,
    check_tree,
    device_entry_bytes,
    list_message_bytes,
)
from gpuplugin.core.model import MAX_DEVICE_ID_LENGTH, ContainerSpec, Device, DeviceTree
from gpuplugin.daemon.settings import MAX_CONFIG_BYTES, Overrides, decode_config, parse_config, resolve
from gpuplugin.devices.health import MAX_XID, HealthPolicy
from gpuplugin.devices.sharing import TimeSlicing
from gpuplugin.kubelet.api import v1beta1 as api
from tests.test_settings import STEPS, assert_one_line_error

GPU = "nvidia.com/gpu"
SOURCE = "test.yaml"


def gpus(count: int, resource: str = GPU) -> DeviceTree:
    """``count`` whole GPUs with UUID-like IDs, NUMA node 0 and 1 alternately."""
    return DeviceTree(
        devices=tuple(
            Device(
                id=f"GPU-{i:08d}-0000-0000-0000-000000000000",
                resource=resource,
                gpu=f"GPU-{i:08d}-0000-0000-0000-000000000000",
                spec=ContainerSpec(),
                numa_node=i % 2,
                attributes={"index": str(i)},
            )
            for i in range(count)
        )
    )


def shared(replicas: int, **extra: Any) -> TimeSlicing:
    return TimeSlicing.from_mapping({"resources": [{"name": GPU, "replicas": replicas, **extra}]})


# The ListAndWatch message's size.


@settings(max_examples=200, deadline=None)
@given(
    device_id=st.text(min_size=1, max_size=MAX_DEVICE_ID_LENGTH),
    health=st.sampled_from(["Healthy", "Unhealthy"]),
    numa=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_computed_entry_size_is_the_encoded_size(device_id: str, health: str, numa: int | None) -> None:
    """The size computed for a device is what protobuf encodes for it, for any ID, health and NUMA node."""
    topology = None if numa is None else api.TopologyInfo(nodes=[api.NumaNode(id=numa)])
    message = api.ListAndWatchResponse(devices=[api.Device(id=device_id, health=health, topology=topology)])
    assert device_entry_bytes(device_id, health, numa) == len(bytes(message))


def test_the_most_devices_of_the_longest_ids_encode_within_the_limit() -> None:
    """MAX_DEVICES_PER_RESOURCE unhealthy devices with 63-character IDs encode to at most 2 MiB, half of 4 MiB."""
    worst = api.Device(
        id="x" * MAX_DEVICE_ID_LENGTH, health="Unhealthy", topology=api.TopologyInfo(nodes=[api.NumaNode(id=1023)])
    )
    assert len(bytes(api.ListAndWatchResponse(devices=[worst]))) == MAX_DEVICE_ENTRY_BYTES
    assert device_entry_bytes("x" * MAX_DEVICE_ID_LENGTH, "Unhealthy", LARGE_NUMA_NODE) == MAX_DEVICE_ENTRY_BYTES
    encoded = bytes(api.ListAndWatchResponse(devices=[worst] * MAX_DEVICES_PER_RESOURCE))
    assert len(encoded) <= MAX_LIST_MESSAGE_BYTES <= KUBELET_MAX_MESSAGE_BYTES // 2
    assert MAX_DEVICES_PER_RESOURCE == 24672


def test_a_resource_whose_message_is_too_big_is_refused() -> None:
    """check_tree refuses a resource of too many devices, or of IDs whose bytes overflow the message."""
    assert check_tree(gpus(8)) == gpus(8)
    many = DeviceTree(
        devices=tuple(
            Device(id=f"d{i}", resource=GPU, gpu=f"d{i}", spec=ContainerSpec())
            for i in range(MAX_DEVICES_PER_RESOURCE + 1)
        )
    )
    with pytest.raises(ResourceTooLarge, match=rf"^{GPU}: {MAX_DEVICES_PER_RESOURCE + 1} devices; .* at most"):
        check_tree(many)
    # 4-byte characters: 63 of them take 252 bytes, so fewer devices than the count bound fill the message.
    wide = DeviceTree(
        devices=tuple(
            Device(id=f"{i:06d}" + "😀" * 57, resource=GPU, gpu=str(i), spec=ContainerSpec()) for i in range(9000)
        )
    )
    assert list_message_bytes(wide.devices) > MAX_LIST_MESSAGE_BYTES
    with pytest.raises(ResourceTooLarge, match=r"ListAndWatch message would take \d+ bytes"):
        check_tree(wide)
    assert isinstance(ResourceTooLarge("x"), ConfigError)


# Replicas: bounded before they are built.


def test_replicas_beyond_one_resource_are_refused_at_parse_time() -> None:
    """``replicas: 100000000`` is a ConfigError naming the field and the limit, before any device is known."""
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^sharing\.timeSlicing\.resources\[0\]\.replicas: must be an integer "):
        shared(10**8)
    assert time.perf_counter() - started < 0.1


def test_replicas_times_gpus_are_counted_before_replicas_are_built() -> None:
    """20000 replicas of 8 GPUs (160,000 devices, a 10 MB message) are refused by count, naming the field."""
    sharing = shared(20000)
    started = time.perf_counter()
    with pytest.raises(DevicesRefuseConfig) as caught:
        sharing.apply(gpus(8))
    assert time.perf_counter() - started < 0.1, "refused by counting, not by building 160,000 replicas"
    message = str(caught.value)
    assert message.startswith("sharing.timeSlicing.resources[0].replicas: 8 GPUs with 20000 replicas each make 160000 ")
    assert f"at most {MAX_DEVICES_PER_RESOURCE}" in message and "4 MiB" in message
    assert isinstance(caught.value, ConfigError)


def test_the_largest_replica_count_that_fits_is_served() -> None:
    """Replicas that make exactly MAX_DEVICES_PER_RESOURCE devices are served, and fit the message."""
    per_gpu = MAX_DEVICES_PER_RESOURCE // 8
    tree = check_tree(shared(per_gpu).apply(gpus(8)))
    assert len(tree.devices) == per_gpu * 8
    assert list_message_bytes(tree.devices) <= MAX_LIST_MESSAGE_BYTES


def test_unshared_gpus_of_the_same_name_count_too() -> None:
    """Replicas of GPU 0 plus the whole GPUs left under the same name are counted together, perGpu counts too."""
    sharing = shared(2, perGpu={0: MAX_DEVICES_PER_RESOURCE})
    with pytest.raises(
        DevicesRefuseConfig, match=r"resources\[0\]\.replicas/perGpu: 8 GPUs with up to 24672 replicas each"
    ):
        sharing.apply(gpus(8))
    only_first = shared(MAX_DEVICES_PER_RESOURCE, devices=[0])
    with pytest.raises(
        ConfigError,
        match=r"1 GPU with 24672 replicas each make 24679 devices of nvidia.com/gpu with the 7 unshared ones; ",
    ):
        only_first.apply(gpus(8))
    renamed = TimeSlicing.from_mapping(
        {"resources": [{"name": GPU, "replicas": MAX_DEVICES_PER_RESOURCE, "devices": [0], "rename": "a.com/s"}]}
    )
    assert len(renamed.apply(gpus(8)).devices) == MAX_DEVICES_PER_RESOURCE + 7


# Ranges of numeric settings.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("health:\n  recoveryQuietPeriodSeconds: .nan\n", "health.recoveryQuietPeriodSeconds: must be a number"),
        ("health:\n  recoveryQuietPeriodSeconds: .inf\n", "health.recoveryQuietPeriodSeconds: must be a number"),
        ("health:\n  recoveryQuietPeriodSeconds: 86401\n", "from 0 to 86400, got 86401"),
        ("health:\n  fatalXids: [79, 1024]\n", "health.fatalXids[1]: must be an integer from 0 to 1023, got 1024"),
        ("health:\n  ignoredXids: [-1]\n", "health.ignoredXids[0]: must be an integer from 0 to 1023, got -1"),
        (
            "health:\n  enabledXids: [99999999999]\n",
            "health.enabledXids[0]: must be an integer from 0 to 1023, got 99999999999",
        ),
    ],
)
def test_health_ranges_name_the_field(text: str, message: str) -> None:
    """Quiet periods are finite seconds from 0 to a day; XIDs are 0 to MAX_XID."""
    with pytest.raises(ConfigError) as caught:
        resolve(Overrides(), parse_config(text, SOURCE), {}, SOURCE)
    assert str(caught.value).startswith(f"{SOURCE}: "), str(caught.value)
    assert message in str(caught.value)


def test_the_ends_of_the_health_ranges_are_accepted() -> None:
    """0 s and a day of quiet, XID 0 and MAX_XID are all valid."""
    for quiet in (0, 86400):
        text = f"health:\n  recoveryQuietPeriodSeconds: {quiet}\n  fatalXids: [0, {MAX_XID}]\n"
        policy = resolve(Overrides(), parse_config(text, SOURCE), {}, SOURCE).health
        assert policy.recovery_quiet_period_s == quiet and policy.fatal_xids == {0, MAX_XID}


@pytest.mark.parametrize("value", ["1024", "-1", "9" * 30, "1" * 5000])
def test_xids_from_the_environment_are_bounded(value: str) -> None:
    """DP_ENABLE_HEALTHCHECKS with an XID out of range is refused naming the variable."""
    with pytest.raises(ConfigError, match=r"^DP_ENABLE_HEALTHCHECKS: "):
        HealthPolicy().with_env({"DP_ENABLE_HEALTHCHECKS": value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wait_error_threshold": 0}, "wait_error_threshold: must be an integer from 1 to 1000, got 0$"),
        ({"wait_error_threshold": 1001}, "wait_error_threshold: must be an integer from 1 to 1000, got 1001$"),
        ({"event_wait_timeout_ms": 10001}, "event_wait_timeout_ms: must be an integer from 1 to 10000, got 10001$"),
        (
            {"rediscover_backoff_max_s": 3601},
            "rediscover_backoff_max_s: must be a number above 0 and at most 3600, got 3601$",
        ),
        ({"retry_backoff_initial_s": 0}, "retry_backoff_initial_s: must be a number above 0 and at most 3600, got 0$"),
        (
            {"retry_backoff_initial_s": "nan"},
            "retry_backoff_initial_s: must be a number above 0 and at most 3600, got 'nan'$",
        ),
        (
            {"retry_backoff_initial_s": 90},
            r"retry_backoff_initial_s: 90 must be at most rediscover_backoff_max_s \(60\)$",
        ),
    ],
)
def test_nvml_ranges_name_the_field(options: dict[str, Any], message: str) -> None:
    """Every numeric NVML setting has a range, and leaving it names the setting."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        NvmlSettings.from_options(options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layout": {"1g.18gb": 10**9}}, r"partitioned.layout.1g.18gb: must be a count from 0 to 7, got 1000000000"),
        ({"layout": {"1g.18gb": 4, "2g.35gb": 4}}, r"partitioned.layout: 8 partitions; a GPU holds at most 7"),
        ({"layout": ["1g.18gb"] * 100000}, r"partitioned.layout: 100000 partitions"),
        ({"layout": ",".join(["1g.18gb"] * 8)}, r"partitioned.layout: 8 partitions"),
        ({"layouts": dict.fromkeys(range(1025), "none")}, r"partitioned.layouts: has 1025 entries, at most 1024"),
    ],
)
def test_partition_counts_are_bounded(options: dict[str, Any], message: str) -> None:
    """A layout holds at most 7 partitions (MIG's limit), refused before a huge count is multiplied out."""
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"^{message}"):
        PartitionedSettings.from_options(options)
    assert time.perf_counter() - started < 0.5


# The config file itself.


def test_a_config_that_is_not_utf8_or_too_big_is_a_config_error() -> None:
    """Bytes that are not UTF-8, or more than a ConfigMap holds, are a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: not UTF-8 text \(byte 12 is 0xff\)"):
        decode_config(b"version: v1\n\xff: 1\n", SOURCE)
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: larger than {MAX_CONFIG_BYTES} bytes"):
        decode_config(b"#" * (MAX_CONFIG_BYTES + 1), SOURCE)
    assert decode_config("version: v1 # é\n".encode(), SOURCE) == "version: v1 # é\n"


def test_a_huge_value_in_an_error_is_cut_to_one_short_line(tmp_path: Path) -> None:
    """A megabyte-long bad value is quoted cut, so the error stays one readable line, from serve too."""
    text = "plugin:\n  logLevel: '" + "x" * 900_000 + "'\n"
    with pytest.raises(ConfigError) as caught:
        resolve(Overrides(), parse_config(text, SOURCE), {}, SOURCE)
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS and str(caught.value).endswith("…")
    config = tmp_path / "huge.yaml"
    config.write_text(text)
    result = invoke("serve", "--config", str(config))
    assert_one_line_error(result, "plugin.logLevel")
    assert len(result.stderr) < MAX_MESSAGE_CHARS + 20


def billion_laughs(key: str) -> str:
    """A 340-byte YAML value that holds a billion strings through aliases: quoting it in an error never ended."""
    levels = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return f"{key}: [{', '.join(levels)}]\n"


@pytest.mark.parametrize(
    "text", ["version: v1\nhealth:\n  " + billion_laughs("fatalXids"), "version: v1\nsharing: &s {mps: *s}\n"]
)
def test_yaml_aliases_cannot_make_a_config_huge(text: str) -> None:
    """A config that aliases expand to a billion values, or to itself, is refused at once naming the bound."""
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: holds more than 100000 values once its YAML aliases"):
        parse_config(text, SOURCE)
    assert time.perf_counter() - started < 1.0


async def test_yaml_aliases_cannot_make_a_mock_config_huge(tmp_path: Path) -> None:
    """The mock's own config file has the same bound."""
    from gpuplugin.backends.mock import load_settings

    path = tmp_path / "mock.yaml"
    path.write_text(billion_laughs("nvlink_groups"))
    with pytest.raises(ConfigError, match=r"holds more than 100000 values"):
        await load_settings({"config": str(path)}, state_dir=tmp_path)


def test_deeply_nested_yaml_is_a_config_error() -> None:
    """YAML nested deeper than Python's recursion is refused as a config, not a RecursionError."""
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: "):
        parse_config("a: " + "[" * 100_000 + "\n", SOURCE)


#: Keys the parser knows, so that random mappings reach deep into it.
_KEYS = [
    "version", "plugin", "backend", "health", "allocation", "flags", "sharing", "timeSlicing", "resources", "name",
    "replicas", "rename", "devices", "perGpu", "allocationPolicy", "renameByDefault", "failRequestsGreaterThanOne",
    "mock", "nvml", "partitioned", "gpus", "ignoredXids", "fatalXids", "enabledXids", "recoveryQuietPeriodSeconds",
    "enabled", "kubeletDir", "logFormat", "logLevel", "stateDir", "metricsAddress", "pluginsRegistryDir",
    "migStrategy", "deviceListStrategy", "cdiAnnotationPrefix", "cdiVendor", "cdiSpecDir", "cdiSpecFormat", "policy",
    "mps", "resources", "imex", "passDeviceSpecs", "deviceIDStrategy", "failOnInitError",
]  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["v1", GPU, "all", "mixed", "envvar", "cdi-cri", "json", "info", "/abs", "nvidia.com/gpu.x"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.integers() | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_random_config_mappings_give_settings_or_one_config_error(config: dict[str, Any]) -> None:
    """Whatever a YAML file holds, resolving it gives settings or a one-line ConfigError, never another exception."""
    try:
        resolve(Overrides(), {"version": "v1", **config}, {}, SOURCE)
    except ConfigError as exc:
        error = exc
    else:
        return
    assert str(error).startswith(f"{SOURCE}: ")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_config_text_gives_a_mapping_or_one_config_error(text: str) -> None:
    """Any text at all is parsed to a mapping of sections, or refused with a ConfigError naming the file."""
    error: ConfigError | None = None
    try:
        resolve(Overrides(), parse_config(text, SOURCE), {}, SOURCE)
    except ConfigError as exc:
        error = exc
    assert error is None or str(error).startswith(f"{SOURCE}: ")


# The command line: one line and exit 2 for each finding.


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def test_cli_refuses_a_non_utf8_config_in_one_line(tmp_path: Path) -> None:
    """``--config`` naming a file that is not UTF-8 exits 2 with one line, not a UnicodeDecodeError."""
    config = tmp_path / "bin.yaml"
    config.write_bytes(b"version: v1\n\xff\xfe: x\n")
    for command in ("serve", "devices"):
        assert_one_line_error(invoke(command, "--config", str(config)), "bin.yaml", "not UTF-8")


def test_cli_refuses_a_config_that_is_a_directory_or_too_big(tmp_path: Path) -> None:
    """A directory as the config, or a file bigger than a ConfigMap, exits 2 with one line naming it."""
    assert_one_line_error(invoke("devices", "--config", str(tmp_path)), "--config", "is a directory")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    assert_one_line_error(invoke("devices", "--config", str(big)), "big.yaml", "larger than")


@pytest.mark.parametrize("gpus", ["0", "2000", "x"])
def test_cli_devices_refuses_bad_mock_gpus_in_one_line(tmp_path: Path, gpus: str) -> None:
    """``devices --mock-gpus 0`` (or too many, or not a number) exits 2 with one line, as ``serve`` does."""
    result = invoke("devices", "--mock-gpus", gpus, "--state-dir", str(tmp_path))
    assert_one_line_error(result, "gpus")


def test_cli_devices_refuses_a_bad_mock_config_in_one_line(tmp_path: Path) -> None:
    """A mock config file that is missing, not UTF-8 or invalid exits 2 with one line naming it."""
    binary = tmp_path / "mock.yaml"
    binary.write_bytes(b"\xff")
    for path, needle in ((binary, "not UTF-8"), (tmp_path / "absent.yaml", "cannot read")):
        result = invoke("devices", "--mock-config", str(path), "--state-dir", str(tmp_path))
        assert_one_line_error(result, "mock.config", needle)


@pytest.mark.parametrize(("replicas", "field"), [(100_000_000, "must be an integer"), (20000, "160000 devices")])
def test_cli_refuses_too_many_replicas_in_one_line(tmp_path: Path, replicas: int, field: str) -> None:
    """Replicas the kubelet could not receive exit 2 with one line naming the field, from serve and devices."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"version: v1\nsharing:\n  timeSlicing:\n    resources: [{{name: {GPU}, replicas: {replicas}}}]\n"
    )
    (tmp_path / "k").mkdir()
    (tmp_path / "s").mkdir()
    started = time.perf_counter()
    for command in (("devices",), ("serve", "--kubelet-dir", str(tmp_path / "k"), "--log-level", "critical")):
        result = invoke(*command, "--config", str(config), "--state-dir", str(tmp_path / "s"))
        assert_one_line_error(result, "sharing.timeSlicing.resources[0].replicas", field)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--gpus", "0"], "--gpus"),
        (["demo", "--gpus", "3"], "8 GPUs"),
        (["demo", "--quiet-period", "nan"], "--quiet-period"),
        (["demo", "--quiet-period", "-1"], "--quiet-period"),
        (["demo", "--log-level", "loud"], "--log-level"),
        (["devices", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["serve", "--event-loop", "tokio"], "--event-loop"),
        (["serve", "--instance-wait", "nan"], "--instance-wait"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    """A bad flag, value or command is one line on stderr and exit 2, not click's four-line usage block."""
    assert_one_line_error(invoke(*args), needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--calls", "-1"], "--calls"),
        (["--callers", "0"], "--callers"),
        (["--duration", "nan"], "--duration"),
        (["--rate", "inf"], "--rate"),
        (["--gpus", "0"], "--gpus"),
    ],
)
def test_benchmark_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    """The benchmark suite's command (``python -m benchmarks``) refuses a bad value in one line too, exit 2."""
    from benchmarks.cli import bench

    assert_one_line_error(CliRunner().invoke(bench, args, catch_exceptions=True), needle)


def test_version_prints_the_package_version() -> None:
    """``gpuplugin --version`` prints the installed package's version and exits 0."""
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.output == f"gpuplugin {version('gpuplugin')}\n"


_BACKEND_KEYS = {
    "mock": ["gpus", "model", "memory_mib", "resource", "node_name", "numa_nodes", "nvlink_groups", "pcie_switches",
             "control_socket", "device_node_host_path", "links"],
    "nvml": ["resource", "device_id_strategy", "pass_device_specs", "driver_root", "device_root", "fail_on_init_error",
             "retry_backoff_initial_s", "rediscover_backoff_max_s", "event_wait_timeout_ms", "wait_error_threshold",
             "sysfs_root", "report_mig_devices"],
    "partitioned": ["parent", "parent_options", "strategy", "layout", "layouts", "profiles", "allocation_policy",
                    "1g.18gb", "all", "gpus", "none"],
}  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), backend=st.sampled_from(sorted(_BACKEND_KEYS)))
def test_random_backend_options_give_settings_or_the_backends_error(data: st.DataObject, backend: str) -> None:
    """A backend's section, whatever it holds, gives its settings or a ConfigError starting with the setting's path."""
    from gpuplugin.backends.mock import MockSettings

    keys = st.sampled_from(_BACKEND_KEYS[backend])
    values = st.recursive(
        _SCALARS | st.sampled_from(["all-1g.18gb", "1g.18gb,2g.35gb", "mock", "uuid"]),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys | st.integers(), children, max_size=4),
        max_leaves=20,
    )
    options = data.draw(st.dictionaries(keys, values, max_size=5))
    parsers: dict[str, Callable[[Mapping[str, Any]], object]] = {
        "mock": MockSettings.from_options,
        "nvml": NvmlSettings.from_options,
        "partitioned": PartitionedSettings.from_options,
    }
    try:
        parsers[backend](options)
    except ConfigError as error:
        message = str(error)
    else:
        return
    # The section's name, then the setting's path (NVML's settings are named bare, as its flags are).
    section = {"mock": r"mock\.", "nvml": "", "partitioned": r"partitioned\."}[backend]
    assert re.match(rf"^{section}(?:[\w-]+|'[^']*'){STEPS}: \S", message), message
