"""Results on disk: JSON with the machine and versions, a markdown table, and the comparison with NVIDIA's plugin."""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime
import functools
import html as htmlmod
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.nvidia_plugin import PREFIX as NVIDIA_PREFIX
from benchmarks.provenance import git_state
from benchmarks.runner import GO, NVIDIA_NOT_MEASURED, RunResult
from benchmarks.scenarios import Scenario

LIBRARIES = ("grpclib", "h2", "betterproto2", "grpcio", "hdrhistogram", "psutil", "matplotlib", "tqdm", "structlog")
REPO = Path(__file__).resolve().parent.parent
#: What ``make e2e`` measured on a real single-node cluster; the report quotes it where present.
CLUSTER_FIGURES = REPO / "benchmarks" / "results" / "cluster" / "e2e.json"
#: The real cluster's figures, in the order a reader asks for them, with what each measures.
_CLUSTER_ROWS = (
    ("apply_to_pod_running_s", "manifest applied → plugin pod Running"),
    ("apply_to_allocatable_s", "manifest applied → node allocatable shows the GPUs"),
    ("kubelet_restart_to_allocatable_s", "kubelet restarted → GPUs allocatable again (pod-resources API)"),
    ("kubelet_restart_to_node_status_s", "kubelet restarted → GPUs back in the node's status"),
    ("plugin_pod_deleted_to_ready_s", "plugin pod deleted → its replacement Ready"),
    ("xid_to_allocatable_s", "XID injected → node allocatable drops"),
    ("configmap_edit_to_allocatable_s", "ConfigMap edited → new allocatable (kubelet sync period 5 s)"),
)


@dataclass(frozen=True, slots=True)
class Figure:
    """A figure read from our plugin's measures and from NVIDIA's, taken in the same run, and our goal for it."""

    label: str
    measures: tuple[str, ...]
    """The measures, the first one that both plugins have taken: the Go client's before the Python one's; or a
    dotted path into the facts (``facts:plugin.idle_rss_mb``; NVIDIA's are under ``nvidia.``)."""
    statistic: str
    """``p50_ms`` or ``p99_ms``; ``value`` for facts."""
    within: float | None = None
    """The goal as ours over NVIDIA's: at most this many times NVIDIA's figure."""
    bound: float | None = None
    """The goal as a bound on ours alone."""

    @property
    def goal(self) -> str:
        """The goal in words; empty where there is none."""
        if self.within is not None:
            return "no slower than NVIDIA's" if self.within == 1 else f"within {self.within:g}x NVIDIA's"
        return "" if self.bound is None else f"under {self.bound:g}"


def _clients(measure: str) -> tuple[str, ...]:
    """The Go client's measure, then the Python client's."""
    return (f"{measure}{GO}", measure)


FIGURES = (
    Figure("Allocate p50 (ms)", _clients("Allocate"), "p50_ms", within=2),
    Figure("Allocate p99 (ms)", _clients("Allocate"), "p99_ms", within=2),
    Figure("Allocate, 16 callers, p99 (ms)", _clients("Allocate x16"), "p99_ms", within=2),
    Figure("GetPreferredAllocation p50 (ms)", _clients("GetPreferredAllocation"), "p50_ms", within=1),
    Figure("GetPreferredAllocation p99 (ms)", _clients("GetPreferredAllocation"), "p99_ms", within=1),
    Figure("admission p50 (ms)", (f"admission{GO}", "admission (1 container)"), "p50_ms", within=1),
    Figure("admission p99 (ms)", (f"admission{GO}", "admission (1 container)"), "p99_ms", within=1),
    Figure("re-registration median (ms)", ("re-registration",), "p50_ms", bound=10),
    Figure("idle RSS (MB)", ("facts:plugin.idle_rss_mb",), "value", bound=60),
    Figure("RSS after the run (MB)", ("facts:plugin.rss_after_run_mb",), "value", bound=60),
    Figure("start to registration (ms)", ("facts:start_to_registration_ms",), "value"),
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
        "git": git_state(),
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
    cluster = cluster_figures()
    if cluster is not None:
        report["cluster"] = cluster
    return report


def cluster_figures(path: Path = CLUSTER_FIGURES) -> dict[str, Any] | None:
    """``make e2e``'s figures from the real cluster, or None where it has not run (or wrote something unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("figures_s"), dict) else None


def cluster_section(cluster: Mapping[str, Any]) -> list[str]:
    """The real cluster's figures, through the real kubelet, with the commit and release they came from."""
    figures = cluster["figures_s"]
    lines = [
        "",
        f"On a real single-node cluster (`make e2e`: Kubernetes {cluster.get('kubernetes', '?')}, the real kubelet "
        f"and containerd, mock backend), commit {cluster.get('commit', 'unknown')}, {cluster.get('date', '')}:",
        "",
        "| figure | seconds |",
        "|---|---:|",
    ]
    for key, label in _CLUSTER_ROWS:
        value = figures.get(key)
        if isinstance(value, int | float):
            lines.append(f"| {label} | {value:.2f} |")
    return lines


def _ratios(latency: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Our Allocate over each floor's, measured with the same client loop in the same run."""
    ratios: dict[str, dict[str, float]] = {}
    for name, ours in latency.items():
        base = name.removeprefix(NVIDIA_PREFIX)
        if not base.startswith("Allocate") or "churn" in name or not ours.get("count"):
            continue
        # "Allocate x16 (Go client)" is compared with "floor-grpclib Allocate x16 (Go client)": same client, same run.
        suffix = base.removeprefix("Allocate")
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


def _lookup(report: Mapping[str, Any], measure: str, statistic: str, nvidia: bool) -> float | None:
    """Our value of a measure, or NVIDIA's from the same run; None where it was not measured."""
    if measure.startswith("facts:"):
        path = measure.removeprefix("facts:")
        return fact(report, f"nvidia.{path}" if nvidia else path)
    stats = report["latency"].get(f"{NVIDIA_PREFIX}{measure}" if nvidia else measure)
    value = stats.get(statistic) if stats else None
    return float(value) if value is not None else None


def _against_nvidia(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each figure of ours, NVIDIA's from the same run where it was measured, the goal and whether it is met (only
    where there is a goal; a goal relative to NVIDIA's is judged only where NVIDIA's was measured)."""
    measured = "nvidia" in report
    rows = []
    for figure in FIGURES:
        found = [(m, v) for m in figure.measures if (v := _lookup(report, m, figure.statistic, False)) is not None]
        if measured:
            # The first measure both have: both plugins read with the same client.
            both = [(m, v) for m, v in found if _lookup(report, m, figure.statistic, True) is not None]
            found = both or found
        if not found:
            continue
        measure, ours = found[0]
        theirs = _lookup(report, measure, figure.statistic, True) if measured else None
        met: bool | None = None
        if figure.within is not None and theirs is not None:
            met = ours <= figure.within * theirs
        elif figure.bound is not None:
            met = ours <= figure.bound
        rows.append(
            {
                "figure": figure.label,
                "measure": measure,
                "ours": ours,
                "nvidia": theirs,
                "ratio_to_nvidia": ours / theirs if theirs else None,
                "goal": figure.goal,
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
        f"Commit {env['git']['commit'] or 'unknown'}{_dirty(env['git'])}.",
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
    lines += ["", *_nvidia_section(report)]
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
    nvidia = report.get("nvidia")
    if nvidia:
        process = nvidia["plugin"]
        lines += [
            "",
            f"NVIDIA's plugin process: start to registration {nvidia['start_to_registration_ms']:.0f} ms, to device "
            f"list {nvidia['start_to_device_list_ms']:.0f} ms; RSS idle {process['idle_rss_mb']:.1f} MB, after the "
            f"run {process['rss_after_run_mb']:.1f} MB, peak {process['peak_rss_mb']:.1f} MB; CPU "
            f"{process['cpu_s_during_run']:.2f} s during the run; exit code {process['exit_code']}; "
            f"{len(process['log_problems'])} warning or error lines logged.",
        ]
    ends = report.get("stream_ends", [])
    if ends:
        lines += [
            "",
            f"The kubelet saw {len(ends)} ListAndWatch stream(s) of a current endpoint end (allocatable drops to 0 "
            "until the next registration): " + "; ".join(f"{e['endpoint']} ({e['error'] or 'closed'})" for e in ends),
        ]
    for measure, reason in report.get("not_measured", {}).items():
        if measure != NVIDIA_NOT_MEASURED:  # said with the comparison above
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
    if report.get("cluster"):
        lines += cluster_section(report["cluster"])
    return "\n".join(lines) + "\n"


def _dirty(git: Mapping[str, Any]) -> str:
    if git.get("dirty") is None:
        return " (whether files differed from it is unknown: git could not tell)"
    if not git["dirty"]:
        return ", no file changed"
    changed = git.get("changed") or []
    return f" with changes not committed ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"


def _nvidia_section(report: Mapping[str, Any]) -> list[str]:
    """The comparison with NVIDIA's plugin measured in the same run, or why there is none; goals either way."""
    nvidia = report.get("nvidia")
    if nvidia:
        lines = [
            f"NVIDIA's device plugin {nvidia.get('version', '')} was measured in this run, after ours, through the "
            "same phases with the same clients (its measures are those named `nvidia ...` above). Each figure reads "
            "the first measure both plugins have: the Go client's (gokubelet, grpc-go, calling as the kubelet "
            "does) where it is built.",
        ]
    else:
        reason = report.get("not_measured", {}).get(NVIDIA_NOT_MEASURED, "this scenario does not run it")
        lines = [
            f"NVIDIA's device plugin was not measured in this run ({reason.removesuffix('.')}): no figure is "
            "compared with NVIDIA's, and goals relative to it are not judged.",
        ]
    rows = report["against_nvidia"]
    if not rows:
        return lines
    lines += [
        "",
        "| figure | measure | ours | NVIDIA, same run | ours / NVIDIA | goal | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        theirs = "" if row["nvidia"] is None else f"{row['nvidia']:,.3f}"
        ratio = "" if row["ratio_to_nvidia"] is None else f"{row['ratio_to_nvidia']:.2f}x"
        if not row["goal"]:
            met = ""
        elif row["met"] is None:
            met = "not judged"
        else:
            met = "yes" if row["met"] else "**no**"
        lines.append(
            f"| {row['figure']} | {row['measure'].removeprefix('facts:')} | {row['ours']:,.3f} | {theirs} | {ratio} "
            f"| {row['goal']} | {met} |"
        )
    return lines


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write(report: Mapping[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(report))


def write_html(report: Mapping[str, Any], out_dir: Path, plots: Sequence[tuple[Path, str]]) -> Path:
    """``report.html``: the markdown's tables and every plot (embedded as base64 PNG, with its caption), one file
    that opens anywhere."""
    path = out_dir / "report.html"
    path.write_text(html(markdown(report), plots))
    return path


_INLINE = (
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
)
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}"
    "figure{margin:2em 0}img{max-width:100%}figcaption{font-weight:600;margin-bottom:.5em}"
)


def _inline(text: str) -> str:
    text = htmlmod.escape(text, quote=False)
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


def html(text: str, plots: Sequence[tuple[Path, str]] = ()) -> str:
    """A page of the report's markdown (headings, paragraphs, tables, bold and code) and the plots, self-contained."""
    body: list[str] = []
    title = "Benchmark"
    blocks = re.split(r"\n\s*\n", text.strip())
    for block in blocks:
        lines = block.splitlines()
        if lines[0].startswith("# "):
            title = re.sub(r"[`*]", "", lines[0][2:])
            body.append(f"<h1>{_inline(lines[0][2:])}</h1>")
            lines = lines[1:]
            if not lines:
                continue
        if all(line.startswith("|") for line in lines) and len(lines) >= 2:
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            aligns = [c.strip().endswith(":") for c in lines[1].strip("|").split("|")]
            rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>"]
            for line in lines[2:]:
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows.append(
                    "<tr>"
                    + "".join(
                        f"<td{' class=n' if i < len(aligns) and aligns[i] else ''}>{_inline(c)}</td>"
                        for i, c in enumerate(cells)
                    )
                    + "</tr>"
                )
            body.append("<table>" + "".join(rows) + "</table>")
        else:
            body.append(f"<p>{_inline(' '.join(lines))}</p>")
    for path, caption in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(
            f"<figure><figcaption>{_inline(caption)}</figcaption>"
            f'<img alt="{htmlmod.escape(caption)}" src="data:image/png;base64,{data}"></figure>'
        )
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{htmlmod.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
