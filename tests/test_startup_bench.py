"""python -m benchmarks.startup: starts the plugin against the simulator and reports what each start took."""

from __future__ import annotations

from click.testing import CliRunner

from benchmarks import startup


async def test_a_start_registers_and_reads_idle_rss() -> None:
    """One start waits for the plugin's registration and reads its resident memory before stopping it."""
    (start,) = await startup.run(1, 2, ())
    assert start.registered_ms > 0
    assert start.cpu_ms > 0
    assert start.idle_rss_mb > 1


def test_percentile_is_an_observed_value() -> None:
    """The nearest-rank p90 of ten values is the ninth smallest; one value is every percentile of itself."""
    assert startup.percentile([float(v) for v in range(10, 0, -1)], 0.9) == 9.0
    assert startup.percentile([4.0], 0.9) == startup.percentile([4.0], 0.5) == 4.0


def test_command_prints_median_p90_and_rss() -> None:
    """The command prints exec to registered over the starts, the CPU used by then and the idle RSS, a line each."""
    result = CliRunner().invoke(startup.main, ["--starts", "1", "--gpus", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("exec -> registered over 1 starts: median ")
    assert lines[1].startswith("CPU used by then: median ")
    assert lines[2].startswith("idle RSS 0.5 s after registration: median ")
