"""NodePrepareResources and NodeUnprepareResources latency of the DRA plugin, as the DRA kubelet simulator calls
them over the plugin's unix socket: one claim of one mock GPU at a time, prepared then unprepared, each call
writing (or removing) the claim's CDI spec and rewriting the checkpoint, both fsynced.

Run ``python -m benchmarks.dra_prepare [--claims N] [--gpus N]``; prints p50, p99 and max of each call in ms.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import click
import structlog

from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.testing.dra import ClaimTable, DraKubelet


def quantiles_ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    at = [ordered[int(q * (len(ordered) - 1))] * 1000 for q in (0.5, 0.99)]
    return f"p50 {at[0]:.2f} ms, p99 {at[1]:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


async def measure(directory: Path, claims: int, gpus: int) -> dict[str, list[float]]:
    settings = DriverSettings(
        node_name="bench",
        plugins_dir=directory / "plugins",
        plugins_registry_dir=directory / "registry",
        cdi_dir=directory / "cdi",
    )
    backend = create_mock(
        BackendContext(options={"control_socket": str(directory / "mock.sock"), "gpus": gpus}, state_dir=directory)
    )
    table = ClaimTable()
    driver = DraDriver(backend, settings, table)
    times: dict[str, list[float]] = {"NodePrepareResources": [], "NodeUnprepareResources": []}
    async with DraKubelet(settings.plugins_registry_dir) as kubelet:
        await driver.start()
        try:
            await kubelet.wait_registered(settings.driver_name)
            names = list(device_names(driver.tree))
            for number in range(claims):
                claim = table.allocate(settings.driver_name, settings.pool, {"gpu": [names[number % len(names)]]})
                start = time.perf_counter()
                response = await kubelet.prepare(settings.driver_name, [claim])
                times["NodePrepareResources"].append(time.perf_counter() - start)
                assert response.claims[claim.uid].error == "", response.claims[claim.uid].error
                start = time.perf_counter()
                await kubelet.unprepare(settings.driver_name, [claim])
                times["NodeUnprepareResources"].append(time.perf_counter() - start)
        finally:
            await driver.aclose()
    return times


@click.command()
@click.option("--claims", type=click.IntRange(min=1), default=500, show_default=True, help="Claims, one at a time.")
@click.option("--gpus", type=click.IntRange(min=1, max=8), default=8, show_default=True, help="Mock GPUs.")
def main(claims: int, gpus: int) -> None:
    """Measure the DRA plugin's prepare and unprepare calls."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="gp-dra-") as tmp:
        times = asyncio.run(measure(Path(tmp), claims, gpus))
    for call, samples in times.items():
        click.echo(f"{call}: {len(samples)} calls, {quantiles_ms(samples)}")


if __name__ == "__main__":
    main()
