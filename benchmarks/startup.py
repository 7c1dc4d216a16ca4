"""Start-up of ``python -m gpuplugin serve``: exec to registered with the simulated kubelet, and idle RSS after it.

    python -m benchmarks.startup [--starts N] [--gpus N] [--plugin-python COMMAND]

Each start is a fresh process against a fresh simulator, as the benchmark suite starts the plugin (the same command
line, the same registration wait, the same pause before RSS is read); it prints the median and p90 of exec to
registered over the starts, of the CPU time the plugin had used by then, and the median idle RSS. On a machine shared
with other work the wall-clock figure spreads while the CPU figure holds: compare runs made one after the other, and
``--plugin-python`` names an interpreter whose environment holds only the runtime dependencies, as the image does.
"""

from __future__ import annotations

import asyncio
import compileall
import shlex
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

import gpuplugin
from benchmarks.plugin_process import ServerProcess, plugin_argv
from benchmarks.runner import SETTLE_S, START_TIMEOUT_S
from benchmarks.scenarios import RESOURCE
from gpuplugin.daemon.logs import configure
from gpuplugin.testing.simulator import KubeletSimulator


@dataclass(frozen=True, slots=True)
class Start:
    """One start of the plugin."""

    registered_ms: float
    """From just before the process was created to the simulator's receipt of its Register call."""
    cpu_ms: float
    """CPU time (user and system) the plugin had used when it registered: what a busy machine's wait leaves out."""
    idle_rss_mb: float
    """RSS ``SETTLE_S`` after registration (MB, 10**6 bytes)."""


async def start_once(gpus: int, python: tuple[str, ...]) -> Start:
    """Start the plugin on a mock node of ``gpus`` GPUs, wait for its registration, read its RSS, stop it."""
    # Short and under /tmp: unix socket paths must stay below 108 bytes.
    with tempfile.TemporaryDirectory(prefix="gps-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with KubeletSimulator(work / "k") as kubelet:
            plugin = ServerProcess("plugin", plugin_argv(work / "k", work / "s", gpus, python=python), work / "log")
            plugin.start()
            try:
                registration = await kubelet.wait_registered(RESOURCE, timeout=START_TIMEOUT_S)
                registered_ms = (registration.monotonic_s - plugin.started_s) * 1000
                cpu_ms = plugin.usage().cpu_s * 1000
                await asyncio.sleep(SETTLE_S)
                plugin.check_alive()
                rss_mb = plugin.usage().rss_mb
            finally:
                await plugin.stop()
    return Start(registered_ms, cpu_ms, rss_mb)


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values``: an observed value, no interpolation."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))]


async def run(starts: int, gpus: int, python: tuple[str, ...]) -> list[Start]:
    return [await start_once(gpus, python) for _ in range(starts)]


@click.command()
@click.option("--starts", type=click.IntRange(1, 1000), default=10, show_default=True, help="Plugin starts.")
@click.option("--gpus", type=click.IntRange(1, 1024), default=8, show_default=True, help="Mock GPUs on the node.")
@click.option(
    "--plugin-python",
    default=None,
    metavar="COMMAND",
    help="Interpreter command for the plugin process, e.g. 'python3 -S'. Default: this Python.",
)
def main(starts: int, gpus: int, plugin_python: str | None) -> None:
    """Exec to registered (median, p90) and idle RSS of `gpuplugin serve --backend mock` against the simulator."""
    python = tuple(shlex.split(plugin_python)) if plugin_python else ()
    # Bytecode as an installed wheel has it (pip compiles at install): where PYTHONDONTWRITEBYTECODE is set, a
    # checkout would otherwise compile every module of the plugin at each start, some 40 ms here.
    compileall.compile_dir(Path(gpuplugin.__file__).parent, quiet=1)
    # Errors only: each stop ends the simulator's ListAndWatch stream, and its lines would bury the figures.
    configure("console", "error")
    results = asyncio.run(run(starts, gpus, python))
    registered = [s.registered_ms for s in results]
    cpu = [s.cpu_ms for s in results]
    rss = [s.idle_rss_mb for s in results]
    click.echo(
        f"exec -> registered over {starts} starts: median {statistics.median(registered):.0f} ms, "
        f"p90 {percentile(registered, 0.9):.0f} ms (min {min(registered):.0f}, max {max(registered):.0f})"
    )
    click.echo(f"CPU used by then: median {statistics.median(cpu):.0f} ms, p90 {percentile(cpu, 0.9):.0f} ms")
    click.echo(f"idle RSS {SETTLE_S:g} s after registration: median {statistics.median(rss):.1f} MB")


if __name__ == "__main__":
    main(prog_name="python -m benchmarks.startup")
