"""Idle RSS of ``gpuplugin serve`` in device-plugin mode and in DRA mode, side by side: the mock backend with 8
GPUs, each process measured 2 s after it is registered (device plugin: with the kubelet simulator; DRA: with the
DRA kubelet simulator, its 8 GPUs published to a fake API server on loopback), then stopped.

Run ``python -m benchmarks.dra_rss [--rounds N]`` (its fake API server needs aiohttp, of the test group); prints
each mode's RSS per round and the median, in MiB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
import structlog
from aiohttp import web

from gpuplugin.testing.dra import DraKubelet
from gpuplugin.testing.simulator import KubeletSimulator

GPUS = 8
IDLE_S = 2.0
TIMEOUT_S = 30.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def idle_rss(args: list[str], ready: Callable[[], Awaitable[None]]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLUGIN_")}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gpuplugin", "serve", "--backend", "mock", "--mock-gpus", str(GPUS), *args),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await ready()
        await asyncio.sleep(IDLE_S)
        return rss_mib(process.pid)
    finally:
        process.terminate()
        await process.wait()


async def device_plugin_round(directory: Path) -> float:
    async with KubeletSimulator(directory) as kubelet:

        async def ready() -> None:
            await kubelet.wait_registered("nvidia.com/gpu", timeout=TIMEOUT_S)

        return await idle_rss(["--kubelet-dir", str(directory), "--state-dir", str(directory / "state")], ready)


async def dra_round(directory: Path) -> float:
    slices: dict[str, int] = {}

    async def node(_: web.Request) -> web.Response:
        return _json({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bench", "uid": "u"}})

    async def list_slices(_: web.Request) -> web.Response:
        return _json({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList", "metadata": {}, "items": []})

    async def apply_slice(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        slices[request.match_info["name"]] = len(body["spec"]["devices"])
        return _json(body)

    app = web.Application()
    app.router.add_get("/api/v1/nodes/bench", node)
    app.router.add_get("/apis/resource.k8s.io/v1/resourceslices", list_slices)
    app.router.add_patch("/apis/resource.k8s.io/v1/resourceslices/{name}", apply_slice)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    config = directory / "config.json"
    plugin = {"pluginsRegistryDir": str(directory / "registry")}
    cdi = {"plugin": {"cdiSpecDir": str(directory / "cdi")}}
    config.write_text(json.dumps({"version": "v1", "plugin": plugin, "flags": cdi}))
    try:
        async with DraKubelet(directory / "registry") as kubelet:

            async def ready() -> None:
                await kubelet.wait_registered("gpu.gpuplugin.dev", timeout_s=TIMEOUT_S)
                async with asyncio.timeout(TIMEOUT_S):
                    while sum(slices.values()) < GPUS:  # noqa: ASYNC110 (the fake server has no event)
                        await asyncio.sleep(0.05)

            args = ["--config", str(config), "--kubelet-api", "dra", "--node-name", "bench"]
            args += ["--kube-api-server", f"http://127.0.0.1:{runner.addresses[0][1]}"]
            args += ["--kubelet-plugins-dir", str(directory / "plugins"), "--state-dir", str(directory / "state")]
            return await idle_rss(args, ready)
    finally:
        await runner.cleanup()


def _json(body: object) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


async def measure(rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"device-plugin": [], "dra": []}
    for _ in range(rounds):
        for mode, run in (("device-plugin", device_plugin_round), ("dra", dra_round)):
            with tempfile.TemporaryDirectory(prefix="gp-rss-", dir="/tmp") as tmp:
                figures[mode].append(await run(Path(tmp)))
    return figures


@click.command()
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Processes per mode.")
def main(rounds: int) -> None:
    """Measure the idle RSS of serve in both modes."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for mode, samples in asyncio.run(measure(rounds)).items():
        each = ", ".join(f"{s:.1f}" for s in samples)
        click.echo(f"{mode}: idle RSS {each} MiB, median {statistics.median(samples):.1f} MiB")


if __name__ == "__main__":
    main()
