"""Several runs of one scenario side by side: each figure of each run, and its median over the runs.

Run ``python -m benchmarks.medians DIR [DIR ...]``, each DIR holding the ``results.json`` of one run, e.g. the three
H200 runs: ``python -m benchmarks.medians benchmarks/results/h200-x2 benchmarks/results/h200-x2/repeat-2
benchmarks/results/h200-x2/repeat-3``. It reads those files only, and prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from benchmarks.report import fact

#: Figures of the run's facts: label, their dotted paths in a results.json, and how each value is written.
FACTS = (
    ("RSS idle / after the run (MB)", ("plugin.idle_rss_mb", "plugin.rss_after_run_mb"), "{:.1f}"),
    ("start to registration (ms)", ("start_to_registration_ms",), "{:.0f}"),
    ("the plugin's own side of an Allocate (µs)", ("where_time_goes.plugin_side_us",), "{:.1f}"),
    (
        "NVIDIA's RSS idle / after the run (MB)",
        ("nvidia.plugin.idle_rss_mb", "nvidia.plugin.rss_after_run_mb"),
        "{:.1f}",
    ),
    ("NVIDIA's start to registration (ms)", ("nvidia.start_to_registration_ms",), "{:.0f}"),
)


def rows(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], str]]:
    """(figure, its value in each run, its median) for every figure that all the runs have."""
    table: list[tuple[str, list[str], str]] = []

    def add(label: str, values: Sequence[Sequence[float]], form: str) -> None:
        def cell(numbers: Sequence[float]) -> str:
            return " / ".join(form.format(n) for n in numbers)

        medians = [statistics.median(column) for column in zip(*values, strict=True)]
        table.append((label, [cell(v) for v in values], cell(medians)))

    for name in runs[0]["latency"]:
        stats = [run["latency"].get(name, {}) for run in runs]
        if all(s.get("count") for s in stats):
            add(f"{name} p50 / p99 (ms)", [(s["p50_ms"], s["p99_ms"]) for s in stats], "{:.3f}")
    for name in runs[0].get("ratios_to_floors", {}):
        ratios = [run.get("ratios_to_floors", {}).get(name, {}) for run in runs]
        if all("p50_ms" in r and "p99_ms" in r for r in ratios):
            add(f"{name}, p50 / p99", [(r["p50_ms"], r["p99_ms"]) for r in ratios], "{:.2f}x")
    for label, paths, form in FACTS:
        facts = [[value for path in paths if (value := fact(run, path)) is not None] for run in runs]
        if all(len(values) == len(paths) for values in facts):
            add(label, facts, form)
    return table


def markdown(names: Sequence[str], runs: Sequence[Mapping[str, Any]]) -> str:
    scenario = runs[0]["scenario"]
    lines = [
        f"Scenario `{scenario}`, {len(runs)} runs; errors: {', '.join(str(run['errors']) for run in runs)}.",
        "",
        f"| figure | {' | '.join(names)} | median |",
        f"|---|{'---:|' * len(names)}---:|",
    ]
    lines += [f"| {label} | {' | '.join(values)} | {median} |" for label, values, median in rows(runs)]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(folders: tuple[Path, ...]) -> None:
    """Each figure of the runs in FOLDERS (each with a results.json), and its median over them."""
    runs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    scenarios = {run["scenario"] for run in runs}
    if len(scenarios) > 1:
        raise click.UsageError(f"the runs are of different scenarios: {', '.join(sorted(scenarios))}")
    click.echo(markdown([folder.name for folder in folders], runs), nl=False)


if __name__ == "__main__":
    main()
