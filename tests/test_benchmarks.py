"""The benchmark suite end to end in quick mode: the plugin in its own process, results on disk, no errors."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click
import click.testing
import pytest
from click.testing import CliRunner

from benchmarks import cli, compare, medians, nvidia_plugin, plots, provenance, report, runner
from benchmarks.churn import container_sizes, pod_plans
from benchmarks.cli import bench, customise, run_one, select
from benchmarks.measure import Clock
from benchmarks.native_client import GOKUBELET_ENV, native_client
from benchmarks.plugin_process import plugin_argv
from benchmarks.runner import RunResult, RunSettings, run_scenario
from benchmarks.scenarios import FULL_SUITE, SCENARIOS, ChurnSettings, Scenario
from tests import slowed_plugin
from tests.fakes import short_tmp_dir
from tests.slowed_plugin import SLOWED_ALLOCATE_MS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_measures_every_phase_without_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick whole-8 run with a kubelet restart mid-churn writes JSON, markdown and plots with every measure."""
    monkeypatch.setenv(GOKUBELET_ENV, str(tmp_path / "no-gokubelet"))  # the Python client alone; the next test adds Go
    monkeypatch.setenv("GPUPLUGIN_EVENT_LOOP", "asyncio")  # the plugin inherits it, and the results say so
    scenario = customise(SCENARIOS["whole-8"].quick(), {"kubelet_restarts": 1, "calls": 100, "duration": 1.0})
    run_one(scenario, tmp_path, RunSettings(seed=7, quick=True, progress=False))

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == 0, data["latency"]
    assert data["seed"] == 7
    assert data["environment"]["python"]["version"]
    for measure in (
        "Allocate",
        "floor-grpclib Allocate",
        "floor-grpcio Allocate",
        "GetPreferredAllocation",
        "admission",
        "Allocate (churn)",
        "health change → ListAndWatch (Unhealthy)",
        "re-registration",
        "re-registration (mid-churn)",
    ):
        assert data["latency"][measure]["count"] > 0, measure
        assert data["latency"][measure]["p99_ms"] >= data["latency"][measure]["p50_ms"] > 0
    assert data["latency"]["Allocate"]["count"] == 100
    assert set(data["ratios_to_floors"]) == {"Allocate / floor-grpclib", "Allocate / floor-grpcio"}
    assert data["plugin"]["exit_code"] == 0
    assert 0 < data["plugin"]["idle_rss_mb"] <= data["plugin"]["peak_rss_mb"]
    assert data["plugin"]["cpu_s_during_run"] > 0
    assert data["start_to_registration_ms"] > 0
    assert data["where_time_goes"]["dominant"]
    assert data["churn"]["pods_admitted"] > 0
    assert data["churn"]["kubelet_restarts"] == 1
    assert data["plugin"]["environment"]["GPUPLUGIN_EVENT_LOOP"] == "asyncio"
    assert GOKUBELET_ENV not in data["plugin"]["environment"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| Allocate |" in markdown and "from the environment: GPUPLUGIN_EVENT_LOOP=asyncio" in markdown
    pngs = ("allocate.png", "preferred.png", "admission.png", "reregistration.png", "churn.png")
    for png in pngs:
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG"), png
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs) and "<td>Allocate</td>" in page
    assert "gokubelet" in data["not_measured"]["the Go client's measures"]
    # Chunks of consecutive calls, the run's own repeats that compare bootstraps.
    assert len(data["latency"]["Allocate"]["chunks"]["p50_ms"]) == 20
    assert "chunks" not in data["latency"]["re-registration"]  # 2 restarts: too few for two chunks of 4
    # whole-8 does not run NVIDIA's plugin (nvml does): the report says so, and only bounds are judged.
    assert "nvidia" not in data
    assert "NVIDIA's device plugin was not measured in this run (this scenario does not run it)" in markdown
    rows = {row["figure"]: row for row in data["against_nvidia"]}
    assert {row["measure"] for row in rows.values()} >= {"Allocate", "admission (1 container)"}
    assert rows["Allocate p50 (ms)"]["met"] is None and rows["Allocate p50 (ms)"]["nvidia"] is None
    assert rows["idle RSS (MB)"]["met"] is not None
    # No goal, no verdict: the start to registration row's "met" cell is empty.
    assert rows["start to registration (ms)"]["met"] is None
    assert any(
        line.startswith("| start to registration (ms) |") and line.endswith("|  |  |") for line in markdown.splitlines()
    )
    git = data["environment"]["git"]
    assert git["dirty"] is None or len(git["commit"]) == 40


@pytest.mark.skipif(native_client() is None, reason="gokubelet is not built: benchmarks/gokubelet/build.sh --install")
async def test_go_client_measures_beside_the_python_client_and_feeds_the_comparison() -> None:
    """With gokubelet built, the plugin and both floors are measured by the Go client too, and NVIDIA is compared
    with the Go client's figures."""
    scenario = dataclasses.replace(
        SCENARIOS["whole-8"].quick(), allocate_calls=60, preferred_calls=40, admissions=30, churn=None, restarts=0
    )
    result = await run_scenario(scenario, RunSettings(seed=5, quick=True, progress=False))
    built = report.build_report(
        scenario, result, seed=5, quick=True, started=datetime.datetime.now(datetime.UTC), wall_s=1.0
    )
    assert built["errors"] == 0, built["latency"]
    counts = {name: built["latency"][name]["count"] for name in built["latency"]}
    for name in ("Allocate", "floor-grpclib Allocate", "floor-grpcio Allocate"):
        assert counts[name] == counts[f"{name} (Go client)"] == 60
    assert counts["GetPreferredAllocation (Go client)"] == 40
    assert counts["admission (Go client)"] == 30
    assert "Allocate (Go client) / floor-grpclib" in built["ratios_to_floors"]
    assert built["go_client"]["grpc"] and built["go_client"]["go"].startswith("go")
    measures = {row["figure"]: row["measure"] for row in built["against_nvidia"]}
    assert measures["Allocate p50 (ms)"] == "Allocate (Go client)"
    assert measures["GetPreferredAllocation p99 (ms)"] == "GetPreferredAllocation (Go client)"
    assert measures["admission p50 (ms)"] == "admission (Go client)"


def test_churn_plan_is_reproducible_from_its_seed() -> None:
    """The same seed gives the same pods, and no pod asks for more devices than the node has."""
    settings = ChurnSettings(arrival_rate_per_s=50.0, max_containers=3)
    first = list(itertools.islice(pod_plans(settings, 8, seed=3), 200))
    assert first == list(itertools.islice(pod_plans(settings, 8, seed=3), 200))
    assert first != list(itertools.islice(pod_plans(settings, 8, seed=4), 200))
    assert all(sum(p.containers) <= 8 and 1 <= len(p.containers) <= 3 and p.gap_s > 0 for p in first)


def test_sliced_scenarios_are_listed_in_all_and_write_their_config() -> None:
    """mig-8x7 and replicas-8x16 are listed, in `all`, mock only, and their config files serve 56 and 128 devices."""
    listed = CliRunner().invoke(bench, ["--list"])
    assert listed.exit_code == 0 and "  mig-8x7 " in listed.output and "  replicas-8x16 " in listed.output
    assert {"mig-8x7", "replicas-8x16"} <= set(FULL_SUITE)
    mig, replicas = SCENARIOS["mig-8x7"], SCENARIOS["replicas-8x16"]
    assert (mig.resource, mig.devices, mig.max_per_container) == ("nvidia.com/mig-1g.18gb", 56, 7)
    assert (replicas.resource, replicas.devices, replicas.max_per_container) == ("nvidia.com/gpu", 128, 8)
    assert mig.plugin_config() == {
        "version": "v1",
        "backend": {
            "name": "partitioned",
            "partitioned": {
                "parent": "mock",
                "parent_options": {"gpus": 8},
                "strategy": "mixed",
                "layout": "all-1g.18gb",
            },
        },
    }
    assert replicas.plugin_config() == {
        "version": "v1",
        "backend": {"name": "mock", "mock": {"gpus": 8}},
        "sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 16}]}},
    }
    assert SCENARIOS["whole-8"].plugin_config() is None
    argv = plugin_argv(Path("/k"), Path("/s"), 8, "mock", Path("/w/plugin.yaml"))
    assert argv[argv.index("--config") + 1] == "/w/plugin.yaml"
    assert "--backend" not in argv and "--mock-gpus" not in argv
    for name in ("mig-8x7", "replicas-8x16"):
        with pytest.raises(click.ClickException, match="mock node"):
            select(name, "nvml", True, {})
    with pytest.raises(ValueError, match="do not fit"):
        Scenario("x", "x", node="mig", per_gpu=4)


def test_churn_sizes_are_capped_per_container() -> None:
    """Sizes beyond the node are dropped, sizes beyond the cap asked for at the cap, their weights kept."""
    mix = {1: 0.5, 2: 0.25, 4: 0.15, 8: 0.1}
    assert container_sizes(mix, 56, 7) == {1: 0.5, 2: 0.25, 4: 0.15, 7: 0.1}
    assert container_sizes(mix, 4) == {1: 0.5, 2: 0.25, 4: 0.15}
    assert container_sizes(mix, 128, 2) == pytest.approx({1: 0.5, 2: 0.5})
    plans = list(itertools.islice(pod_plans(ChurnSettings(max_containers=3), 56, seed=5, max_per_container=7), 300))
    assert max(max(p.containers) for p in plans) == 7


class _Hung(Exception):
    """Raised by :func:`_fails_after` in place of a hang."""


@contextmanager
def _fails_after(seconds: int) -> Iterator[None]:
    """Raise _Hung in the main thread after ``seconds``: a busy loop that blocks the event loop (where no asyncio
    timeout can fire) fails the test instead of hanging it. Unix only, as the benchmarks are."""

    def hung(signum: int, frame: FrameType | None) -> None:
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _nvml_stand_in(gpus: int) -> Callable[..., list[str]]:
    """A plugin_argv for runs as on nvml: the mock backend with ``gpus`` GPUs stands in for the node's real ones."""

    def stand_in(
        kubelet_dir: Path,
        state_dir: Path,
        asked: int,
        backend: str = "mock",
        config: Path | None = None,
        python: Sequence[str] = (),
    ) -> list[str]:
        assert backend == "nvml" and asked == 0 and config is None
        return plugin_argv(kubelet_dir, state_dir, gpus, "mock", python=python)

    return stand_in


def test_churn_plans_fit_a_one_gpu_node() -> None:
    """One GPU: every pod has one container of one GPU (two containers never fit; they used to be redrawn forever)."""
    with _fails_after(10):
        plans = list(itertools.islice(pod_plans(ChurnSettings(max_containers=2), 1, seed=1), 500))
        assert {p.containers for p in plans} == {(1,)}
        # A node barely big enough for the containers, where random draws nearly always overflow it, still fits.
        tight = ChurnSettings(max_containers=2, size_mix={2: 0.9999, 1: 0.0001})
        assert all(sum(p.containers) <= 3 for p in itertools.islice(pod_plans(tight, 3, seed=1), 100))
    with pytest.raises(ValueError, match="fits 4 devices"):
        next(pod_plans(ChurnSettings(size_mix={8: 1.0}), 4, seed=1))


@pytest.mark.parametrize(
    ("name", "resource", "devices"),
    [("mig-8x7", "nvidia.com/mig-1g.18gb", 56), ("replicas-8x16", "nvidia.com/gpu", 128)],
)
def test_sliced_scenario_runs_quick_without_errors(name: str, resource: str, devices: int, tmp_path: Path) -> None:
    """A quick partitioned or time-sliced run serves the right resource and count, flaps whole GPUs, 0 errors."""
    [scenario] = select(
        name, "mock", True, {"calls": 50, "preferred_calls": 30, "duration": 1.0, "kubelet_restarts": 1}
    )
    run_one(scenario, tmp_path, RunSettings(seed=3, quick=True, progress=False))

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == 0, data["latency"]
    assert (data["resource"], data["devices"], data["gpus"]) == (resource, devices, 8)
    assert data["plugin_config"] == scenario.plugin_config()
    assert data["plugin"]["exit_code"] == 0
    assert data["latency"]["Allocate"]["count"] == 50
    assert data["latency"]["GetPreferredAllocation"]["count"] > 0
    # Each flap is timed until allocatable moved by all of the GPU's partitions or replicas.
    assert data["latency"]["health change → ListAndWatch (Unhealthy)"]["count"] > 0
    assert data["churn"]["pods_admitted"] > 0 and data["churn"]["kubelet_restarts"] == 1
    assert data["latency"]["re-registration (mid-churn)"]["count"] == 1
    assert f"8 GPUs served as {devices} {resource}" in (tmp_path / "results.md").read_text()


def test_quick_mode_shrinks_every_phase() -> None:
    """Quick mode keeps each phase but makes it seconds long."""
    quick = SCENARIOS["whole-8"].quick()
    assert 0 < quick.allocate_calls <= 200 and 0 < quick.preferred_calls <= 100 and 0 < quick.admissions <= 50
    assert 0 < quick.restarts <= 2
    assert quick.churn is not None and quick.churn.duration_s <= 2


def test_rate_option_sets_the_arrival_rate_and_zero_means_as_fast_as_admitted() -> None:
    """--rate replaces the churn's arrival rate; --rate 0 sends pods as fast as they are admitted (None), even where
    the scenario has a rate of its own; without --rate the scenario's stays."""
    paced = dataclasses.replace(SCENARIOS["churn"], churn=ChurnSettings(arrival_rate_per_s=50.0))

    def rate(overrides: dict[str, float]) -> float | None:
        churn = customise(paced, overrides).churn
        assert churn is not None
        return churn.arrival_rate_per_s

    assert (rate({}), rate({"rate": 5.0}), rate({"rate": 0.0})) == (50.0, 5.0, None)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_has_work(name: str) -> None:
    """Every scenario runs at least one phase."""
    s = SCENARIOS[name]
    assert s.allocate_calls or s.preferred_calls or s.churn or s.restarts


def test_plugin_python_replaces_the_interpreter_and_keeps_the_rest() -> None:
    """--plugin-python 'python3 -S' runs the same serve command under that interpreter command."""
    ours = plugin_argv(Path("/k"), Path("/s"), 8, "nvml")
    bare = plugin_argv(Path("/k"), Path("/s"), 8, "nvml", python=("python3", "-S"))
    assert bare[:2] == ["python3", "-S"] and bare[2:] == ours[1:]


def test_nvml_backend_starts_the_real_plugin_command_and_has_its_scenario() -> None:
    """On nvml the plugin is `serve --backend nvml` on this interpreter without mock flags; `nvml` is a scenario."""
    argv = plugin_argv(Path("/k"), Path("/s"), 8, "nvml")
    assert argv[:4] == [sys.executable, "-m", "gpuplugin", "serve"]
    assert argv[argv.index("--backend") + 1] == "nvml"
    assert argv[argv.index("--kubelet-dir") + 1] == "/k" and argv[argv.index("--state-dir") + 1] == "/s"
    assert not any(arg.startswith("--mock") for arg in argv)
    assert plugin_argv(Path("/k"), Path("/s"), 8)[-6:-4] == ["--mock-gpus", "8"]
    scenario = SCENARIOS["nvml"]
    assert scenario.allocate_calls and scenario.preferred_calls and scenario.restarts
    assert scenario.callers == 1 and scenario.concurrent_callers == 16
    assert scenario.churn is not None and scenario.churn.kubelet_restarts > 0
    on_nvml = scenario.on_backend("nvml")
    assert on_nvml.gpus == 0 and on_nvml.churn is not None and on_nvml.churn.flap_rate_per_s == 0


def test_nvml_backend_names_its_scenarios_and_refuses_mock_sizes() -> None:
    """`all` on nvml is the `nvml` scenario, whole-8 becomes whole-nvml, and whole-64 or --gpus are refused."""
    assert [s.name for s in select("all", "nvml", False, {})] == ["nvml"]
    assert [s.name for s in select("all", "mock", False, {})] == list(FULL_SUITE)
    assert [s.name for s in select("whole-8-c16", "nvml", True, {})] == ["whole-nvml-c16"]
    with pytest.raises(click.ClickException, match="mock node"):
        select("whole-64", "nvml", False, {})
    with pytest.raises(click.UsageError, match="mock backend only"):
        select("nvml", "nvml", False, {"gpus": 4})
    listed = CliRunner().invoke(bench, ["--list"])
    assert "nvml " in listed.output and "with --backend nvml: nvml" in listed.output


def test_nvml_run_counts_what_registers_and_skips_flaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as on nvml (a 3-GPU mock plugin stands in): GPUs counted from registration, 1 and 16 callers, no flaps."""

    monkeypatch.setattr(runner, "plugin_argv", _nvml_stand_in(3))
    overrides = {"calls": 50, "duration": 0.5, "no_baselines": True, "kubelet_restarts": 1}
    [scenario] = select("nvml", "nvml", True, overrides)
    run_one(scenario, tmp_path, RunSettings(seed=2, quick=True, progress=False, backend="nvml"))

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == 0, data["latency"]
    assert data["backend"] == "nvml" and data["gpus"] == 3
    # The machine's own GPUs are recorded: none, or their names with the driver that NVML read.
    machine = data["environment"]["machine"]
    assert machine["gpus"] == "none" or (machine["gpus"] and machine["nvidia_driver"] != "none")
    assert data["latency"]["Allocate"]["count"] == data["latency"]["Allocate x16"]["count"] == 50
    assert data["latency"]["GetPreferredAllocation"]["count"] > 0
    assert data["latency"]["re-registration"]["count"] > 0
    assert data["churn"]["pods_admitted"] > 0 and data["churn"]["health_events"] == 0
    assert not any(name.startswith("health change") for name in data["latency"])
    assert "control socket" in data["not_measured"]["health change → ListAndWatch"]
    # No GPU here (or no build): NVIDIA's plugin is not measured, and the report says why.
    assert data["not_measured"]["NVIDIA's device plugin"]
    text = (tmp_path / "results.md").read_text()
    assert "Backend nvml, 3 GPUs served" in text and "Not measured: health change" in text


def test_nvml_quick_run_on_a_one_gpu_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nvml --backend nvml --quick` on a one-GPU node (a 1-GPU mock stands in): every phase sized to the node, ends
    (within the 60 s guard, not a timing) with 0 errors. It used to hang at the churn, whose two-container pods
    never fit one GPU."""
    monkeypatch.setattr(runner, "plugin_argv", _nvml_stand_in(1))
    [scenario] = select("nvml", "nvml", True, {})
    with _fails_after(60):
        run_one(scenario, tmp_path, RunSettings(seed=1, quick=True, progress=False, backend="nvml"))

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == 0, data["latency"]
    assert (data["backend"], data["gpus"], data["devices"]) == ("nvml", 1, 1)
    for measure in ("Allocate", "Allocate x16", "floor-grpclib Allocate", "GetPreferredAllocation", "admission"):
        assert data["latency"][measure]["count"] > 0, measure
    assert data["latency"]["admission (1 container)"]["count"] == data["churn"]["pods_admitted"] > 0
    assert data["churn"]["kubelet_restarts"] == 1 and data["latency"]["re-registration"]["count"] == 2
    assert data["plugin"]["exit_code"] == 0


def _run_json(folder: Path, scenario: str, allocate_p50_p99: tuple[float, float], rss_mb: tuple[float, float]) -> Path:
    """A results.json of the fields medians reads: one latency measure, one ratio, the RSS and start facts."""
    folder.mkdir()
    p50, p99 = allocate_p50_p99
    run = {
        "scenario": scenario,
        "errors": 0,
        "latency": {"Allocate": {"count": 10, "p50_ms": p50, "p99_ms": p99}, "unmeasured": {"count": 0}},
        "ratios_to_floors": {"Allocate / floor-grpclib": {"p50_ms": p50 / 0.5, "p99_ms": p99 / 2}},
        "plugin": {"idle_rss_mb": rss_mb[0], "rss_after_run_mb": rss_mb[1]},
        "start_to_registration_ms": 300.0,
    }
    (folder / "results.json").write_text(json.dumps(run))
    return folder


def test_medians_put_runs_side_by_side_with_the_median_of_each_figure(tmp_path: Path) -> None:
    """`python -m benchmarks.medians` prints each run's figure and the median of each statistic on its own; runs
    of different scenarios are refused."""
    folders = [
        _run_json(tmp_path / "a", "nvml", (0.4, 0.7), (58.0, 59.4)),
        _run_json(tmp_path / "b", "nvml", (0.3, 1.1), (58.1, 59.6)),
        _run_json(tmp_path / "c", "nvml", (0.5, 0.9), (57.9, 59.3)),
    ]
    result = CliRunner().invoke(medians.main, [str(f) for f in folders])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "| figure | a | b | c | median |" in lines
    assert "| Allocate p50 / p99 (ms) | 0.400 / 0.700 | 0.300 / 1.100 | 0.500 / 0.900 | 0.400 / 0.900 |" in lines
    assert (
        "| Allocate / floor-grpclib, p50 / p99 | 0.80x / 0.35x | 0.60x / 0.55x | 1.00x / 0.45x | 0.80x / 0.45x |"
        in lines
    )
    assert "| RSS idle / after the run (MB) | 58.0 / 59.4 | 58.1 / 59.6 | 57.9 / 59.3 | 58.0 / 59.4 |" in lines
    assert "| start to registration (ms) | 300 | 300 | 300 | 300 |" in lines
    # Not measured in the runs: no row.
    assert not any("unmeasured" in line or "own side" in line for line in lines)
    other = _run_json(tmp_path / "d", "restarts", (0.4, 0.7), (63.8, 63.9))
    refused = CliRunner().invoke(medians.main, [str(folders[0]), str(other)])
    assert refused.exit_code == 2 and "different scenarios" in refused.output


def test_plots_of_a_run_without_calls_have_no_empty_legend(tmp_path: Path) -> None:
    """A run of one kubelet restart alone (no RPC measure, one sample) still plots, without matplotlib's warning
    about a legend with nothing in it (warnings fail the tests)."""
    clock = Clock()
    registered = clock.latencies("re-registration")
    registered.record(clock.origin_s, 0.004)
    paths = plots.write(RunResult({}, {registered.name: registered}), tmp_path)
    assert [path.name for path in paths] == ["reregistration.png"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def test_nvidia_plugin_runs_after_ours_through_the_same_phases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where NVIDIA's plugin can run (here a 2-GPU mock plugin stands in for it, and another for ours on nvml), it
    is measured after ours through the same phases, and the comparison and its goals read that run."""
    monkeypatch.setattr(runner, "plugin_argv", _nvml_stand_in(2))
    monkeypatch.setattr(runner, "nvidia_unavailable", lambda backend: None)
    monkeypatch.setattr(nvidia_plugin, "binary", lambda: Path(sys.executable))
    monkeypatch.setenv(GOKUBELET_ENV, str(tmp_path / "no-gokubelet"))
    with short_tmp_dir() as short:
        monkeypatch.setattr(runner, "nvidia_kubelet_dir", lambda: short / "k")
        monkeypatch.setattr(
            nvidia_plugin, "argv", lambda binary, kubelet_dir: plugin_argv(kubelet_dir, short / "s", 2, "mock")
        )
        overrides = {"calls": 60, "preferred_calls": 30, "duration": 0.5, "kubelet_restarts": 0, "restarts": 2}
        [scenario] = select("nvml", "nvml", True, overrides)
        assert scenario.against_nvidia
        run_one(scenario, tmp_path, RunSettings(seed=4, quick=True, progress=False, backend="nvml"))

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == 0, data["latency"]
    for measure in ("Allocate", "Allocate x16", "GetPreferredAllocation", "re-registration"):
        assert data["latency"][measure]["count"] > 0, measure
        assert data["latency"][f"nvidia {measure}"]["count"] == data["latency"][measure]["count"], measure
    # The churn runs for a time, not a count of pods.
    assert data["latency"]["nvidia admission"]["count"] > 0
    # The floors run once, beside ours; NVIDIA's Allocate is set against them too.
    assert "nvidia floor-grpclib Allocate" not in data["latency"]
    assert "nvidia Allocate / floor-grpclib" in data["ratios_to_floors"]
    assert data["nvidia"]["plugin"]["exit_code"] == 0 and data["nvidia"]["start_to_registration_ms"] > 0
    assert data["nvidia"]["churn"]["pods_admitted"] > 0
    assert "NVIDIA's device plugin" not in data.get("not_measured", {})
    rows = {row["figure"]: row for row in data["against_nvidia"]}
    allocate = rows["Allocate p50 (ms)"]
    assert allocate["nvidia"] == data["latency"]["nvidia Allocate"]["p50_ms"]
    assert allocate["met"] == (allocate["ours"] <= 2 * allocate["nvidia"])
    assert rows["idle RSS (MB)"]["nvidia"] == data["nvidia"]["plugin"]["idle_rss_mb"]
    assert "was measured in this run, after ours" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "churn.png").is_file()


def test_nvidia_plugin_is_not_run_without_nvml_or_a_gpu() -> None:
    """NVIDIA's plugin serves NVML's GPUs only: on the mock backend or a machine without a GPU, the reason is given."""
    assert "mock" in (nvidia_plugin.unavailable("mock", ["NVIDIA H200"]) or "")
    assert "no GPU" in (nvidia_plugin.unavailable("nvml", "none") or "")
    assert nvidia_plugin.is_klog("I1204 20:15:35.908275   10342 main.go:1] started\n")
    assert not nvidia_plugin.is_klog('{"level": "warning"}\n')
    log = "I1204 20:15:35 main.go:1] fine\nE1204 20:15:35 main.go:2] broken\nW1204 20:15:36 x.go:3] odd\n"
    assert nvidia_plugin.log_problems(log) == ["E1204 20:15:35 main.go:2] broken", "W1204 20:15:36 x.go:3] odd"]


def _chunked(folder: Path, scale: dict[str, float], noise: int = 0) -> Path:
    """A results.json of an allocate run, each figure's chunks times its measure's scale, with a little jitter."""
    folder.mkdir()
    jitter = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0]
    latency = {}
    for name, base in (("Allocate", 0.5), ("floor-grpclib Allocate", 0.45)):
        factor = scale.get(name, 1.0)
        chunks = [base * factor * jitter[(i + noise) % len(jitter)] for i in range(8)]
        latency[name] = {
            "count": 400,
            "errors": 0,
            "p50_ms": base * factor,
            "p99_ms": 2 * base * factor,
            "chunks": {"p50_ms": chunks, "p99_ms": [2 * c for c in chunks]},
        }
    run = {"scenario": "allocate", "errors": 0, "latency": latency, "plugin": {"idle_rss_mb": 40.0}}
    (folder / "results.json").write_text(json.dumps(run))
    return folder


def test_compare_judges_changes_against_the_noise_of_the_chunks(tmp_path: Path) -> None:
    """compare exits 0 where the runs differ within their noise or only the floor moved, and 1 where the plugin is
    slower, over the floor measured beside it, beyond the noise and the threshold; smaller slow-downs than the
    threshold are reported, not failed."""
    old = _chunked(tmp_path / "old", {})
    same = _chunked(tmp_path / "same", {}, noise=3)
    slower = _chunked(tmp_path / "slower", {"Allocate": 1.5})
    floor = _chunked(tmp_path / "floor", {"floor-grpclib Allocate": 1.5})
    slightly = _chunked(tmp_path / "slightly", {"Allocate": 1.08})

    def run(new: Path, *options: str) -> click.testing.Result:
        return CliRunner().invoke(compare.main, [str(old), str(new), *options])

    within = run(same)
    assert within.exit_code == 0, within.output
    assert "| Allocate p50 |" in within.output and "within noise" in within.output
    assert "No regression." in within.output
    regressed = run(slower)
    assert regressed.exit_code == 1, regressed.output
    # Judged over the floor measured beside it, which divides out the machine's drift.
    assert "Regressions: Allocate p50 over the grpclib floor, Allocate p99 over the grpclib floor." in regressed.output
    machine = run(floor)
    assert machine.exit_code == 0 and "slower (the machine: not judged)" in machine.output
    assert "| Allocate p50 over the grpclib floor | 1.111 | 0.741 | 0.667 |" in machine.output
    small = run(slightly)
    assert small.exit_code == 0 and "| slower |" in small.output
    assert run(slightly, "--threshold", "0.05").exit_code == 1
    # --judge p99: only the p99 rows can fail, the p50 ones are printed and said not judged.
    p99 = run(slower, "--judge", "p99")
    assert p99.exit_code == 1 and "Regressions: Allocate p99 over the grpclib floor." in p99.output
    assert "(not judged: --judge)" in p99.output
    # Facts taken once per run have no repeats: shown, never judged.
    assert "| idle RSS (MB) | 40.000 | 40.000 | 1.000 |  | no repeats: noise unknown |" in within.output


def test_compare_catches_a_deliberately_slowed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real runs of Allocate, the second with a plugin that sleeps 5 ms in every Allocate: compare names Allocate
    as a regression and exits 1."""
    monkeypatch.setenv(GOKUBELET_ENV, str(tmp_path / "no-gokubelet"))
    monkeypatch.setenv(SLOWED_ALLOCATE_MS, "5")  # read by the slowed plugin only
    [scenario] = select("allocate", "mock", True, {"calls": 200, "no_baselines": True})
    slowed = (sys.executable, str(Path(slowed_plugin.__file__)))
    run_one(scenario, tmp_path / "plain", RunSettings(seed=1, quick=True, progress=False))
    run_one(scenario, tmp_path / "slowed", RunSettings(seed=1, quick=True, progress=False, plugin_python=slowed))

    result = CliRunner().invoke(compare.main, [str(tmp_path / "plain"), str(tmp_path / "slowed")])
    assert result.exit_code == 1, result.output
    regressions = next(line for line in result.output.splitlines() if line.startswith("Regressions:"))
    assert "Allocate p50" in regressions


def test_results_are_not_written_into_the_committed_folder_from_a_dirty_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into benchmarks/results/, a run needs a checkout without changes (or --allow-dirty); elsewhere it may write."""
    dirty = {"commit": "a" * 40, "dirty": True, "changed": ["gpuplugin/kubelet/server.py"]}
    monkeypatch.setattr(provenance, "git_state", lambda: dirty)
    with pytest.raises(click.UsageError, match=r"refusing to write .* files differ from commit aaaaaaaaaaaa"):
        cli.refuse_unrecorded(cli.DEFAULT_OUT / "h200-x1")
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": None, "dirty": None, "changed": []})
    with pytest.raises(click.UsageError, match="git cannot tell"):
        cli.refuse_unrecorded(cli.DEFAULT_OUT)
    cli.refuse_unrecorded(tmp_path)  # elsewhere: no question asked
    monkeypatch.setattr(provenance, "git_state", lambda: {**dirty, "dirty": False, "changed": []})
    cli.refuse_unrecorded(cli.DEFAULT_OUT / "cpu")
    runs: list[RunSettings] = []
    monkeypatch.setattr(provenance, "git_state", lambda: dirty)

    def recorded(scenario: Scenario, folder: Path, settings: RunSettings) -> int:
        runs.append(settings)
        return 0

    monkeypatch.setattr(cli, "run_one", recorded)
    refused = CliRunner().invoke(bench, ["whole-8", "--quick", "--out", str(cli.DEFAULT_OUT / "x")])
    assert refused.exit_code == 2 and "--allow-dirty" in refused.output and not runs
    allowed = CliRunner().invoke(bench, ["whole-8", "--quick", "--allow-dirty", "--out", str(tmp_path)])
    assert allowed.exit_code == 0, allowed.output
    # CliRunner's stderr is no terminal: no progress bars.
    assert [settings.progress for settings in runs] == [False]


def test_the_real_clusters_figures_are_read_and_rendered_where_present(tmp_path: Path) -> None:
    """``make e2e``'s figures join the report with their commit; a missing or malformed file adds nothing."""
    from benchmarks.report import cluster_figures, cluster_section

    path = tmp_path / "e2e.json"
    assert cluster_figures(path) is None
    path.write_text("not json")
    assert cluster_figures(path) is None
    path.write_text(
        json.dumps({"commit": "abc123", "kubernetes": "v1.34.4", "figures_s": {"apply_to_pod_running_s": 0.87}})
    )
    figures = cluster_figures(path)
    assert figures is not None
    text = "\n".join(cluster_section(figures))
    assert "Kubernetes v1.34.4" in text and "abc123" in text
    assert "| manifest applied → plugin pod Running | 0.87 |" in text
    assert "kubelet restarted" not in text


def test_the_wire_ab_patch_applies_to_the_commit_it_was_measured_at(tmp_path: Path) -> None:
    """benchmarks/wire_ab.sh's variant (betterproto2 decoding) still applies to commit 223b5f9, so the README's
    figure for wire.py can be measured again."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "223b5f9^{commit}"], check=False).returncode:
        pytest.skip("a checkout without the history of commit 223b5f9")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "223b5f9"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    patch = (ROOT / "benchmarks" / "wire_ab.patch").read_bytes()
    result = subprocess.run(["patch", "-d", str(tmp_path), "-p1"], input=patch, capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from gpuplugin.kubelet import wire" not in (tmp_path / "gpuplugin/kubelet/server.py").read_text()


def test_a_results_file_names_the_commit_and_a_changed_checkout_as_dirty(monkeypatch: pytest.MonkeyPatch) -> None:
    """measured_commit: GPUPLUGIN_COMMIT where given (a copy without .git), else HEAD, with -dirty for changes."""
    monkeypatch.setenv("GPUPLUGIN_COMMIT", "1d438f3")
    assert provenance.measured_commit() == "1d438f3"
    monkeypatch.delenv("GPUPLUGIN_COMMIT")
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": "b" * 40, "dirty": True, "changed": ["x"]})
    assert provenance.measured_commit() == "b" * 40 + "-dirty"
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": "b" * 40, "dirty": False, "changed": []})
    assert provenance.measured_commit() == "b" * 40
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": None, "dirty": None, "changed": []})
    assert provenance.measured_commit() == "unknown"
