"""The command line: ``serve`` (the daemon), ``devices``, ``demo``, ``kubelet`` (the simulator), and the backends'
own commands (``mock``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import click
import structlog

from gpuplugin import package_version
from gpuplugin.backends.registry import UnknownBackend, load_factory
from gpuplugin.core.backend import BackendUnavailable
from gpuplugin.core.errors import shorten
from gpuplugin.core.instance import InstanceLockError
from gpuplugin.core.tasks import TaskFailing
from gpuplugin.daemon import logs
from gpuplugin.daemon.agent import Daemon, SupervisedDaemon, node_process, served_tree, settings_from_text
from gpuplugin.daemon.probes import ProbeServerError
from gpuplugin.daemon.settings import LOG_FORMATS, LOG_LEVELS, ConfigError, Overrides, PluginSettings, read_config
from gpuplugin.devices.health import MAX_QUIET_PERIOD_S

log = structlog.get_logger("gpuplugin")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: what went wrong and, where we know, what to do."""
    # One line, whatever the message quotes (a YAML key may hold a newline, a value a megabyte).
    click.echo(f"gpuplugin: {shorten(message)}", err=True)
    sys.exit(code)


def load_settings(config: Path | None, overrides: Overrides) -> tuple[PluginSettings, str | None]:
    """The settings and the config file's text they come from; a bad file or backend exits with one line."""
    try:
        # Read before the event loop starts: nothing is blocked by it.
        text = None if config is None else read_config(config)
        settings = settings_from_text(text, str(config) if config else "config", overrides)
        load_factory(settings.backend)
    except (ConfigError, UnknownBackend) as exc:
        fail(str(exc), 2)
    return settings, text


_common = [
    click.option(
        "--backend",
        envvar="GPUPLUGIN_BACKEND",
        help="Where devices come from: mock, nvml, partitioned, or a backend installed by entry point. Default: mock.",
    ),
    click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="GPUPLUGIN_CONFIG",
        help="YAML config file (version: v1).",
    ),
    click.option("--log-format", type=click.Choice(LOG_FORMATS), envvar="GPUPLUGIN_LOG_FORMAT", help="Default: auto."),
    click.option("--log-level", envvar="GPUPLUGIN_LOG_LEVEL", help="debug, info, warning, error. Default: info."),
    click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="GPUPLUGIN_STATE_DIR",
        help="Directory for the process's own sockets. Default: /run/gpuplugin.",
    ),
    click.option("--mock-gpus", type=int, help="Mock backend: number of fake GPUs."),
    click.option(
        "--mock-config",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Mock backend: YAML file describing the fake GPUs.",
    ),
    click.option(
        "--device-id-strategy",
        type=click.Choice(["uuid", "index"]),
        envvar="DEVICE_ID_STRATEGY",
        help="NVML backend: device IDs and NVIDIA_VISIBLE_DEVICES by GPU UUID or index. Default: uuid.",
    ),
    click.option(
        "--pass-device-specs/--no-pass-device-specs",
        default=None,
        envvar="PASS_DEVICE_SPECS",
        help="NVML backend: also hand /dev/nvidia* device nodes to the container. Default: no.",
    ),
    click.option(
        "--nvidia-driver-root",
        envvar="NVIDIA_DRIVER_ROOT",
        help="NVML backend: where the driver's files are (e.g. /run/nvidia/driver). Default: /.",
    ),
    click.option("--dev-root", envvar="NVIDIA_DEV_ROOT", help="NVML backend: where /dev/nvidia* are. Default: /."),
    click.option(
        "--fail-on-init-error/--no-fail-on-init-error",
        default=None,
        envvar="FAIL_ON_INIT_ERROR",
        help="NVML backend: exit if NVML cannot start (default), or serve nothing and retry with backoff.",
    ),
    click.option(
        "--mig-strategy",
        type=click.Choice(["none", "single", "mixed"]),
        envvar="MIG_STRATEGY",
        help="NVML backend: serve MIG devices as nvidia.com/gpu (single) or nvidia.com/mig-<profile> (mixed).",
    ),
    click.option(
        "--device-list-strategy",
        envvar="DEVICE_LIST_STRATEGY",
        help="envvar, volume-mounts, cdi-annotations, cdi-cri, comma-separated. Default: envvar.",
    ),
]


def common_options(fn: Any) -> Any:
    for option in reversed(_common):
        fn = option(fn)
    return fn


#: Backend flags: option name → (backend, its setting). NVIDIA's flag names and variables, so configs carry over.
_BACKEND_FLAGS = {
    "mock_gpus": ("mock", "gpus"),
    "mock_config": ("mock", "config"),
    "device_id_strategy": ("nvml", "device_id_strategy"),
    "pass_device_specs": ("nvml", "pass_device_specs"),
    "nvidia_driver_root": ("nvml", "driver_root"),
    "dev_root": ("nvml", "device_root"),
    "fail_on_init_error": ("nvml", "fail_on_init_error"),
}


def overrides_from(params: Mapping[str, Any], **extra: Any) -> Overrides:
    backend_options: dict[str, dict[str, Any]] = {}
    for flag, (backend, key) in _BACKEND_FLAGS.items():
        if params.get(flag) is not None:
            backend_options.setdefault(backend, {})[key] = params[flag]
    return Overrides(
        backend=params.get("backend"),
        mig_strategy=params.get("mig_strategy"),
        device_list_strategy=params.get("device_list_strategy"),
        log_format=params.get("log_format"),
        log_level=params.get("log_level"),
        state_dir=params.get("state_dir"),
        backend_options=backend_options,
        **extra,
    )


class OneLineErrors(click.Command):
    """A command that says a usage error in one line (click's own takes four), exit status 2, and every other
    error of its own in one line too."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "gpuplugin"
            fail(f"{exc.format_message()} (see {where} --help)", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        # Without standalone mode click returns the exit status of --help and --version instead of exiting.
        sys.exit(result if isinstance(result, int) else 0)


def _mock_cli() -> click.Command:
    # The control socket's client: only `gpuplugin mock` pays for importing it.
    from gpuplugin.backends.mock.cli import mock_cli

    return mock_cli


def _kubelet_cli() -> click.Command:
    # The kubelet simulator: `serve` never imports it.
    from gpuplugin.testing.cli import kubelet_cli

    return kubelet_cli


class _Commands(OneLineErrors, click.Group):
    """Subcommands whose imports are heavy load only when called: ``serve`` starts without the mock's control
    client or the kubelet simulator."""

    lazy: ClassVar[dict[str, Callable[[], click.Command]]] = {"mock": _mock_cli, "kubelet": _kubelet_cli}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            return self.lazy[cmd_name]()
        return super().get_command(ctx, cmd_name)


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"gpuplugin {package_version()}")
        ctx.exit()


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses NaN and infinity, which click's own lets through (NaN compares false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version, help="Print the version."
)
def main() -> None:
    """A Kubernetes device plugin for GPUs, with NVML, mock and partitioned backends."""


@main.command()
@common_options
@click.option(
    "--kubelet-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="GPUPLUGIN_KUBELET_DIR",
    help="The kubelet's device-plugins directory. Default: /var/lib/kubelet/device-plugins.",
)
@click.option(
    "--event-loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    envvar="GPUPLUGIN_EVENT_LOOP",
    help="auto: uvloop where installed, else asyncio's own loop. Default: auto.",
)
@click.option(
    "--metrics-address",
    envvar="GPUPLUGIN_METRICS_ADDRESS",
    help="Serve /metrics, /healthz and /readyz on HOST:PORT, :PORT or [IPv6]:PORT. Default: off.",
)
@click.option(
    "--instance-wait",
    type=FiniteRange(min=0),
    envvar="GPUPLUGIN_INSTANCE_WAIT",
    help="Seconds to wait while another gpuplugin holds the state directory's lock; 0: exit at once. "
    "Default: wait until it stops.",
)
@click.option(
    "--kubelet-api",
    type=click.Choice(["device-plugin", "dra"]),
    envvar="GPUPLUGIN_KUBELET_API",
    help="device-plugin: the kubelet's device plugin API; dra: Dynamic Resource Allocation (ResourceSlices and the "
    "kubelet's DRA plugin API). One per node. Default: device-plugin.",
)
@click.option(
    "--node-name",
    envvar="NODE_NAME",
    help="DRA: this node's name (the downward API's spec.nodeName). Required with --kubelet-api dra.",
)
@click.option(
    "--dra-driver-name",
    envvar="GPUPLUGIN_DRA_DRIVER_NAME",
    help="DRA: the driver name of the node's ResourceSlices and of the claims it prepares. Default: gpu.gpuplugin.dev.",
)
@click.option(
    "--dra-partitionable-devices",
    type=click.Choice(["auto", "on", "off"]),
    envvar="GPUPLUGIN_DRA_PARTITIONABLE_DEVICES",
    help="DRA: a partitioned GPU as its partitions and the whole GPU sharing counters (gate DRAPartitionableDevices); "
    "off: partitions alone. auto: where the API server keeps the counters. Default: auto.",
)
@click.option(
    "--dra-device-taints",
    type=click.Choice(["auto", "on", "off"]),
    envvar="GPUPLUGIN_DRA_DEVICE_TAINTS",
    help="DRA: an unhealthy device stays in the slice, tainted (gate DRADeviceTaints); off: it leaves the slice. "
    "auto: where the API server keeps the taints. Default: auto.",
)
@click.option(
    "--dra-taint-effect",
    type=click.Choice(["NoSchedule", "NoExecute"]),
    envvar="GPUPLUGIN_DRA_TAINT_EFFECT",
    help="DRA: the effect of an unhealthy device's taint; NoExecute also evicts the pods using it. "
    "Default: NoSchedule.",
)
@click.option(
    "--kube-api-server",
    envvar="GPUPLUGIN_KUBE_API_SERVER",
    help="DRA: the API server's URL (kubectl proxy, tests). Default: the in-cluster service account, else KUBECONFIG.",
)
@click.option(
    "--kubelet-plugins-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="GPUPLUGIN_KUBELET_PLUGINS_DIR",
    help="DRA: the kubelet's plugins directory (socket and checkpoint). Default: /var/lib/kubelet/plugins.",
)
def serve(**params: Any) -> None:
    """Serve the backend's devices to the kubelet until SIGTERM or SIGINT.

    The config file is reloaded when it changes and on SIGHUP, which also rediscovers the devices. With
    --kubelet-api dra the devices are served through DRA instead; a reload there applies the backend and health
    sections only.
    """
    overrides = overrides_from(
        params,
        kubelet_dir=params.get("kubelet_dir"),
        metrics_address=params.get("metrics_address"),
        instance_wait_s=params.get("instance_wait"),
    )
    settings, text = load_settings(params.get("config"), overrides)
    logs.configure(settings.log_format, settings.log_level)
    if params.get("kubelet_api") == "dra":
        serve_dra(settings, params, text, overrides)
        return
    try:
        daemon = Daemon(settings, config=params.get("config"), config_text=text, overrides=overrides)
    except ValueError as exc:
        fail(f"backend {settings.backend}: {exc}", 2)
    run_daemon(daemon, settings, params)


def run_daemon(
    daemon: SupervisedDaemon,
    settings: PluginSettings,
    params: Mapping[str, Any],
    *,
    fatal: tuple[type[Exception], ...] = (),
    os_errors: str | None = None,
) -> None:
    """Run a daemon of either mode in a node agent's process until it stops; what ends it early is one line and a
    non-zero exit. ``fatal``: the mode's own errors beside the shared ones; ``os_errors``: where given, an OSError
    is a line naming that part instead of a traceback."""
    ending: tuple[type[Exception], ...] = (BackendUnavailable, ProbeServerError, InstanceLockError, TaskFailing, *fatal)
    try:
        with node_process(loop_factory(params.get("event_loop") or "auto")) as runner:
            runner.run(daemon.run(asyncio.Event()))
    except ending as exc:
        fail(str(exc))
    except OSError as exc:
        if os_errors is None:
            raise
        fail(f"{os_errors}: {exc.strerror or exc}: {exc.filename or ''}")
    except ConfigError as exc:
        # Found once the devices are known: replicas too many for the kubelet to receive.
        fail(str(exc), 2)
    except ValueError as exc:
        # A backend's own settings are checked when it starts (the mock reads its YAML file then).
        fail(f"backend {settings.backend}: {exc}", 2)


def serve_dra(settings: PluginSettings, params: Mapping[str, Any], text: str | None, overrides: Overrides) -> None:
    """``serve --kubelet-api dra``: the DRA daemon on the same settings (the kubelet's plugin-watcher directory and
    the CDI spec directory from the config); its modules, and the API client, load only here."""
    from gpuplugin.daemon.dra import DraDaemon
    from gpuplugin.dra.checkpoint import CheckpointCorrupt
    from gpuplugin.dra.driver import DEFAULT_DRIVER_NAME, DEFAULT_PLUGINS_DIR, DriverSettings, GateMode, TaintEffect

    node = params.get("node_name")
    if not node:
        fail("--node-name (or NODE_NAME) is required with --kubelet-api dra", 2)
    try:
        driver = DriverSettings(
            node_name=node,
            driver_name=params.get("dra_driver_name") or DEFAULT_DRIVER_NAME,
            plugins_dir=params.get("kubelet_plugins_dir") or DEFAULT_PLUGINS_DIR,
            plugins_registry_dir=settings.manager.server.plugins_registry_dir,
            cdi_dir=settings.cdi.spec_dir,
            partitionable_devices=params.get("dra_partitionable_devices") or GateMode.AUTO,
            device_taints=params.get("dra_device_taints") or GateMode.AUTO,
            taint_effect=params.get("dra_taint_effect") or TaintEffect.NO_SCHEDULE,
        )
        daemon = DraDaemon(
            settings,
            driver,
            api_server=params.get("kube_api_server"),
            config=params.get("config"),
            config_text=text,
            overrides=overrides,
        )
    except ValueError as exc:
        # ConfigError too: what DRA mode does not do yet, named.
        fail(str(exc), 2)
    run_daemon(daemon, settings, params, fatal=(CheckpointCorrupt,), os_errors="DRA plugin")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (``auto``) or asked for: its transport makes every RPC cheaper; else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            fail("--event-loop uvloop: uvloop is not installed (pip install 'gpuplugin[uvloop]')", 2)
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def devices(as_json: bool, **params: Any) -> None:
    """List the devices the backend sees, as it would serve them."""
    settings, _ = load_settings(params.get("config"), overrides_from(params))
    logs.configure(settings.log_format, params.get("log_level") or "warning")
    try:
        if params.get("state_dir") is None:
            # Keep clear of a daemon's sockets in the default state directory.
            import tempfile  # here: only `devices` needs it

            with tempfile.TemporaryDirectory(prefix="gpuplugin-", dir="/tmp") as state_dir:
                rows = asyncio.run(_devices(dataclasses.replace(settings, state_dir=Path(state_dir))))
        else:
            rows = asyncio.run(_devices(settings))
    except BackendUnavailable as exc:
        fail(str(exc))
    except ConfigError as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        # A backend's own settings are checked when it starts (the mock reads its YAML file then).
        fail(f"backend {settings.backend}: {exc}", 2)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["resource", "id", "health", "numa", "gpu", *sorted({k for r in rows for k in r["attributes"]})]
    table = [[str(r.get(c, r["attributes"].get(c, ""))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


async def _devices(settings: PluginSettings) -> list[dict[str, Any]]:
    # Replicas and strategies applied; no CDI spec file is written.
    tree = await served_tree(settings)
    return [
        {
            "resource": d.resource,
            "id": d.id,
            "health": str(d.health),
            "numa": "" if d.numa_node is None else d.numa_node,
            "gpu": d.gpu if d.gpu != d.id else "",
            "attributes": dict(d.attributes),
        }
        for d in tree.devices
    ]


@main.command()
@click.option(
    "--quiet-period",
    type=FiniteRange(0, MAX_QUIET_PERIOD_S),
    default=1.0,
    show_default=True,
    help="Seconds before a GPU recovers.",
)
@click.option("--gpus", type=click.IntRange(min=1), default=8, show_default=True, help="Fake GPUs on the demo node.")
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS), default="error", show_default=True, help="Plugin log level."
)
def demo(quiet_period: float, gpus: int, log_level: str) -> None:
    """Run the mock backend against the kubelet simulator, in a temporary directory, and report what happens."""
    from gpuplugin.demo import BURST, run_demo

    needed = sum(n for _, containers in BURST for n in containers)
    if gpus < needed:
        fail(f"--gpus: the demo's burst of pods takes {needed} GPUs, got {gpus}", 2)
    logs.configure("console", log_level)
    click.echo(f"gpuplugin demo: {gpus} mock GPUs, kubelet simulator, all in one process")
    try:
        report = asyncio.run(run_demo(quiet_period_s=quiet_period, gpus=gpus, say=click.echo))
    except ValueError as exc:  # the mock's own bounds (at most 1024 GPUs)
        fail(f"--gpus: {exc}", 2)
    click.echo(
        f"done: registration {report.registration_ms:.1f} ms, unhealthy {report.unhealthy_ms:.1f} ms after the XID, "
        f"recovery {report.recovery_s:.1f} s, re-registration {report.reregistration_ms:.1f} ms"
    )
