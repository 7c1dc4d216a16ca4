"""The NVML backend's own figures, in one process, against the real NVML (``--fake``: backends/nvml/fake.py's).

(a) discovery: ``NvmlBackend.start`` (nvmlInit and discovery) and a rediscovery; (b) Allocate and
GetPreferredAllocation through the kubelet simulator, the plugin's Manager in this process; (c) the health thread's
CPU at idle; (d) an XID handed over at the health thread's edge (``post_from_thread``) until the simulator's
ListAndWatch shows the GPU Unhealthy; (e) the node: GPUs, UUIDs, links. Nothing changes GPU state: the XIDs are
injected observations, never real faults, and NVML is only read.

Run ``python -m benchmarks.nvml_figures [--calls N] [--out DIR] [--fake]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks.callers import run_calls
from benchmarks.measure import Clock
from benchmarks.report import environment, gpus_line
from benchmarks.scenarios import DEFAULT_SIZE_MIX, RESOURCE
from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings, discovery
from gpuplugin.backends.nvml.events import THREAD_NAME, XidObserved
from gpuplugin.core.backend import BackendUnavailable
from gpuplugin.core.model import Health
from gpuplugin.daemon import logs
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.kubelet.api import v1beta1
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "nvml-figures"
JSON_NAME = "nvml_figures.json"
MARKDOWN_NAME = "nvml_figures.md"
#: Recoverable under the default policy (row remapping pending): Unhealthy at once, Healthy after the quiet period.
FIGURE_XID = 63
START_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0
#: Event waits of the discovery repeats (ms): each close waits out one, and discovery does not depend on it.
SHORT_WAIT_MS = 200


# Not slotted: the command line reads its defaults from the class.
@dataclass(frozen=True)
class Options:
    """How much of each figure to measure."""

    calls: int = 10_000
    """Sequential Allocate calls of one GPU."""
    preferred_calls: int = 2_000
    """Sequential GetPreferredAllocation calls, sizes from the churn's mix up to the node's GPUs."""
    discoveries: int = 5
    """Backend starts (each with a rediscovery) for the discovery medians."""
    idle_s: float = 10.0
    """Seconds of idle over which the health thread's CPU is read."""
    xids: int = 10
    """Injected XIDs, on alternating GPUs, each recovered before the next."""
    wait_timeout_ms: int = NvmlSettings().event_wait_timeout_ms
    """The health thread's event wait during (b) to (d): production's by default, as it sets the idle cost."""
    quiet_period_s: float = 0.05
    """Recovery quiet period after each injected XID: short, so that the GPUs are Healthy again in moments."""
    fake: bool = False
    """Run against backends/nvml/fake.py's fake NVML (an H200 node) instead of the real one."""
    fake_gpus: int = 2


def say(message: str) -> None:
    click.echo(message, err=True)


async def measure(options: Options) -> dict[str, Any]:
    """Every figure, as one JSON-ready mapping; raises BackendUnavailable when NVML does not start."""
    if options.fake:
        from gpuplugin.backends.nvml.fake import h200_node

        nvml: Any = h200_node(options.fake_gpus)
        injected: Any = nvml
    else:
        import pynvml

        # The backend loads pynvml itself, exactly as the daemon does; this handle only reads the driver version.
        nvml, injected = pynvml, None
    say(f"(a) discovery: {options.discoveries} starts of the NVML backend, each with a rediscovery")
    figures: dict[str, Any] = {"nvml": "fake" if options.fake else "real"}
    figures["discovery"] = await discovery_figures(options, nvml, injected)
    # Short and under /tmp: unix socket paths must stay below 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="gpn-", dir="/tmp"))
    try:
        figures.update(await node_figures(options, nvml, injected, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures["options"] = asdict(options)
    figures["environment"] = environment()
    return figures


async def discovery_figures(options: Options, nvml: Any, injected: Any) -> dict[str, Any]:
    settings = NvmlSettings(event_wait_timeout_ms=min(options.wait_timeout_ms, SHORT_WAIT_MS))
    starts: list[float] = []
    rediscoveries: list[float] = []
    for _ in range(options.discoveries):
        backend = NvmlBackend(settings, HealthPolicy(), injected)
        try:
            began = time.perf_counter()
            await backend.start()
            starts.append(time.perf_counter() - began)
            # What the rediscovery worker runs in its thread after a MIG change, NVML already initialised.
            began = time.perf_counter()
            await asyncio.to_thread(discovery.discover, nvml, settings)
            rediscoveries.append(time.perf_counter() - began)
        finally:
            await backend.aclose()
    return {
        "start_ms": _spread(starts),
        "rediscovery_ms": _spread(rediscoveries),
        "note": "start = nvmlInit + discovery (+ health thread started); the first start also loads libnvidia-ml",
    }


def _spread(samples_s: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples_s]
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "median": statistics.median(ms),
        "first": ms[0],
        "median_after_first": statistics.median(ms[1:]) if len(ms) > 1 else ms[0],
        "min": min(ms),
        "max": max(ms),
        "samples": ms,
    }


async def node_figures(options: Options, nvml: Any, injected: Any, workdir: Path) -> dict[str, Any]:
    """(b) to (e) on one Manager serving the NVML backend to the kubelet simulator."""
    settings = NvmlSettings(event_wait_timeout_ms=options.wait_timeout_ms)
    backend = NvmlBackend(settings, HealthPolicy(recovery_quiet_period_s=options.quiet_period_s), injected)
    figures: dict[str, Any] = {}
    kubelet = KubeletSimulator(workdir)
    manager = Manager(backend, ManagerSettings(server=ServerSettings(kubelet_dir=workdir)))
    await kubelet.start()
    try:
        began = time.perf_counter()
        await manager.start()
        try:
            await kubelet.wait_registered(RESOURCE, timeout=START_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"no {RESOURCE} registered within {START_TIMEOUT_S:g} s: is every GPU MIG-enabled, or none found?"
            ) from None
        await kubelet.wait_for(lambda: kubelet.capacity(RESOURCE) > 0, START_TIMEOUT_S)
        await kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == kubelet.capacity(RESOURCE), HEALTH_TIMEOUT_S)
        figures["start_to_device_list_ms"] = (time.perf_counter() - began) * 1000
        figures["node"] = await node_facts(manager, nvml)
        say(f"(b) Allocate: {options.calls} sequential one-GPU calls, then GetPreferredAllocation")
        await _guarded(figures, ("allocate", "preferred_allocation"), rpc_figures(kubelet, options))
        say(f"(c) health thread at idle: {options.idle_s:g} s")
        await _guarded(figures, ("health_thread_idle",), idle_figures(options))
        say(f"(d) XID at the health thread's edge → ListAndWatch: {options.xids} fake XIDs")
        await _guarded(figures, ("xid_to_list_and_watch",), xid_figures(kubelet, manager, backend, options))
    finally:
        # The kubelet goes first: a plugin that stops under a running kubelet ends its stream, which it logs.
        try:
            await kubelet.aclose()
        finally:
            began = time.perf_counter()
            await manager.aclose()
            figures["close_ms"] = (time.perf_counter() - began) * 1000
    return figures


async def _guarded(figures: dict[str, Any], keys: Sequence[str], measuring: Awaitable[dict[str, Any]]) -> None:
    """Store what ``measuring`` returns (figure name → figure); a failure is stored as each of ``keys`` failed."""
    try:
        result = await measuring
    # Whatever broke one figure, the others are still worth having from a run on a rare machine.
    except Exception as error:
        say(f"failed: {', '.join(keys)}: {error!r}")
        result = {key: {"error": repr(error)} for key in keys}
    figures.update(result)


async def node_facts(manager: Manager, nvml: Any) -> dict[str, Any]:
    """(e) what NVML found: devices, UUIDs, models, the driver, and the link of every pair of GPUs."""
    tree = manager.tree
    driver = await asyncio.to_thread(nvml.nvmlSystemGetDriverVersion)
    links = []
    for pair, link in tree.links.items():
        a, b = sorted(pair)
        links.append({"a": a, "b": b, "nvlinks": link.nvlinks, "pcie": link.pcie.name})
    return {
        "devices": len(tree.devices),
        "ids": [d.id for d in tree.devices],
        "uuids": [d.attributes.get("uuid", d.id) for d in tree.devices],
        "models": [d.attributes.get("model", "?") for d in tree.devices],
        "memory_mib": [int(d.attributes.get("memory_mib", 0)) for d in tree.devices],
        "numa_nodes": [d.numa_node for d in tree.devices],
        "driver_version": driver.decode() if isinstance(driver, bytes) else str(driver),
        "links": sorted(links, key=lambda row: (row["a"], row["b"])),
    }


async def rpc_figures(kubelet: KubeletSimulator, options: Options) -> dict[str, Any]:
    """(b) Allocate of one GPU and GetPreferredAllocation, sequential, through the simulator's stub."""
    clock = Clock()
    stub = kubelet.stub(RESOURCE)
    ids = list(kubelet.devices(RESOURCE))
    allocates = [
        v1beta1.AllocateRequest(container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=[device])])
        for device in ids
    ]
    sizes = [size for size in DEFAULT_SIZE_MIX if size <= len(ids)]
    preferred = [
        v1beta1.PreferredAllocationRequest(
            container_requests=[
                v1beta1.ContainerPreferredAllocationRequest(
                    available_deviceIDs=ids, must_include_deviceIDs=[], allocation_size=size
                )
            ]
        )
        for size in sizes
    ]
    allocate = clock.latencies("Allocate")
    preferred_allocation = clock.latencies("GetPreferredAllocation")
    for calls, into, call in (
        (options.calls, allocate, lambda n: stub.allocate(allocates[n % len(allocates)])),
        (
            options.preferred_calls,
            preferred_allocation,
            lambda n: stub.get_preferred_allocation(preferred[n % len(preferred)]),
        ),
    ):
        # Warm-up first: the first calls pay for connection set-up and cold caches.
        await run_calls(call, min(200, calls // 10), 1, None, _ignore)
        await run_calls(call, calls, 1, into, _ignore)
    return {"allocate": allocate.summary(), "preferred_allocation": preferred_allocation.summary()}


def _ignore(_: int) -> None:
    return None


def _thread_cpu_s(native_id: int) -> tuple[float, str, float]:
    """CPU time of one thread of this process: (seconds, source, resolution in seconds). Linux /proc only."""
    task = Path(f"/proc/self/task/{native_id}")
    try:
        # Nanoseconds on CPU (the scheduler's own count), where the kernel keeps it.
        return int((task / "schedstat").read_text().split()[0]) / 1e9, "schedstat", 1e-9
    except (OSError, ValueError, IndexError):
        pass
    # utime and stime in clock ticks: fields 14 and 15, counted after the command name's closing parenthesis.
    fields = (task / "stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, "stat", 1 / tick


async def idle_figures(options: Options) -> dict[str, Any]:
    """(c) the health thread's CPU over ``idle_s`` with nothing happening, and the whole process's beside it."""
    threads = [t for t in threading.enumerate() if t.name == THREAD_NAME]
    if len(threads) != 1 or threads[0].native_id is None:
        raise RuntimeError(f"expected one {THREAD_NAME} thread, found {len(threads)}")
    native_id = threads[0].native_id
    thread_before, source, resolution = _thread_cpu_s(native_id)
    process_before = time.process_time()
    began = time.perf_counter()
    await asyncio.sleep(options.idle_s)
    elapsed = time.perf_counter() - began
    thread_cpu = _thread_cpu_s(native_id)[0] - thread_before
    process_cpu = time.process_time() - process_before
    figure = {
        "idle_s": elapsed,
        "thread_cpu_s": thread_cpu,
        "cpu_s_per_s": thread_cpu / elapsed,
        "source": source,
        "resolution_s": resolution,
        "event_wait_timeout_ms": options.wait_timeout_ms,
        "process_cpu_s_per_s": process_cpu / elapsed,
        "process_note": "the whole process: plugin and kubelet simulator, both idle",
    }
    return {"health_thread_idle": figure}


async def xid_figures(
    kubelet: KubeletSimulator, manager: Manager, backend: NvmlBackend, options: Options
) -> dict[str, Any]:
    """(d) a fake XID posted from another thread, timed there, until the simulator lists the device Unhealthy."""
    clock = Clock()
    to_unhealthy = clock.latencies("XID posted → ListAndWatch Unhealthy")
    to_healthy = clock.latencies("XID posted → ListAndWatch Healthy again")
    devices = list(manager.tree.devices)
    for n in range(options.xids):
        device = devices[n % len(devices)]
        uuid = device.attributes.get("uuid", device.id)
        posted: list[float] = []

        def post(uuid: str = uuid, posted: list[float] = posted) -> None:
            posted.append(time.perf_counter())
            backend.post_from_thread(XidObserved(uuid, FIGURE_XID))

        poster = threading.Thread(target=post, name="fake-xid")
        poster.start()
        await _wait_health(kubelet, device.id, Health.UNHEALTHY)
        seen = time.perf_counter()
        # It ended once it had posted; the join only tidies up.
        await asyncio.to_thread(poster.join)
        to_unhealthy.record(posted[0], seen - posted[0])
        await _wait_health(kubelet, device.id, Health.HEALTHY, options.quiet_period_s)
        to_healthy.record(posted[0], time.perf_counter() - posted[0])
    delays = [s * 1000 for _, s in to_unhealthy.samples]
    figure = {
        "xid": FIGURE_XID,
        "count": len(delays),
        "median_ms": statistics.median(delays) if delays else None,
        "max_ms": max(delays) if delays else None,
        "samples_ms": delays,
        "unhealthy": to_unhealthy.summary(),
        "healthy_again": to_healthy.summary(),
        "quiet_period_s": options.quiet_period_s,
        "xids_counted": sum(count for (xid, _), count in backend.xid_counts.items() if xid == FIGURE_XID),
        "note": "fake XIDs at the health thread's edge; healthy_again adds the quiet period and an NVML probe",
    }
    return {"xid_to_list_and_watch": figure}


async def _wait_health(kubelet: KubeletSimulator, device: str, health: Health, extra_s: float = 0.0) -> None:
    try:
        await kubelet.wait_for(lambda: kubelet.devices(RESOURCE).get(device) == health, HEALTH_TIMEOUT_S + extra_s)
    except TimeoutError:
        raise RuntimeError(f"device {device} not listed {health} within {HEALTH_TIMEOUT_S + extra_s:g} s") from None


FIGURE_NAMES = ("allocate", "preferred_allocation", "health_thread_idle", "xid_to_list_and_watch")


def failed(figures: Mapping[str, Any]) -> list[str]:
    """The figures that could not be measured."""
    return [name for name in FIGURE_NAMES if "error" in figures.get(name, {"error": "missing"})]


def _cell(figure: Any, render: Callable[[Mapping[str, Any]], str]) -> str:
    if not isinstance(figure, Mapping):
        return "not measured"
    if "error" in figure:
        return f"**failed**: {figure['error']}"
    return render(figure)


def markdown(figures: Mapping[str, Any]) -> str:
    node = figures["node"]
    discovered = figures["discovery"]
    machine = figures["environment"]["machine"]
    quiet = figures["options"]["quiet_period_s"]
    rows = [
        ("(a) start: nvmlInit + discovery, median (ms)", discovered["start_ms"], lambda f: _n(f, "median", 1)),
        ("(a) first start, with the library load (ms)", discovered["start_ms"], lambda f: f"{f['first']:.1f}"),
        ("(a) rediscovery, median (ms)", discovered["rediscovery_ms"], lambda f: _n(f, "median", 1)),
        ("(b) Allocate p50 / p99 (ms)", figures.get("allocate"), _p50_p99),
        ("(b) GetPreferredAllocation p50 / p99 (ms)", figures.get("preferred_allocation"), _p50_p99),
        (
            "(c) health thread CPU at idle (CPU s per s)",
            figures.get("health_thread_idle"),
            lambda f: (
                f"{f['cpu_s_per_s']:.2e} ({f['cpu_s_per_s'] * 1e6:,.1f} µs/s over {f['idle_s']:.1f} s, "
                f"{f['source']}, event wait {f['event_wait_timeout_ms']} ms)"
            ),
        ),
        (
            "(c) whole process at idle (CPU s per s)",
            figures.get("health_thread_idle"),
            lambda f: f"{f['process_cpu_s_per_s']:.2e}",
        ),
        ("(d) XID → ListAndWatch Unhealthy, median (ms)", figures.get("xid_to_list_and_watch"), _xid),
        ("start to device list, in process (ms)", {"v": figures.get("start_to_device_list_ms")}, _value),
        ("close: health thread joined, NVML shut down (ms)", {"v": figures.get("close_ms")}, _value),
    ]
    lines = [
        f"# NVML backend figures ({figures['nvml']} NVML)",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} CPUs; NVIDIA GPUs: {gpus_line(machine)}.",
        f"Node as served: {node['devices']} GPUs, driver {node['driver_version']}.",
        "",
        "| GPU | UUID | model | memory MiB | NUMA |",
        "|---|---|---|---:|---|",
        *(
            f"| {i} | {u} | {m} | {mem} | {'' if numa is None else numa} |"
            for i, u, m, mem, numa in zip(
                node["ids"], node["uuids"], node["models"], node["memory_mib"], node["numa_nodes"], strict=True
            )
        ),
        "",
        "| link | NVLinks | PCIe |",
        "|---|---:|---|",
        *(f"| {row['a']} ↔ {row['b']} | {row['nvlinks']} | {row['pcie']} |" for row in node["links"]),
        "",
        "| figure | value |",
        "|---|---:|",
        *(f"| {label} | {_cell(figure, render)} |" for label, figure, render in rows),
        "",
        "(b) runs the plugin's Manager and the kubelet simulator in one process (the suite's `python -m benchmarks "
        "nvml --backend nvml` has the plugin in its own). (d) posts fake XIDs at the health thread's edge: no GPU "
        f"is touched; after each, the GPU is Healthy again after a {quiet:g} s quiet period and an NVML probe.",
    ]
    return "\n".join(lines) + "\n"


def _n(figure: Mapping[str, Any], key: str, digits: int) -> str:
    return f"{figure[key]:.{digits}f} (of {figure['count']})"


def _p50_p99(figure: Mapping[str, Any]) -> str:
    return f"{figure['p50_ms']:.3f} / {figure['p99_ms']:.3f} ({figure['count']} calls, {figure['errors']} errors)"


def _xid(figure: Mapping[str, Any]) -> str:
    return f"{figure['median_ms']:.3f} (of {figure['count']}, max {figure['max_ms']:.3f})"


def _value(figure: Mapping[str, Any]) -> str:
    return "not measured" if figure["v"] is None else f"{figure['v']:.1f}"


def write(figures: Mapping[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(figures))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--calls", type=int, default=Options.calls, show_default=True, help="Sequential Allocate calls.")
@click.option(
    "--preferred-calls",
    type=int,
    default=Options.preferred_calls,
    show_default=True,
    help="GetPreferredAllocation calls.",
)
@click.option("--discoveries", type=int, default=Options.discoveries, show_default=True, help="Backend starts.")
@click.option("--idle", "idle_s", type=float, default=Options.idle_s, show_default=True, help="Idle seconds for (c).")
@click.option("--xids", type=int, default=Options.xids, show_default=True, help="Fake XIDs for (d).")
@click.option(
    "--wait-timeout-ms",
    type=int,
    default=Options.wait_timeout_ms,
    show_default=True,
    help="The health thread's NVML event wait during (b)-(d); production's by default.",
)
@click.option("--fake", is_flag=True, help="Against backends/nvml/fake.py's fake NVML (an H200 node), not the real.")
@click.option("--fake-gpus", type=int, default=Options.fake_gpus, show_default=True, help="GPUs of the fake node.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help=f"Folder for {JSON_NAME} and {MARKDOWN_NAME}.",
)
def main(out: Path, **values: Any) -> None:
    """The NVML backend's figures against the real NVML: discovery, Allocate, idle CPU, XID delay, the node."""
    options = Options(**values)
    if min(options.calls, options.preferred_calls, options.discoveries, options.xids) < 1 or options.idle_s <= 0:
        raise click.UsageError("--calls, --preferred-calls, --discoveries, --xids and --idle must be above 0")
    logs.configure("console", "warning")
    # SIGTERM as Ctrl-C: asyncio.run cancels the run, and its cleanup closes the backend and its thread.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        figures = asyncio.run(measure(options))
    except BackendUnavailable as error:
        raise click.ClickException(f"{error}\n(--fake runs against the fake NVML instead)") from None
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    write(figures, out)
    click.echo(markdown(figures))
    say(f"results in {out / JSON_NAME} and {out / MARKDOWN_NAME}")
    if failed(figures):
        raise click.ClickException(f"not measured: {', '.join(failed(figures))} (see the table)")


if __name__ == "__main__":
    main()
