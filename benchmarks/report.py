"""Results on disk: JSON with the machine and versions, a markdown table, and the comparison with NVIDIA's plugin."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.runner import GO, RunResult
from benchmarks.scenarios import Scenario

LIBRARIES = ("grpclib", "h2", "betterproto2", "grpcio", "hdrhistogram", "psutil", "matplotlib", "tqdm", "structlog")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Reference:
    """A figure of NVIDIA's Go plugin v0.20.0 (H200, 2 GPUs, NVLink, the kubelet's device-manager code) and our goal."""

    label: str
    measures: tuple[str, ...]
    """Our measures, the first one present taken: the Go client's before the Python one's; or a dotted path into
    the facts (``facts:plugin.idle_rss_mb``)."""
    statistic: str
    """``p50_ms``, ``p99_ms``, ``throughput_per_s`` or ``value`` for facts."""
    nvidia: float
    goal: float
    """The bound we must meet."""
    lower_is_better: bool = True


def _clients(measure: str) -> tuple[str, ...]:
    """The Go client's measure, then the Python client's."""
    return (f"{measure}{GO}", measure)


REFERENCES = (
    Reference("Allocate p50 (ms)", _clients("Allocate"), "p50_ms", 0.09, 0.18),
    Reference("Allocate p99 (ms)", _clients("Allocate"), "p99_ms", 0.30, 0.60),
    Reference("Allocate throughput (/s)", _clients("Allocate"), "throughput_per_s", 10_000, 5_000, False),
    Reference("Allocate x16 p99 (ms)", _clients("Allocate x16"), "p99_ms", 1.0, 2.0),
    Reference("GetPreferredAllocation p50 (ms)", _clients("GetPreferredAllocation"), "p50_ms", 0.35, 0.35),
    Reference("GetPreferredAllocation p99 (ms)", _clients("GetPreferredAllocation"), "p99_ms", 2.2, 2.2),
    Reference("admission p50 (ms)", (f"admission{GO}", "admission (1 container)"), "p50_ms", 0.93, 0.93),
    Reference("admission p99 (ms)", (f"admission{GO}", "admission (1 container)"), "p99_ms", 4.2, 4.2),
    Reference("re-registration median (ms)", ("re-registration",), "p50_ms", 3.6, 10.0),
    Reference("idle RSS (MB)", ("facts:plugin.idle_rss_mb",), "value", 42, 60),
    Reference("RSS after the run (MB)", ("facts:plugin.rss_after_run_mb",), "value", 50, 60),
    Reference("start to registration (ms)", ("facts:start_to_registration_ms",), "value", 62, float("inf")),
)


def environment() -> dict[str, Any]:
    """The machine, the interpreter, the libraries and the commit: what a figure needs to be compared."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_1m": os.getloadavg()[0],
            **nvidia_gpus(),
        },
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "libraries": versions,
        "git": _git(),
    }


@functools.cache
def nvidia_gpus() -> dict[str, Any]:
    """GPU names and driver version, read once through NVML in this process; ``"none"`` where NVML does not start."""
    none = {"gpus": "none", "nvidia_driver": "none"}
    try:
        import pynvml

        pynvml.nvmlInit()
    # Any failure (no bindings, no library, no driver, no permission) means the same: no GPU to report.
    except Exception as error:
        return {**none, "nvml": f"unavailable: {error}"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = [_text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        return {"gpus": names or "none", "nvidia_driver": _text(pynvml.nvmlSystemGetDriverVersion())}
    except pynvml.NVMLError as error:
        return {**none, "nvml": f"unreadable: {error}"}
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpus_line(machine: Mapping[str, Any]) -> str:
    """``2x NVIDIA H200, driver 580.95.05`` or ``none``."""
    gpus = machine.get("gpus", "none")
    if not isinstance(gpus, list):
        return "none"
    counted = ", ".join(f"{n}x {name}" for name, n in collections.Counter(gpus).items())
    return f"{counted}, driver {machine.get('nvidia_driver', '?')}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: read only; never refresh the index of a checkout others work in.
            done = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def plain(value: Any) -> Any:
    """Settings as JSON-ready values (``dataclasses.asdict`` cannot copy a read-only mapping)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def build_report(
    scenario: Scenario, result: RunResult, *, seed: int, quick: bool, started: datetime.datetime, wall_s: float
) -> dict[str, Any]:
    latency = {name: m.summary() for name, m in result.measures.items()}
    errors = sum(s["errors"] for s in latency.values())
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.description,
        "backend": result.backend,
        "gpus": result.gpus,
        "resource": result.resource,
        "devices": result.devices,
        "settings": plain(scenario),
        "seed": seed,
        "quick": quick,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "environment": environment(),
        "errors": errors,
        "latency": latency,
        **result.facts,
        "ratios_to_floors": _ratios(latency),
    }
    report["against_nvidia"] = _against_nvidia(report)
    return report


def _ratios(latency: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Our Allocate over each floor's, measured with the same client loop in the same run."""
    ratios: dict[str, dict[str, float]] = {}
    for name, ours in latency.items():
        if not name.startswith("Allocate") or "churn" in name or not ours.get("count"):
            continue
        # "Allocate x16 (Go client)" is compared with "floor-grpclib Allocate x16 (Go client)": same client, same run.
        suffix = name.removeprefix("Allocate")
        for floor in ("floor-grpclib", "floor-grpcio"):
            theirs = latency.get(f"{floor} Allocate{suffix}")
            if theirs and theirs.get("count"):
                ratios[f"{name} / {floor}"] = {
                    stat: ours[stat] / theirs[stat] for stat in ("p50_ms", "p90_ms", "p99_ms") if theirs[stat]
                }
    return ratios


def fact(report: Mapping[str, Any], path: str) -> float | None:
    """The number at a dotted path of a report (``plugin.idle_rss_mb``), or None where there is none."""
    value: Any = report
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _lookup(report: Mapping[str, Any], reference: Reference) -> tuple[str, float] | None:
    """The measure the reference reads and its value, or None where none was measured."""
    for measure in reference.measures:
        if measure.startswith("facts:"):
            value = fact(report, measure.removeprefix("facts:"))
            if value is not None:
                return measure, value
            continue
        stats = report["latency"].get(measure)
        if stats and stats.get(reference.statistic) is not None:
            return measure, float(stats[reference.statistic])
    return None


def _against_nvidia(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for reference in REFERENCES:
        found = _lookup(report, reference)
        if found is None:
            continue
        measure, ours = found
        met = ours <= reference.goal if reference.lower_is_better else ours >= reference.goal
        rows.append(
            {
                "figure": reference.label,
                "measure": measure,
                "ours": ours,
                "nvidia_v0_20_0": reference.nvidia,
                "ratio_to_nvidia": ours / reference.nvidia,
                "goal": reference.goal,
                "met": met,
            }
        )
    return rows


def _as_devices(report: Mapping[str, Any]) -> str:
    """`` as 56 nvidia.com/mig-1g.18gb`` where the GPUs are served as partitions or replicas, else nothing."""
    devices, resource = report.get("devices"), report.get("resource")
    if not devices or not resource or devices == report.get("gpus"):
        return ""
    return f" as {devices} {resource}"


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    machine = env["machine"]
    lines = [
        f"# Benchmark `{report['scenario']}`{' (quick: proves the suite works, not speed)' if report['quick'] else ''}",
        "",
        f"{report['description']}. Seed {report['seed']}, {report['started_at']}, {report['wall_s']:.1f} s.",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} CPUs, load {machine['load_average_1m']:.2f}; "
        f"Python {env['python']['version']}; grpclib {env['libraries']['grpclib']}, "
        f"betterproto2 {env['libraries']['betterproto2']}, grpcio {env['libraries']['grpcio']}; "
        f"commit {(env['git']['commit'] or '?')[:12]}{' (dirty)' if env['git']['dirty'] else ''}.",
        f"Backend {report.get('backend', 'mock')}, {report.get('gpus', '?')} GPUs served{_as_devices(report)}; "
        f"NVIDIA GPUs of the machine: {gpus_line(machine)}.",
        "",
        f"**Errors: {report['errors']}**",
        "",
        "| measure | count | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | per s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in report["latency"].items():
        if not s["count"] and not s["errors"]:
            continue
        cells = [_ms(s.get(k)) for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")]
        rate = f"{s['throughput_per_s']:,.0f}" if "throughput_per_s" in s else ""
        lines.append(f"| {name} | {s['count']} | {' | '.join(cells)} | {rate} | {s['errors']} |")
    if report["ratios_to_floors"]:
        lines += ["", "| ratio (same client loop, same run) | p50 | p90 | p99 |", "|---|---:|---:|---:|"]
        for name, r in report["ratios_to_floors"].items():
            lines.append(f"| {name} | {' | '.join(f'{r.get(k, 0):.2f}x' for k in ('p50_ms', 'p90_ms', 'p99_ms'))} |")
    if report["against_nvidia"]:
        lines += [
            "",
            "NVIDIA's figures come from an H200 host, driven by the kubelet's own Go code (grpc-go). Ours are read "
            "from the measure named: those marked (Go client) were taken by gokubelet, a grpc-go client calling as "
            "the kubelet does, in its own process; the others by the simulator's Python client, which costs about "
            "as much per call as the plugin. Only on that host do the 'met' column's answers hold; elsewhere, read "
            "the ratios to the floors above.",
            "",
            "| figure | measure | ours | NVIDIA v0.20.0 | ours / NVIDIA | goal | met |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in report["against_nvidia"]:
            goal = "—" if row["goal"] == float("inf") else f"{row['goal']:g}"
            met = "yes" if row["met"] else "**no**"
            lines.append(
                f"| {row['figure']} | {row['measure'].removeprefix('facts:')} | {row['ours']:,.3f} "
                f"| {row['nvidia_v0_20_0']:g} | {row['ratio_to_nvidia']:.2f}x | {goal} | {met} |"
            )
    plugin = report.get("plugin")
    if plugin:
        lines += [
            "",
            f"Plugin process: start to registration {report['start_to_registration_ms']:.0f} ms, to device list "
            f"{report['start_to_device_list_ms']:.0f} ms; RSS idle {plugin['idle_rss_mb']:.1f} MB, after the run "
            f"{plugin['rss_after_run_mb']:.1f} MB, peak {plugin['peak_rss_mb']:.1f} MB; "
            f"CPU {plugin['cpu_s_during_run']:.2f} s "
            f"during the run ({plugin['cpu_s_total']:.2f} s in all); exit code {plugin['exit_code']}; "
            f"{len(plugin['log_problems'])} warning or error lines logged.",
        ]
        settings = " ".join(f"{k}={v}" for k, v in plugin.get("environment", {}).items())
        if settings:
            lines[-1] += f" Its settings from the environment: {settings}."
    ends = report.get("stream_ends", [])
    if ends:
        lines += [
            "",
            f"The kubelet saw {len(ends)} ListAndWatch stream(s) of a current endpoint end (allocatable drops to 0 "
            "until the next registration): " + "; ".join(f"{e['endpoint']} ({e['error'] or 'closed'})" for e in ends),
        ]
    for measure, reason in report.get("not_measured", {}).items():
        lines += ["", f"Not measured: {measure} ({reason})."]
    if "churn" in report:
        c = report["churn"]
        lines += [
            "",
            f"Churn: {c['pods_admitted']} pods ({c['containers_admitted']} containers) in {c['wall_s']:.1f} s, "
            f"{c['admissions_per_s']:.0f} admissions/s; {c['pods_that_waited_for_room']} waited for free devices; "
            f"{c['health_events']} health changes; {c['kubelet_restarts']} kubelet restarts.",
        ]
    where = report.get("where_time_goes")
    if where:
        codec = where["codec_us"]
        lines += [
            "",
            "Where an Allocate's time goes (medians, µs): the client's betterproto2 work "
            f"{where['client_protobuf_us']:.0f} (request encode {codec['request_encode_us']:.1f}, response of "
            f"{codec['response_bytes']} bytes decode {codec['response_decode_us']:.1f}); the plugin's own side "
            f"{where['plugin_side_us']:.1f} (request decode {codec['plugin_request_decode_us']:.1f}, handler "
            f"{where['allocate_handler_us']:.1f}, timed in process, where betterproto2 takes "
            f"{codec['response_encode_us']:.1f} to encode the same response); grpclib transport "
            f"{where['grpclib_transport_us']:.0f}; the plugin's median is {where['over_the_floor_us']:+.0f} µs from "
            f"the grpclib floor's. On 64 GPUs a health change rebuilds a resource's view in "
            f"{where['view_health_change_64_gpus_ms']:.1f} ms, against {where['view_build_64_gpus_ms']:.1f} ms "
            "from scratch. "
            f"**{where['dominant']} dominates.**",
        ]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write(report: Mapping[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(report))
