"""PNG plots of a run: the latency distribution of each measure, and latency over time with events marked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or nodes

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks.measure import Latencies
from benchmarks.runner import RunResult

#: Latency over time: only the request paths, not the slow, rare restart and health measures.
_OVER_TIME_PREFIXES = ("Allocate", "GetPreferredAllocation", "admission", "floor-")


def _axes(width_in: float) -> tuple[Figure, Axes]:
    figure, axes = plt.subplots(figsize=(width_in, 6))
    # Twenty distinct colours: a run has up to a dozen measures, and tab10 would repeat.
    axes.set_prop_cycle(color=[plt.get_cmap("tab20")(i / 20) for i in range(20)])
    return figure, axes


def latency_cdf(measures: Mapping[str, Latencies], path: Path) -> None:
    """Latency against percentile on a logit axis, so the tail (p99, p99.9) gets as much room as the median."""
    figure, axes = _axes(10)
    for name, measure in measures.items():
        latencies = sorted(s * 1000 for _, s in measure.samples)
        if len(latencies) < 2:
            continue
        count = len(latencies)
        fractions = [(i + 0.5) / count for i in range(count)]
        axes.plot(fractions, latencies, label=f"{name} (n={count})", linewidth=1.2)
    axes.set_xscale("logit")
    axes.set_yscale("log")
    axes.set_xlabel("percentile (fraction of calls at or below)")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency distribution")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # none where no measure has two samples (a single restart)
        # A fixed place: "best" searches the data, and on large runs matplotlib warns that it is slow.
        axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency_over_time(result: RunResult, path: Path) -> None:
    """Every call as a dot; health changes (red: Unhealthy, green: Healthy) and kubelet restarts as lines."""
    figure, axes = _axes(12)
    for name, measure in result.measures.items():
        if not name.startswith(_OVER_TIME_PREFIXES) or not measure.samples:
            continue
        axes.scatter(
            [t for t, _ in measure.samples], [s * 1000 for _, s in measure.samples], s=2, alpha=0.5, label=name
        )
    for at, health in result.health_events:
        axes.axvline(at, color="tab:red" if health == "Unhealthy" else "tab:green", alpha=0.25, linewidth=0.8)
    for at in result.restart_times_s:
        axes.axvline(at, color="black", linestyle="--", linewidth=1.2)
    axes.set_yscale("log")
    axes.set_xlabel("seconds since the run began")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency over time (red: GPU unhealthy, green: healthy again, dashed: kubelet restart)")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # none where the run made no calls (restarts alone)
        axes.legend(fontsize="small", markerscale=4, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(result: RunResult, out_dir: Path) -> list[Path]:
    cdf, over_time = out_dir / "latency_cdf.png", out_dir / "latency_over_time.png"
    latency_cdf(result.measures, cdf)
    latency_over_time(result, over_time)
    return [cdf, over_time]
