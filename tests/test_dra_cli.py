"""``gpuplugin serve --kubelet-api dra`` as a process: registered by the DRA kubelet simulator, publishing to the
fake API server, faults injected with ``gpuplugin mock`` over the mock's control socket as in device-plugin mode;
and its bad input refused with one line.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.dra_rss import measure as measure_rss
from gpuplugin.cli import main
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.testing.dra import DraKubelet
from tests.fake_apiserver import FakeApiServer, fake_apiserver
from tests.test_dra_apiserver import eventually
from tests.test_reliability import serve_env

NODE = "node-a"
DRIVER = "gpu.gpuplugin.dev"
DEADLINE_S = 10.0


def dra_flags(directory: Path, api: FakeApiServer) -> list[str]:
    """DRA mode on ``directory``: the plugin-watcher and CDI directories from the config file, as a node's are."""
    config = directory / "config.yaml"
    plugin = {"pluginsRegistryDir": str(directory / "registry")}
    config.write_text(
        json.dumps({"version": "v1", "plugin": plugin, "flags": {"plugin": {"cdiSpecDir": str(directory / "cdi")}}})
    )
    return [
        *("--config", str(config), "--kubelet-api", "dra", "--node-name", NODE, "--kube-api-server", api.url),
        *("--kubelet-plugins-dir", str(directory / "plugins"), "--state-dir", str(directory / "state")),
    ]


async def gpuplugin(*args: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuplugin",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=serve_env(),
    )
    return await asyncio.wait_for(process.wait(), DEADLINE_S)


@asynccontextmanager
async def serving(directory: Path, api: FakeApiServer) -> AsyncIterator[asyncio.subprocess.Process]:
    """``serve --kubelet-api dra`` on two mock GPUs; killed by its PID if still running after the block."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gpuplugin", "serve", "--backend", "mock", "--mock-gpus", "2"),
        *dra_flags(directory, api),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=serve_env(),
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_in_dra_mode_publishes_prepares_and_takes_mock_faults(workdir: Path) -> None:
    """The process registers as a DRA plugin, publishes both mock GPUs, prepares a claim read from the API server;
    ``gpuplugin mock xid`` takes a GPU out of the slice and ``recover`` brings it back, a SIGHUP between them;
    SIGTERM stops it cleanly, its sockets gone."""
    settings = DriverSettings(
        node_name=NODE,
        plugins_dir=workdir / "plugins",
        plugins_registry_dir=workdir / "registry",
        cdi_dir=workdir / "cdi",
    )
    async with fake_apiserver() as api, DraKubelet(workdir / "registry") as kubelet:
        api.add_node(NODE, "uid-1")
        async with serving(workdir, api) as process:
            await kubelet.wait_registered(DRIVER, timeout_s=DEADLINE_S)
            await eventually(lambda: len(api.devices()) == 2)
            _, second = api.devices()
            api.add_claim("ns", "c", "u-1", [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": second}])
            response = await kubelet.prepare(DRIVER, [ClaimRef("ns", "c", "u-1")])
            assert response.claims["u-1"].error == ""
            assert json.loads(spec_path(settings, "u-1").read_text())["devices"][0]["name"] == "u-1-gpu"
            socket = str(workdir / "state" / "mock.sock")
            assert await gpuplugin("mock", "xid", "--gpu", "0", "--xid", "79", "--socket", socket) == 0
            await eventually(lambda: api.devices() == [second])
            # SIGHUP rediscovers rather than ending the process: the recovery that follows is still published.
            process.send_signal(signal.SIGHUP)
            assert await gpuplugin("mock", "recover", "--gpu", "0", "--socket", socket) == 0
            await eventually(lambda: len(api.devices()) == 2)
            assert process.returncode is None
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), DEADLINE_S) == 0
            await kubelet.wait_gone(DRIVER)
        assert not settings.socket_path.exists()
        assert not settings.registration_path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--node-name (or NODE_NAME) is required with --kubelet-api dra"),
        (["--node-name", "Node_A"], "dra.nodeName: must be a lowercase DNS subdomain"),
        (["--node-name", "n", "--dra-driver-name", "x_y"], "dra.driverName: must be a lowercase DNS subdomain"),
    ],
)
def test_bad_dra_flags_are_refused_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    """A missing or malformed node or driver name stops ``serve`` with exit 2 and one line naming it."""
    result = CliRunner().invoke(
        main,
        ["serve", "--backend", "mock", "--kubelet-api", "dra", "--state-dir", str(tmp_path), *args],
        env={"NODE_NAME": ""},
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert message in line


def test_sharing_is_refused_in_dra_mode(tmp_path: Path) -> None:
    """A config asking for time-slicing is refused in DRA mode with one line naming the section."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n      - name: nvidia.com/gpu\n        replicas: 2\n"
    )
    result = CliRunner().invoke(
        main,
        ["serve", "--backend", "mock", "--config", str(config), "--kubelet-api", "dra", "--node-name", "n"],
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "sharing.timeSlicing: not available with --kubelet-api dra" in line


def test_a_corrupt_checkpoint_stops_serve_with_one_line_naming_it(workdir: Path) -> None:
    """An unreadable checkpoint is not silently dropped (its claims' pods still run): ``serve`` exits 1 naming it."""
    checkpoint = workdir / "plugins" / DRIVER / "checkpoint.json"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("{")
    args = ["serve", "--backend", "mock", "--kubelet-api", "dra", "--node-name", NODE, "--log-level", "error"]
    args += ["--kube-api-server", "http://127.0.0.1:9", "--kubelet-plugins-dir", str(workdir / "plugins")]
    args += ["--state-dir", str(workdir / "state")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"gpuplugin: {checkpoint}: unreadable checkpoint (JSONDecodeError")


async def test_the_rss_benchmark_measures_both_modes_registered() -> None:
    """``benchmarks.dra_rss`` gets a registered process of each mode and reads a plausible RSS of each."""
    figures = await measure_rss(1)
    assert set(figures) == {"device-plugin", "dra"}
    assert all(10 < samples[0] < 500 for samples in figures.values())
