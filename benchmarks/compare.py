"""``python -m benchmarks compare OLD NEW``: did a change make the plugin slower, beyond the noise of the runs?

OLD and NEW are results folders (or their ``results.json``) of the same scenario. Each measure's samples were cut,
in the order they were taken, into consecutive chunks (``measure.CHUNKS``), and the p50 and p99 of every chunk were
recorded: the chunks are the run's repeats. For each figure, the change is the median of NEW's chunks over the
median of OLD's, and its interval a percentile bootstrap (both sides' chunks resampled with replacement, seeded, so
the same files give the same answer). A change is beyond the noise where the interval leaves out 1; it is a
regression where it is beyond the noise, slower, and by more than ``--threshold``.

Only the plugin's own measures decide the exit status: the floors' and NVIDIA's are printed as the machine's
drift between the runs (a slower floor says the machine was slower, not the plugin). Where the grpclib floor was
measured beside a measure (Allocate), each chunk is divided by the floor's chunk taken at the same time, and that
ratio, not the raw figure, is judged: a virtual machine's speed drifts between runs by more than a chunk's noise.
Facts taken once per run (RSS, start to registration) have no repeats: their change is printed, never judged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from benchmarks.plots import ROLES, role_of
from benchmarks.report import fact
from benchmarks.runner import ROLE_OURS

STATISTICS = ("p50_ms", "p99_ms")
FACTS = (
    ("idle RSS (MB)", "plugin.idle_rss_mb"),
    ("RSS after the run (MB)", "plugin.rss_after_run_mb"),
    ("start to registration (ms)", "start_to_registration_ms"),
)


@dataclass(frozen=True, slots=True)
class Change:
    """One figure in both runs: the change, its interval where there are repeats, and the verdict."""

    figure: str
    role: str
    old: float
    new: float
    ratio: float
    """NEW over OLD: the medians of the chunks where there are chunks, else the figures themselves."""
    interval: tuple[float, float] | None
    """The bootstrap interval of ``ratio``; None where either run recorded no chunks."""
    regression: bool
    judged: bool = True
    """Whether this row can be a regression: the plugin's own, and not one that its row over the floor judges."""
    unjudged_because: str = "judged over the floor, next row"

    @property
    def statistic(self) -> str:
        """``p50`` or ``p99``; empty for a fact."""
        match = re.search(r" (p50|p99)( |$)", self.figure)
        return match.group(1) if match else ""

    @property
    def beyond_noise(self) -> bool | None:
        if self.interval is None:
            return None
        low, high = self.interval
        return low > 1 or high < 1

    @property
    def verdict(self) -> str:
        beyond = self.beyond_noise
        if beyond is None:
            return "no repeats: noise unknown"
        if not beyond:
            return "within noise"
        slower = "slower" if self.ratio > 1 else "faster"
        if self.regression:
            return f"**{slower}: regression**"
        if self.role != ROLE_OURS:
            return f"{slower} (the machine: not judged)"
        return slower if self.judged else f"{slower} ({self.unjudged_because})"


def bootstrap(
    old: Sequence[float], new: Sequence[float], *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """The percentile-bootstrap interval of median(new) / median(old), both resampled with replacement."""
    rng = np.random.default_rng(seed)
    old_a, new_a = np.asarray(old, dtype=float), np.asarray(new, dtype=float)
    old_m = np.median(rng.choice(old_a, size=(resamples, len(old_a))), axis=1)
    new_m = np.median(rng.choice(new_a, size=(resamples, len(new_a))), axis=1)
    ratios = new_m / np.maximum(old_m, 1e-9)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    threshold: float,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 1,
) -> list[Change]:
    """Every figure both runs have, the plugin's first, each with its change and verdict."""
    found: list[Change] = []
    for name, before in old["latency"].items():
        after = new["latency"].get(name)
        if not after or not before.get("count") or not after.get("count"):
            continue
        role, _ = role_of(name)
        for statistic in STATISTICS:
            a, b = before.get(statistic), after.get(statistic)
            if a is None or b is None:
                continue
            chunks_a = before.get("chunks", {}).get(statistic, [])
            chunks_b = after.get("chunks", {}).get(statistic, [])
            interval = None
            ratio = b / a if a else float("inf")
            if len(chunks_a) >= 2 and len(chunks_b) >= 2:
                ratio = float(np.median(chunks_b) / max(float(np.median(chunks_a)), 1e-9))
                interval = bootstrap(chunks_a, chunks_b, resamples=resamples, confidence=confidence, seed=seed)
            label = f"{name} {statistic.removesuffix('_ms')}"
            relative = _to_floor(old, new, name, statistic) if role == ROLE_OURS else None
            judged = role == ROLE_OURS and relative is None
            found.append(_change(label, role, a, b, ratio, interval, judged, threshold))
            if relative is not None:
                chunks_a, chunks_b = relative
                interval = bootstrap(chunks_a, chunks_b, resamples=resamples, confidence=confidence, seed=seed)
                ratio = float(np.median(chunks_b) / max(float(np.median(chunks_a)), 1e-9))
                found.append(
                    _change(
                        f"{label} over the grpclib floor",
                        role,
                        float(np.median(chunks_a)),
                        float(np.median(chunks_b)),
                        ratio,
                        interval,
                        True,
                        threshold,
                    )
                )
    for label, path in FACTS:
        a_fact, b_fact = fact(old, path), fact(new, path)
        if a_fact is not None and b_fact is not None:
            ratio = b_fact / a_fact if a_fact else float("inf")
            found.append(Change(label, ROLE_OURS, a_fact, b_fact, ratio, None, False))
    order = list(ROLES)
    return sorted(found, key=lambda c: order.index(c.role))


def _change(
    label: str,
    role: str,
    old: float,
    new: float,
    ratio: float,
    interval: tuple[float, float] | None,
    judged: bool,
    threshold: float,
) -> Change:
    beyond = interval is not None and (interval[0] > 1 or interval[1] < 1)
    return Change(label, role, old, new, ratio, interval, judged and beyond and ratio > 1 + threshold, judged)


def _to_floor(
    old: Mapping[str, Any], new: Mapping[str, Any], name: str, statistic: str
) -> tuple[list[float], list[float]] | None:
    """Each run's chunks of ``name`` over the same chunks of the grpclib floor, measured by the same client in
    alternating blocks (so chunk i of each was taken at about the same time): the machine's drift between the runs
    divides out. None where either run lacks the floor's chunks."""
    ratios = []
    for run in (old, new):
        ours = run["latency"][name].get("chunks", {}).get(statistic, [])
        floor = run["latency"].get(f"floor-grpclib {name}", {}).get("chunks", {}).get(statistic, [])
        if len(ours) < 2 or len(ours) != len(floor):
            return None
        ratios.append([a / max(b, 1e-9) for a, b in zip(ours, floor, strict=True)])
    return ratios[0], ratios[1]


def markdown(old_name: str, new_name: str, found: Sequence[Change], notes: Sequence[str], threshold: float) -> str:
    lines = [f"OLD {old_name}, NEW {new_name}; a regression: the plugin slower by more than {threshold:.0%}, "]
    lines[0] += "beyond the noise (the bootstrap interval of NEW / OLD over the runs' chunks leaves out 1)."
    lines += [f"Note: {note}" for note in notes]
    lines += [
        "",
        "| figure | OLD | NEW | NEW / OLD | interval | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    for c in found:
        interval = "" if c.interval is None else f"{c.interval[0]:.3f} to {c.interval[1]:.3f}"
        lines.append(f"| {c.figure} | {c.old:,.3f} | {c.new:,.3f} | {c.ratio:.3f} | {interval} | {c.verdict} |")
    regressions = [c.figure for c in found if c.regression]
    lines += ["", f"Regressions: {', '.join(regressions)}." if regressions else "No regression."]
    return "\n".join(lines) + "\n"


def load(path: Path) -> dict[str, Any]:
    """A run's results, from its folder or its results.json."""
    file = path / "results.json" if path.is_dir() else path
    try:
        data: dict[str, Any] = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise click.BadParameter(f"{file}: {error}") from None
    return data


def notes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What makes the two runs less comparable than the figures suggest."""
    found = []
    if old.get("scenario") != new.get("scenario"):
        found.append(f"different scenarios: {old.get('scenario')} and {new.get('scenario')}")
    machines = [
        (run.get("environment", {}).get("machine", {}).get(k) for k in ("cpu", "logical_cpus", "gpus"))
        for run in (old, new)
    ]
    first, second = (tuple(m) for m in machines)
    if first != second:
        found.append(f"different machines: {first} and {second}")
    for name, run in (("OLD", old), ("NEW", new)):
        if run.get("quick"):
            found.append(f"{name} is a quick run, whose figures say little about speed")
        if run.get("errors"):
            found.append(f"{name} had {run['errors']} errors")
    return found


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("old", type=click.Path(exists=True, path_type=Path))
@click.argument("new", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--threshold",
    type=float,
    default=0.10,
    show_default=True,
    help="A slower figure of the plugin fails the comparison when beyond the noise and by more than this fraction.",
)
@click.option(
    "--judge",
    "judged",
    type=click.Choice(["p50", "p99"]),
    multiple=True,
    help="Only these percentiles can fail the comparison (repeatable); default both. The others are still printed.",
)
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Of the bootstrap interval.")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples.")
def main(old: Path, new: Path, threshold: float, judged: tuple[str, ...], confidence: float, resamples: int) -> None:
    """Each figure of the runs OLD and NEW (results folders), its change, and whether it is beyond the noise;
    exits 1 where the plugin got slower beyond the noise and the threshold."""
    before, after = load(old), load(new)
    found = changes(before, after, threshold=threshold, resamples=resamples, confidence=confidence)
    if judged:
        found = [
            c
            if c.statistic in judged
            else dataclasses.replace(c, regression=False, judged=False, unjudged_because="not judged: --judge")
            for c in found
        ]
    click.echo(markdown(str(old), str(new), found, notes(before, after), threshold), nl=False)
    if any(c.regression for c in found):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
