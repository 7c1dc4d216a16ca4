"""PNG plots of a run, each answering one question, in small multiples with one fixed colour per role.

The roles are the plugin (ours), the grpclib floor, the grpcio floor and NVIDIA's plugin; every plot draws each in
the same colour, and puts its legend outside the data, above the panels.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or nodes

import matplotlib.pyplot as plt
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from benchmarks.measure import Latencies
from benchmarks.nvidia_plugin import PREFIX as NVIDIA_PREFIX
from benchmarks.runner import GO, ROLE_NVIDIA, ROLE_OURS, RunResult

FLOOR_GRPCLIB = "floor-grpclib"
FLOOR_GRPCIO = "floor-grpcio"
#: Each role's colour and name, in the order legends list them.
ROLES: Mapping[str, tuple[str, str]] = {
    ROLE_OURS: ("#1f77b4", "gpuplugin (ours)"),
    FLOOR_GRPCLIB: ("#ff7f0e", "grpclib floor (fixed bytes)"),
    FLOOR_GRPCIO: ("#8c8c8c", "grpcio floor (fixed bytes)"),
    ROLE_NVIDIA: ("#76b900", "NVIDIA's device plugin"),
}
UNHEALTHY, HEALTHY, RESTART = "#d62728", "#17becf", "black"
_PERCENTILE_TICKS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
DPI = 100


def role_of(name: str) -> tuple[str, str]:
    """(role, the measure's name without the role): "nvidia Allocate (Go client)" is NVIDIA's "Allocate (Go client)"."""
    for role, prefix in ((FLOOR_GRPCLIB, f"{FLOOR_GRPCLIB} "), (FLOOR_GRPCIO, f"{FLOOR_GRPCIO} ")):
        if name.startswith(prefix):
            return role, name.removeprefix(prefix)
    if name.startswith(NVIDIA_PREFIX):
        return ROLE_NVIDIA, name.removeprefix(NVIDIA_PREFIX)
    return ROLE_OURS, name


def by_role(measures: Mapping[str, Latencies]) -> dict[str, dict[str, Latencies]]:
    """The measures as {measure name without the role: {role: measure}}, measures without samples left out."""
    table: dict[str, dict[str, Latencies]] = {}
    for name, measure in measures.items():
        if measure.samples:
            role, base = role_of(name)
            table.setdefault(base, {})[role] = measure
    return table


@dataclass(frozen=True, slots=True)
class Panel:
    """One panel of a plot: its title and the measure (without the role) it draws for every role."""

    title: str
    measure: str


def _figure(panels: int, columns: int, height_in: float = 3.6, width_in: float = 5.2) -> tuple[Figure, list[Axes]]:
    rows = -(-panels // columns)
    figure = plt.figure(figsize=(width_in * columns + 0.6, height_in * rows + 0.9), layout="constrained", dpi=DPI)
    axes = figure.subplots(rows, columns, squeeze=False)
    flat = [a for row in axes for a in row]
    for extra in flat[panels:]:
        extra.set_visible(False)
    return figure, flat[:panels]


def _legend(figure: Figure, roles: Sequence[str], extra: Sequence[tuple[Artist, str]] = ()) -> None:
    handles: list[Artist] = [Line2D([], [], color=ROLES[r][0], linewidth=2.5) for r in roles]
    labels = [ROLES[r][1] for r in roles]
    handles += [h for h, _ in extra]
    labels += [label for _, label in extra]
    # Below the panels: never over the data, and clear of the title above.
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path)
    plt.close(figure)
    return path


def _cdf(axes: Axes, measure: Latencies, colour: str) -> None:
    """Latency at each percentile, the percentile on a logit axis so that p99 and p99.9 get as much room as p50."""
    latencies = sorted(s * 1000 for _, s in measure.samples)
    count = len(latencies)
    if count < 2:
        axes.plot([0.5], latencies, "o", color=colour)
        return
    # Every sample on small measures; on large ones about 400 points, denser in the tail.
    step = max(1, count // 400)
    indexes = sorted(set(range(0, count, step)) | set(range(max(0, count - 400), count)))
    axes.plot([(i + 0.5) / count for i in indexes], [latencies[i] for i in indexes], color=colour, linewidth=1.6)


def _log_y(axes: Axes) -> None:
    """A log latency axis labelled in plain numbers (0.2, 0.5, 1, 2), ticks at 1, 2 and 5 of each decade."""
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def _cdf_axes(axes: Axes, title: str, top: float) -> None:
    axes.set_xscale("logit")
    _log_y(axes)
    ticks = [t for t in _PERCENTILE_TICKS if t <= top]
    axes.set_xticks(ticks, [f"p{100 * t:g}" for t in ticks])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("percentile of calls")
    axes.set_ylabel("latency (ms)")
    axes.set_title(title, fontsize="medium")
    axes.grid(True, which="major", alpha=0.3)


def _cdf_plot(result: RunResult, panels: Sequence[Panel], title: str, path: Path, columns: int) -> Path | None:
    table = by_role(result.measures)
    present = [p for p in panels if p.measure in table]
    if not present:
        return None
    figure, axes = _figure(len(present), min(columns, len(present)))
    roles = [r for r in ROLES if any(r in table[p.measure] for p in present)]
    for panel, ax in zip(present, axes, strict=True):
        largest = 2
        for role in roles:
            measure = table[panel.measure].get(role)
            if measure is not None:
                _cdf(ax, measure, ROLES[role][0])
                largest = max(largest, len(measure.samples))
        _cdf_axes(ax, panel.title, 1 - 0.5 / largest)
    figure.suptitle(title, fontsize="large")
    _legend(figure, roles)
    return _save(figure, path)


def allocate(result: RunResult, path: Path) -> Path | None:
    """Allocate of one GPU beside both floors (and NVIDIA's plugin), one panel per client and number of callers."""
    panels = [
        Panel("1 caller, Python client (grpclib)", "Allocate"),
        Panel("1 caller, Go client (grpc-go, as the kubelet)", f"Allocate{GO}"),
        Panel("16 callers, Python client", "Allocate x16"),
        Panel("16 callers, Go client", f"Allocate x16{GO}"),
    ]
    return _cdf_plot(result, panels, "Is Allocate at its floor? Latency of Allocate of one GPU", path, 2)


def preferred(result: RunResult, path: Path) -> Path | None:
    """GetPreferredAllocation alone, every device available, one panel per client."""
    panels = [
        Panel("Python client", "GetPreferredAllocation"),
        Panel("Go client", f"GetPreferredAllocation{GO}"),
    ]
    return _cdf_plot(result, panels, "How fast is the preferred allocation? GetPreferredAllocation", path, 2)


def admission(result: RunResult, path: Path) -> Path | None:
    """Whole admissions: the Go client's (both RPCs and the checkpoint), and the simulator's during the churn."""
    panels = [
        Panel("Go client: GetPreferredAllocation, Allocate, checkpoint", f"admission{GO}"),
        Panel("during the churn, one container (simulator)", "admission (1 container)"),
    ]
    return _cdf_plot(result, panels, "How long does a pod's admission take?", path, 2)


def reregistration(result: RunResult, path: Path) -> Path | None:
    """Each kubelet restart as a dot, per plugin, with the median as a bar: to Register, and to the device list."""
    table = by_role(result.measures)
    panels = [
        Panel("to Register", "re-registration"),
        Panel("to the device list", "re-registration to device list"),
        Panel("to Register, restarts mid-churn", "re-registration (mid-churn)"),
    ]
    present = [p for p in panels if p.measure in table]
    if not present:
        return None
    figure, axes = _figure(len(present), len(present), height_in=3.4, width_in=3.8)
    roles = [r for r in ROLES if any(r in table[p.measure] for p in present)]
    for panel, ax in zip(present, axes, strict=True):
        for x, role in enumerate(roles):
            measure = table[panel.measure].get(role)
            if measure is None:
                continue
            values = [s * 1000 for _, s in measure.samples]
            spread = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
            ax.scatter(spread, values, s=16, color=ROLES[role][0], alpha=0.7)
            ax.hlines(statistics.median(values), x - 0.3, x + 0.3, color=ROLES[role][0], linewidth=2.5)
        ax.set_xticks(range(len(roles)), [ROLES[r][1].split(" (")[0] for r in roles])
        ax.set_xlim(-0.6, len(roles) - 0.4)
        _log_y(ax)  # one slow restart (a second) must not flatten the others (a few ms)
        ax.set_ylabel("after kubelet.sock is served again (ms)")
        ax.set_title(panel.title, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
    figure.suptitle("How soon after a kubelet restart is the plugin back? (dots: restarts, bar: median)")
    _legend(figure, roles)
    return _save(figure, path)


def churn(result: RunResult, path: Path) -> Path | None:
    """Each plugin's churn over time: every pod's admission, its rolling median, health events and kubelet restarts."""
    table = by_role(result.measures)
    traces = [(role, trace) for role, trace in result.churns.items() if role in table.get("admission", {})]
    if not traces:
        return None
    figure = plt.figure(figsize=(11.5, 3.3 * len(traces) + 1.0), layout="constrained", dpi=DPI)
    axes = figure.subplots(len(traces), 1, squeeze=False, sharex=True, sharey=True)
    flaps = False
    for (role, trace), [ax] in zip(traces, axes, strict=True):
        colour, label = ROLES[role]
        samples = sorted(table["admission"][role].samples)
        times = [t - trace.began_s for t, _ in samples]
        values = [s * 1000 for _, s in samples]
        ax.scatter(times, values, s=7, color=colour, alpha=0.6, linewidths=0)
        ax.plot(*_rolling_median(times, values, 0.5), color="black", linewidth=1.2)
        for at, health in trace.health_events:
            ax.axvline(at - trace.began_s, color=UNHEALTHY if health == "Unhealthy" else HEALTHY, alpha=0.4, lw=0.8)
        for at in trace.restart_times_s:
            ax.axvline(at - trace.began_s, color=RESTART, linestyle="--", linewidth=1.3)
        flaps = flaps or bool(trace.health_events)
        _log_y(ax)
        ax.set_ylabel("pod admission (ms)")
        ax.set_title(f"{label}: {len(values)} pods", fontsize="medium", loc="left")
        ax.grid(True, which="major", alpha=0.3)
    axes[-1][0].set_xlabel("seconds since the churn began")
    extra: list[tuple[Artist, str]] = [
        (Line2D([], [], color="black", linewidth=1.2), "rolling median (0.5 s)"),
        (Line2D([], [], color=RESTART, linestyle="--"), "kubelet restart"),
    ]
    if flaps:
        extra += [
            (Line2D([], [], color=UNHEALTHY), "a GPU turns unhealthy"),
            (Line2D([], [], color=HEALTHY), "healthy again"),
        ]
    figure.suptitle(
        "Does admission hold up through churn"
        + (", health flaps" if flaps else " (no health flaps on this backend)")
        + " and kubelet restarts?"
    )
    _legend(figure, [role for role, _ in traces], extra)
    return _save(figure, path)


def _rolling_median(
    times: Sequence[float], values: Sequence[float], window_s: float
) -> tuple[list[float], list[float]]:
    """Medians of consecutive windows of ``window_s`` seconds, at each window's middle."""
    xs: list[float] = []
    ys: list[float] = []
    bucket: list[float] = []
    start = times[0] if times else 0.0
    for t, v in zip(times, values, strict=True):
        if t - start >= window_s and bucket:
            xs.append(start + window_s / 2)
            ys.append(statistics.median(bucket))
            bucket, start = [], start + window_s * int((t - start) // window_s)
        bucket.append(v)
    if bucket:
        xs.append(start + window_s / 2)
        ys.append(statistics.median(bucket))
    return xs, ys


#: Every plot: its file, what draws it, and the question it answers (the HTML report's caption).
PLOTS: Sequence[tuple[str, Callable[[RunResult, Path], Path | None], str]] = (
    ("allocate.png", allocate, "Allocate of one GPU against both floors and NVIDIA's plugin, per client"),
    ("preferred.png", preferred, "GetPreferredAllocation alone, per client"),
    ("admission.png", admission, "Whole pod admissions"),
    ("reregistration.png", reregistration, "Re-registration after kubelet restarts"),
    ("churn.png", churn, "The churn over time, with health events and kubelet restarts marked"),
)


def write(result: RunResult, out_dir: Path) -> list[Path]:
    """Every plot the run has data for, into ``out_dir``; the files written."""
    written = []
    for name, draw, _ in PLOTS:
        path = draw(result, out_dir / name)
        if path is not None:
            written.append(path)
    return written


def caption(path: Path) -> str:
    """The question a written plot answers."""
    return next((text for name, _, text in PLOTS if name == path.name), path.stem)
