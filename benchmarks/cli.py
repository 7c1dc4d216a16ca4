"""``python -m benchmarks``: run named scenarios and write their results (from a checkout; not in the wheel)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from benchmarks import plots, provenance, report
from benchmarks.runner import RunSettings, run_scenario
from benchmarks.scenarios import BACKENDS, FULL_SUITE, FULL_SUITE_NVML, SCENARIOS, Scenario, suite
from gpuplugin.cli import FiniteRange, OneLineErrors
from gpuplugin.daemon import logs

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def list_scenarios() -> str:
    lines = []
    for scenario in SCENARIOS.values():
        lines.append(f"  {scenario.name:<14} {scenario.description}")
    lines.append(f"  {'all':<14} {', '.join(FULL_SUITE)}; with --backend nvml: {', '.join(FULL_SUITE_NVML)}")
    return "\n".join(lines)


@click.command(
    "bench",
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="\b\nScenarios:\n"
    + list_scenarios()
    + "\n\n\b\npython -m benchmarks compare OLD NEW: each figure's change between two results folders, beyond the noise"
    "\nor not; exit 1 on a regression (python -m benchmarks compare --help).",
)
@click.argument("scenario_name", metavar="[SCENARIO]", default="whole-8")
@click.option("--list", "show_list", is_flag=True, help="List the scenarios and exit.")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="mock",
    show_default=True,
    help="The plugin's backend: mock GPUs, or the node's real GPUs through NVML (count: what registers; no flaps).",
)
@click.option("--quick", is_flag=True, help="A few seconds per scenario: proves the suite works, not speed (CI).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the churn, the flaps and the sizes.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Results folder. Default: benchmarks/results/<scenario>/; with several scenarios, one folder each in it.",
)
# Ranges: far beyond any useful run, so that a typo is one line and not a traceback or a run that never ends.
@click.option("--calls", type=click.IntRange(0, 10**7), help="Allocate calls per target (plugin and each floor).")
@click.option("--preferred-calls", type=click.IntRange(0, 10**7), help="GetPreferredAllocation calls alone.")
@click.option("--callers", type=click.IntRange(1, 1024), help="Concurrent Allocate callers.")
@click.option("--count", "restarts", type=click.IntRange(0, 10**4), help="Kubelet restarts in the restart phase.")
@click.option("--gpus", type=click.IntRange(1, 1024), help="Mock GPUs on the node.")
@click.option("--duration", type=FiniteRange(0, 86400), help="Seconds of churn (0 skips the churn).")
@click.option(
    "--rate", type=FiniteRange(0, 10**6), help="Pod arrivals per second, Poisson; 0: as fast as they are admitted."
)
@click.option("--kubelet-restarts", type=click.IntRange(0, 10**4), help="Kubelet restarts during the churn.")
@click.option("--flap-rate", type=FiniteRange(0, 10**4), help="Health flaps per second during the churn; 0: none.")
@click.option("--no-baselines", is_flag=True, help="Skip the grpclib and grpcio floors.")
@click.option("--no-progress", is_flag=True, help="No progress bars (they are drawn only where stderr is a terminal).")
@click.option(
    "--allow-dirty",
    is_flag=True,
    help="Write into benchmarks/results/ although files differ from the commit (the results say so).",
)
@click.option(
    "--plugin-python",
    metavar="COMMAND",
    help="Interpreter command for the plugin process, e.g. 'python3 -S' to leave out the host's site-packages and "
    "their start-up hooks, as in the image. Default: this Python.",
)
def bench(
    scenario_name: str,
    show_list: bool,
    backend: str,
    quick: bool,
    seed: int,
    out: Path | None,
    plugin_python: str | None,
    allow_dirty: bool,
    **overrides: Any,
) -> None:
    """Benchmark the plugin in its own process against the kubelet simulator. SCENARIO defaults to whole-8."""
    if show_list:
        click.echo("Scenarios:\n" + list_scenarios())
        return
    scenarios = select(scenario_name, backend, quick, overrides)
    if not allow_dirty:
        refuse_unrecorded(out or DEFAULT_OUT)
    logs.configure("console", "warning")
    # SIGTERM as Ctrl-C: asyncio.run cancels the run, and its cleanup stops the plugin and floor processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Bars redraw a line with \r: on a terminal only, never into a log.
    progress = not overrides.get("no_progress") and sys.stderr.isatty()
    failed = False
    for scenario in scenarios:
        folder = out if out is not None and len(scenarios) == 1 else (out or DEFAULT_OUT) / scenario.name
        settings = RunSettings(
            seed=seed,
            quick=quick,
            progress=progress,
            backend=backend,
            plugin_python=tuple(shlex.split(plugin_python or "")),
        )
        errors = run_one(scenario, folder, settings)
        failed = failed or errors > 0
    if failed:
        raise click.ClickException("errors during the run: see results.json")


def refuse_unrecorded(out: Path) -> None:
    """Refuse to write into benchmarks/results/ (the committed results) from a checkout whose files differ from its
    commit, or where git cannot tell: the results would name a commit that is not the code measured."""
    results = DEFAULT_OUT.resolve()
    target = out.resolve()
    if target != results and results not in target.parents:
        return
    git = provenance.git_state()
    if git["dirty"] is False and git["commit"]:
        return
    if git["dirty"] is None or not git["commit"]:
        why = "git cannot tell which commit this checkout is"
    else:
        why = f"files differ from commit {git['commit'][:12]}: {', '.join(git['changed'][:5])}"
    raise click.UsageError(
        f"refusing to write into {results}: {why}. Commit first, or write elsewhere with --out, or pass "
        "--allow-dirty (the results record the changed files)."
    )


def select(scenario_name: str, backend: str, quick: bool, overrides: Mapping[str, Any]) -> list[Scenario]:
    """The scenarios SCENARIO names, quick or not, with the command line's numbers, as run on ``backend``."""
    if backend == "nvml":
        for option, key in (("--gpus", "gpus"), ("--flap-rate", "flap_rate")):
            if overrides.get(key) is not None:
                raise click.UsageError(f"{option} applies to the mock backend only (nvml serves the node's GPUs)")
    scenarios = []
    for name in suite(scenario_name, backend):
        scenario = SCENARIOS.get(name)
        if scenario is None:
            raise click.UsageError(f"unknown scenario {name!r}; known:\n{list_scenarios()}")
        try:
            scenarios.append(customise(scenario.quick() if quick else scenario, overrides).on_backend(backend))
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    return scenarios


def customise(scenario: Scenario, overrides: Mapping[str, Any]) -> Scenario:
    """The scenario with the command line's numbers in place of its own."""
    fields: dict[str, Any] = {
        "allocate_calls": overrides.get("calls"),
        "preferred_calls": overrides.get("preferred_calls"),
        "callers": overrides.get("callers"),
        "restarts": overrides.get("restarts"),
        "gpus": overrides.get("gpus"),
    }
    changed = dataclasses.replace(scenario, **{k: v for k, v in fields.items() if v is not None})
    if overrides.get("no_baselines"):
        changed = dataclasses.replace(changed, baselines=False)
    churn = changed.churn
    if churn is not None:
        churn_fields: dict[str, Any] = {
            "duration_s": overrides.get("duration"),
            "kubelet_restarts": overrides.get("kubelet_restarts"),
            "flap_rate_per_s": overrides.get("flap_rate"),
        }
        churn = dataclasses.replace(churn, **{k: v for k, v in churn_fields.items() if v is not None})
        rate = overrides.get("rate")
        if rate is not None:  # 0: as fast as pods are admitted, which the churn says with None
            churn = dataclasses.replace(churn, arrival_rate_per_s=rate or None)
        changed = dataclasses.replace(changed, churn=None if churn.duration_s <= 0 else churn)
    return changed


def run_one(scenario: Scenario, folder: Path, settings: RunSettings) -> int:
    """Run, write JSON, markdown and plots into ``folder``, print the markdown; the number of errors."""
    click.echo(f"running {scenario.name} on {settings.backend}: {scenario.description}", err=True)
    started = datetime.datetime.now(datetime.UTC)
    began = time.perf_counter()
    try:
        result = asyncio.run(run_scenario(scenario, settings))
    except (RuntimeError, TimeoutError) as error:
        # The plugin died or never came up: its own words (the log's end) say why, a traceback would not.
        raise click.ClickException(f"scenario {scenario.name} on {settings.backend}: {error}") from error
    built = report.build_report(
        scenario, result, seed=settings.seed, quick=settings.quick, started=started, wall_s=time.perf_counter() - began
    )
    report.write(built, folder)
    drawn = plots.write(result, folder)
    report.write_html(built, folder, [(path, plots.caption(path)) for path in drawn])
    click.echo(report.markdown(built))
    click.echo(f"results in {folder}", err=True)
    return int(built["errors"])
