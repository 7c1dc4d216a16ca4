"""One scenario from start to finish: simulator up, plugin process started, phases run, everything stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from benchmarks import nvidia_plugin
from benchmarks.baselines import Floor, running_floors
from benchmarks.callers import Call, Loop, interleaved
from benchmarks.churn import ChurnRun, container_sizes
from benchmarks.measure import Clock, Latencies
from benchmarks.microbench import codec_costs, plugin_costs, where_time_goes
from benchmarks.native_client import GOKUBELET_ENV, native_client, run_native
from benchmarks.plugin_process import ProcessUsage, ServerProcess, plugin_argv
from benchmarks.restarts import restart_phase
from benchmarks.scenarios import RESOURCE, Scenario
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.testing.simulator import KubeletSimulator

START_TIMEOUT_S = 60.0
#: How long every registered GPU may take to be listed Healthy (seconds): NVML serves a failed GPU Unhealthy at once.
HEALTHY_TIMEOUT_S = 5.0
#: Pause after registration before idle RSS is read (seconds): start-up garbage is collected by then.
SETTLE_S = 0.5
PLUGIN = "plugin"
#: Suffix of the measures taken with the Go client (gokubelet: grpc-go, the kubelet's own stack).
GO = " (Go client)"
#: The plugins a run can measure, as the report, the plots and compare name them.
ROLE_OURS = "ours"
ROLE_NVIDIA = "nvidia"
#: The key of ``facts["not_measured"]`` that says why NVIDIA's plugin was not measured.
NVIDIA_NOT_MEASURED = "NVIDIA's device plugin"


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How a scenario is run, apart from the scenario itself."""

    seed: int = 1
    quick: bool = False
    progress: bool = True
    """Show tqdm progress bars on stderr."""
    backend: str = "mock"
    """The plugin's backend: ``mock``, or ``nvml`` for the node's real GPUs (their count is what registers)."""
    plugin_python: tuple[str, ...] = ()
    """The interpreter command the plugin runs under; empty: this one."""


@dataclass
class RunResult:
    """What a run measured: the report's facts, the latency measures and the events the plots mark."""

    facts: dict[str, Any]
    measures: dict[str, Latencies]
    backend: str = "mock"
    gpus: int = 0
    """GPUs the plugin served: the mock's count, or what registered on nvml."""
    resource: str = RESOURCE
    """The resource the plugin served and the load asked for."""
    devices: int = 0
    """Devices of ``resource`` served: ``gpus`` times the partitions or replicas of each GPU."""
    churns: dict[str, ChurnTrace] = dataclasses.field(default_factory=dict)
    """Each plugin's churn (``ours``, ``nvidia``), where it ran."""


async def run_scenario(scenario: Scenario, settings: RunSettings) -> RunResult:
    """Run every phase the scenario asks for; raises if the plugin dies or never registers."""
    # Short and under /tmp: unix socket paths must stay below 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="gpb-", dir="/tmp"))
    try:
        return await _run(scenario, settings, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class ChurnTrace:
    """When one plugin's churn ran, and what happened to the node meanwhile: what the churn plot marks."""

    began_s: float
    """Seconds since the run began."""
    ended_s: float
    health_events: list[tuple[float, str]]
    """(seconds since the run began, "Healthy" or "Unhealthy")."""
    restart_times_s: list[float]


@dataclass
class _PluginRun:
    """One plugin measured through every phase: its measures (names unprefixed), its facts, its churn."""

    measures: dict[str, Latencies]
    facts: dict[str, Any]
    churn: ChurnTrace | None
    gpus: int
    devices: int


async def _run(scenario: Scenario, settings: RunSettings, workdir: Path) -> RunResult:
    clock = Clock()
    ours_dir = workdir / "ours"
    ours_dir.mkdir()
    config = _write_config(scenario, ours_dir)
    argv = plugin_argv(ours_dir / "k", ours_dir / "s", scenario.gpus, settings.backend, config, settings.plugin_python)
    ours = await _measure_plugin(scenario, settings, clock, ours_dir, ours_dir / "k", argv, settings.backend)
    facts = ours.facts
    if config is not None:
        facts["plugin_config"] = scenario.plugin_config()
    facts["plugin"]["environment"] = _plugin_environment()
    measures = dict(ours.measures)
    churns = {} if ours.churn is None else {ROLE_OURS: ours.churn}
    if scenario.against_nvidia:
        nvidia = await _measure_nvidia(scenario, settings, clock, workdir, facts)
        if nvidia is not None:
            for name, latencies in nvidia.measures.items():
                latencies.name = nvidia_plugin.PREFIX + name
                measures[latencies.name] = latencies
            if nvidia.churn is not None:
                churns[ROLE_NVIDIA] = nvidia.churn
    return RunResult(
        facts,
        measures,
        settings.backend,
        ours.gpus,
        scenario.resource,
        ours.devices,
        churns,
    )


async def _measure_nvidia(
    scenario: Scenario, settings: RunSettings, clock: Clock, workdir: Path, facts: dict[str, Any]
) -> _PluginRun | None:
    """NVIDIA's plugin through the same phases as ours (the floors aside: they were measured with ours), or None
    with the reason in ``facts["not_measured"]`` where it cannot run or fails."""
    reason = nvidia_unavailable(settings.backend)
    binary = nvidia_plugin.binary()
    if reason is not None or binary is None:
        facts.setdefault("not_measured", {})[NVIDIA_NOT_MEASURED] = str(reason)
        return None
    kubelet_dir = nvidia_kubelet_dir()
    own = workdir / "nvidia"
    own.mkdir()
    try:
        run = await _measure_plugin(
            dataclasses.replace(scenario, baselines=False),
            settings,
            clock,
            own,
            kubelet_dir,
            nvidia_plugin.argv(binary, kubelet_dir),
            "nvml",
            "NVIDIA's plugin",
        )
    except (RuntimeError, TimeoutError) as error:
        facts.setdefault("not_measured", {})[NVIDIA_NOT_MEASURED] = f"it failed: {error}"[:2000]
        return None
    run.facts["version"] = nvidia_plugin.version(binary)
    run.facts["binary"] = str(binary)
    facts["nvidia"] = run.facts
    return run


def nvidia_unavailable(backend: str) -> str | None:
    """Why NVIDIA's plugin cannot run here, or None (tests replace it to stand a mock plugin in for NVIDIA's)."""
    from benchmarks.report import nvidia_gpus  # the report imports this module

    return nvidia_plugin.unavailable(backend, nvidia_gpus().get("gpus"))


def nvidia_kubelet_dir() -> Path:
    """The simulated kubelet's directory for NVIDIA's plugin: its own socket's, compiled in (tests replace it)."""
    return nvidia_plugin.DEVICE_PLUGIN_DIR


async def _measure_plugin(
    scenario: Scenario,
    settings: RunSettings,
    clock: Clock,
    workdir: Path,
    kubelet_dir: Path,
    argv: list[str],
    backend: str,
    name: str = PLUGIN,
) -> _PluginRun:
    """Start the plugin ``argv`` against a simulated kubelet in ``kubelet_dir`` and run every phase on it."""
    state_dir = workdir / "s"
    state_dir.mkdir(exist_ok=True)
    measures: dict[str, Latencies] = {}
    facts: dict[str, Any] = {}
    trace: ChurnTrace | None = None
    resource = scenario.resource
    async with KubeletSimulator(kubelet_dir) as kubelet:
        plugin = ServerProcess(name, argv, workdir / "plugin.log")
        plugin.start()
        try:
            registration = await _wait_registered(kubelet, plugin, resource, backend)
            facts["start_to_registration_ms"] = (registration.monotonic_s - plugin.started_s) * 1000
            devices = await _wait_device_list(kubelet, scenario, backend)
            gpus = devices // scenario.per_gpu
            facts["start_to_device_list_ms"] = (time.monotonic() - plugin.started_s) * 1000
            await asyncio.sleep(SETTLE_S)
            idle = plugin.usage()

            native = native_client()
            if native is None:
                facts.setdefault("not_measured", {})["the Go client's measures"] = (
                    "gokubelet is not built (benchmarks/gokubelet/build.sh), so every figure comes from the Python "
                    "client, which costs about as much per call as the plugin"
                )
            else:
                facts["go_client"] = {"binary": str(native)}
            if scenario.allocate_calls:
                where = await _allocate_phase(
                    kubelet, scenario, scenario.callers, settings, workdir, clock, measures, native, facts
                )
                if where is not None:
                    facts["where_time_goes"] = where
                if scenario.concurrent_callers:
                    await _allocate_phase(
                        kubelet,
                        scenario,
                        scenario.concurrent_callers,
                        settings,
                        workdir,
                        clock,
                        measures,
                        native,
                        facts,
                    )
            if scenario.preferred_calls:
                await _preferred_phase(kubelet, scenario, settings, clock, measures, native, facts)
            if scenario.admissions and native is not None:
                await _admission_phase(kubelet, scenario, settings, workdir, clock, measures, native, facts)
            if scenario.churn is not None:
                began_s = clock.now()
                with _bar(settings, "churn (pods)", None) as bar:
                    churn = ChurnRun(
                        kubelet,
                        scenario.churn,
                        resource=resource,
                        gpus=gpus,
                        per_gpu=scenario.per_gpu,
                        max_per_container=scenario.max_per_container,
                        # The mock's, parent of the partitions or not: its default place in the state directory.
                        control_socket=state_dir / "mock.sock",
                        clock=clock,
                        seed=settings.seed,
                        progress=bar.update,
                    )
                    await churn.run()
                measures.update((m.name, m) for m in churn.measures())
                facts["churn"] = churn.summary()
                trace = ChurnTrace(
                    began_s,
                    clock.now(),
                    [(e.sent_s, e.health) for e in churn.health_events],
                    list(churn.restart_times_s),
                )
                if scenario.churn.flap_rate_per_s <= 0:
                    reason = _no_flaps_reason(backend)
                    facts.setdefault("not_measured", {})["health change → ListAndWatch"] = reason
            if scenario.restarts:
                registered = clock.latencies("re-registration")
                listed = clock.latencies("re-registration to device list")
                with _bar(settings, "kubelet restarts", scenario.restarts) as bar:
                    await restart_phase(kubelet, resource, devices, scenario.restarts, registered, listed, bar.update)
                measures.update({registered.name: registered, listed.name: listed})
            plugin.check_alive()
            after = plugin.usage()
            # Before the plugin stops: its clean shutdown ends the stream too, and that end is no fault.
            facts["stream_ends"] = [dataclasses.asdict(e) for e in kubelet.stream_ends]
        finally:
            exit_code = await plugin.stop()
        facts["plugin"] = _process_facts(idle, after, exit_code, workdir / "plugin.log")
        facts["plugin"]["command"] = argv
        facts["kubelet_warnings"] = kubelet.warnings
    return _PluginRun(measures, facts, trace, gpus, devices)


def _plugin_environment() -> dict[str, str]:
    """The plugin's settings in the environment it inherits (``GPUPLUGIN_METRICS_ADDRESS``, ``GPUPLUGIN_EVENT_LOOP``
    ...): a run with one of them set measures another plugin than its command line says."""
    harness = (GOKUBELET_ENV, nvidia_plugin.NVIDIA_PLUGIN_ENV)
    return {k: v for k, v in os.environ.items() if k.startswith("GPUPLUGIN_") and k not in harness}


def _write_config(scenario: Scenario, workdir: Path) -> Path | None:
    """The scenario's plugin config file in the run's directory; None where flags say it all (whole GPUs)."""
    config = scenario.plugin_config()
    if config is None:
        return None
    path = workdir / "plugin.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _wait_registered(kubelet: KubeletSimulator, plugin: ServerProcess, resource: str, backend: str) -> Any:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        plugin.check_alive()
        try:
            return await kubelet.wait_registered(resource, timeout=0.5)
        except TimeoutError:
            if time.monotonic() > deadline:
                hint = (
                    " (nvml registers only when it serves a GPU: does `gpuplugin devices --backend nvml` list any?"
                    " MIG-enabled GPUs are not served whole)"
                    if backend == "nvml"
                    else ""
                )
                message = f"the plugin did not register within {START_TIMEOUT_S:g} s{hint}:\n{plugin.log_tail()}"
                raise TimeoutError(message) from None


async def _wait_device_list(kubelet: KubeletSimulator, scenario: Scenario, backend: str) -> int:
    """The number of devices served, once every one is listed Healthy: the mock node's (GPUs times partitions or
    replicas), or on nvml what registered."""
    resource = scenario.resource
    if backend == "mock":
        await kubelet.wait_for(lambda: kubelet.allocatable(resource) == scenario.devices, START_TIMEOUT_S)
        return scenario.devices
    # One ListAndWatch message carries the whole list, so the first non-empty one is the node.
    await kubelet.wait_for(lambda: kubelet.capacity(resource) > 0, START_TIMEOUT_S)
    try:
        await kubelet.wait_for(lambda: kubelet.allocatable(resource) == kubelet.capacity(resource), HEALTHY_TIMEOUT_S)
    except TimeoutError:
        raise RuntimeError(
            f"{kubelet.capacity(resource) - kubelet.allocatable(resource)} of {kubelet.capacity(resource)} GPUs are "
            f"listed Unhealthy; the benchmark needs every GPU healthy: {kubelet.devices(resource)}"
        ) from None
    return kubelet.capacity(resource)


def _no_flaps_reason(backend: str) -> str:
    if backend == "nvml":
        return (
            "no health flaps on nvml: its health events come from the GPUs, with no control socket to inject them; "
            "python -m benchmarks.nvml_figures times an XID from the health thread's edge to ListAndWatch"
        )
    return "no health flaps: the churn's flap rate is 0"


async def _allocate_phase(
    kubelet: KubeletSimulator,
    scenario: Scenario,
    callers: int,
    settings: RunSettings,
    workdir: Path,
    clock: Clock,
    measures: dict[str, Latencies],
    native: Path | None,
    facts: dict[str, Any],
) -> dict[str, Any] | None:
    """Allocate of one GPU on the plugin and on the floors, through the same client loop, in alternating blocks;
    then again with the Go client where it is built."""
    stub = kubelet.stub(scenario.resource)
    requests = [
        v1beta1.AllocateRequest(container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=[device])])
        for device in kubelet.devices(scenario.resource)
    ]
    response = bytes(await stub.allocate(requests[0]))
    suffix = "" if callers == 1 else f" x{callers}"

    def allocate_on(target: v1beta1.DevicePluginStub) -> Call:
        return lambda n: target.allocate(requests[n % len(requests)])

    ours = f"Allocate{suffix}"
    targets = {ours: allocate_on(stub)}
    loop = Loop(
        calls=scenario.allocate_calls,
        callers=callers,
        block_calls=scenario.block_calls,
        warmup_calls=min(200, scenario.allocate_calls // 10),
    )
    floors_running: AbstractAsyncContextManager[list[Floor]] = (
        running_floors(workdir, response) if scenario.baselines else nullcontext([])
    )
    async with floors_running as floors:
        targets.update({f"{floor.name} Allocate{suffix}": allocate_on(floor.stub) for floor in floors})
        into = {name: clock.latencies(name) for name in targets}
        with _bar(settings, f"Allocate calls{suffix}", scenario.allocate_calls * len(targets)) as bar:
            await interleaved(targets, into, **loop, progress=bar.update)
        if native is not None:
            sockets = {ours: kubelet.endpoint_path(scenario.resource)}
            sockets.update({f"{floor.name} Allocate{suffix}": floor.socket for floor in floors})
            with _bar(settings, f"Allocate calls{suffix}{GO}", None):
                encoded = [bytes(r) for r in requests]
                into.update(await _native_measures(native, "allocate", sockets, clock, facts, requests=encoded, **loop))
    measures.update(into)
    if not scenario.baselines or callers != 1:
        return None  # with concurrent callers the median is mostly queueing; the split would mean nothing
    budget_s = 0.05 if settings.quick else 1.0
    codec = codec_costs(bytes(requests[0]), response, budget_s=budget_s)
    plugin = await plugin_costs(bytes(requests[0]), budget_s=budget_s)
    return {
        "codec_us": codec,
        **where_time_goes(codec, plugin, into[ours].percentile_ms(50), into[f"floor-grpclib {ours}"].percentile_ms(50)),
    }


async def _preferred_phase(
    kubelet: KubeletSimulator,
    scenario: Scenario,
    settings: RunSettings,
    clock: Clock,
    measures: dict[str, Latencies],
    native: Path | None,
    facts: dict[str, Any],
) -> None:
    """GetPreferredAllocation alone, every device available, sizes drawn from the churn's mix; then again with the
    Go client where it is built."""
    stub = kubelet.stub(scenario.resource)
    available = list(kubelet.devices(scenario.resource))
    requests = [
        v1beta1.PreferredAllocationRequest(
            container_requests=[
                v1beta1.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=size
                )
            ]
        )
        for size in _sizes(scenario, settings, len(available), "preferred")
    ]
    name = "GetPreferredAllocation" + ("" if scenario.callers == 1 else f" x{scenario.callers}")
    into = {name: clock.latencies(name)}
    loop = Loop(
        calls=scenario.preferred_calls,
        callers=scenario.callers,
        block_calls=scenario.preferred_calls,
        warmup_calls=min(100, scenario.preferred_calls // 10),
    )
    with _bar(settings, "GetPreferredAllocation calls", scenario.preferred_calls) as bar:
        preferred = {name: lambda n: stub.get_preferred_allocation(requests[n % len(requests)])}
        await interleaved(preferred, into, **loop, progress=bar.update)
    if native is not None:
        with _bar(settings, f"GetPreferredAllocation calls{GO}", None):
            into.update(
                await _native_measures(
                    native,
                    "preferred",
                    {name: kubelet.endpoint_path(scenario.resource)},
                    clock,
                    facts,
                    requests=[bytes(r) for r in requests],
                    **loop,
                )
            )
    measures.update(into)


async def _admission_phase(
    kubelet: KubeletSimulator,
    scenario: Scenario,
    settings: RunSettings,
    workdir: Path,
    clock: Clock,
    measures: dict[str, Latencies],
    native: Path,
    facts: dict[str, Any],
) -> None:
    """Whole admissions by the Go client, one pod of one container at a time, as the kubelet admits them:
    GetPreferredAllocation over every device, Allocate of what it preferred, the checkpoint written and fsync'd."""
    devices = list(kubelet.devices(scenario.resource))
    checkpoint_dir = workdir / "go-kubelet"
    checkpoint_dir.mkdir(exist_ok=True)
    with _bar(settings, f"admissions{GO}", None):
        measures.update(
            await _native_measures(
                native,
                "admission",
                {"admission": kubelet.endpoint_path(scenario.resource)},
                clock,
                facts,
                calls=scenario.admissions,
                block_calls=scenario.admissions,
                warmup_calls=min(100, scenario.admissions // 10),
                devices=devices,
                sizes=_sizes(scenario, settings, len(devices), "admission"),
                checkpoint_dir=checkpoint_dir,
                resource=scenario.resource,
            )
        )


def _sizes(scenario: Scenario, settings: RunSettings, devices: int, what: str) -> list[int]:
    """64 container sizes drawn, seeded, from the churn's mix as it fits the node."""
    mix = container_sizes(scenario.churn.size_mix if scenario.churn else {1: 1.0}, devices, scenario.max_per_container)
    sizes = list(mix)
    return random.Random(f"{what}-{settings.seed}").choices(sizes, [mix[s] for s in sizes], k=64)


async def _native_measures(
    native: Path, mode: str, sockets: dict[str, Path], clock: Clock, facts: dict[str, Any], **how: Any
) -> dict[str, Latencies]:
    """The Go client's run on ``sockets`` (measure name, before the suffix, to socket), its measures suffixed."""
    targets = {f"{name}{GO}": socket for name, socket in sockets.items()}
    measured, versions = await run_native(native, mode, targets, clock, **how)
    facts["go_client"].update(versions)
    return measured


@contextmanager
def _bar(settings: RunSettings, what: str, total: int | None) -> Iterator[tqdm[Any]]:
    bar: tqdm[Any] = tqdm(total=total, desc=what, unit="", disable=not settings.progress, leave=False, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


def _process_facts(idle: ProcessUsage, after: ProcessUsage, exit_code: int | None, log_path: Path) -> dict[str, Any]:
    return {
        "idle_rss_mb": idle.rss_mb,
        "rss_after_run_mb": after.rss_mb,
        "peak_rss_mb": after.peak_rss_mb,
        "cpu_s_at_idle": idle.cpu_s,
        "cpu_s_total": after.cpu_s,
        "cpu_s_during_run": after.cpu_s - idle.cpu_s,
        "exit_code": exit_code,
        "log_problems": _log_problems(log_path),
    }


def _log_problems(log_path: Path) -> list[str]:
    """Warning and error lines the plugin logged (ours runs at level warning, so every line it wrote; NVIDIA's
    writes klog lines, of which those marked W, E or F)."""
    text = log_path.read_text(errors="replace")
    if nvidia_plugin.is_klog(text):
        return nvidia_plugin.log_problems(text)
    problems = []
    for line in text.splitlines():
        try:
            level = json.loads(line).get("level")
        except (ValueError, AttributeError):
            level = "text"
        if level in ("warning", "error", "critical", "text"):
            problems.append(line[:300])
    return problems[:50]
