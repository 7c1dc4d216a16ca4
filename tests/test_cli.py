"""The command line: the daemon as its own process (signals, sockets, logs), ``devices`` and ``demo``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from click.testing import CliRunner

from gpuplugin.cli import main
from gpuplugin.demo import run_demo
from gpuplugin.simulator import KubeletSimulator

GPU = "nvidia.com/gpu"


async def start_serve(directory: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuplugin",
        "serve",
        "--backend",
        "mock",
        "--kubelet-dir",
        str(directory),
        "--state-dir",
        str(directory),
        "--log-format",
        "json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_serve_registers_reloads_on_sighup_and_exits_cleanly_on_sigterm(workdir: Path) -> None:
    """``serve`` registers, rediscovers on SIGHUP, and on SIGTERM removes its sockets and exits 0."""
    async with KubeletSimulator(workdir) as kubelet:
        process = await start_serve(workdir, "--mock-gpus", "4")
        try:
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 4, timeout=20)
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert process.returncode is None
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 10)
        finally:
            if process.returncode is None:
                process.kill()
            returncode = await process.wait()
        assert returncode == 0
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 0, timeout=5)
    events = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    names = [e["event"] for e in events]
    assert "registered" in names and "SIGHUP: reloading" in names and names[-1] == "stopped"
    assert all("level" in e and "timestamp" in e for e in events)
    assert not [p for p in workdir.iterdir() if p.name.startswith("gpuplugin-") or p.name == "mock.sock"]


async def test_sigint_also_stops_cleanly(workdir: Path) -> None:
    """SIGINT stops the daemon like SIGTERM: exit 0, sockets removed."""
    async with KubeletSimulator(workdir) as kubelet:
        process = await start_serve(workdir)
        try:
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=20)
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.communicate(), 10)
        finally:
            if process.returncode is None:
                process.kill()
            returncode = await process.wait()
    assert returncode == 0
    assert not [p for p in workdir.iterdir() if p.suffix == ".sock"]


def test_devices_lists_the_mock_gpus_as_json(workdir: Path) -> None:
    """``devices --json`` lists every GPU the backend sees, with its NUMA node and model."""
    result = CliRunner().invoke(main, ["devices", "--json", "--mock-gpus", "3", "--state-dir", str(workdir)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["attributes"]["index"] for r in rows] == ["0", "1", "2"]
    assert {r["resource"] for r in rows} == {GPU}
    assert all(r["id"].startswith("GPU-") and r["health"] == "Healthy" for r in rows)


def test_devices_table_has_a_header_and_a_row_per_gpu(workdir: Path) -> None:
    """``devices`` prints a table: a header line and one line per GPU."""
    result = CliRunner().invoke(main, ["devices", "--mock-gpus", "2", "--state-dir", str(workdir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("RESOURCE") and len(lines) == 3


def test_bad_config_gives_one_line_and_exit_2(workdir: Path) -> None:
    """A bad config file gets one message naming the field and a non-zero exit, no traceback."""
    config = workdir / "config.yaml"
    config.write_text("version: v1\nhealth:\n  recoveryQuietPeriodSeconds: soon\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--kubelet-dir", str(workdir)])
    assert result.exit_code == 2
    assert "health.recoveryQuietPeriodSeconds" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_unknown_backend_is_refused(workdir: Path) -> None:
    """An unknown backend name is refused with the installed ones listed."""
    result = CliRunner().invoke(main, ["devices", "--backend", "quantum", "--state-dir", str(workdir)])
    assert result.exit_code == 2
    assert "quantum" in result.output and "mock" in result.output


async def test_demo_tells_the_whole_story(workdir: Path) -> None:
    """The demo registers, admits its burst, sees an XID and the recovery, and re-registers after a restart."""
    report = await run_demo(quiet_period_s=0.2, say=lambda _: None, workdir=workdir)
    assert len(report.admitted) == 5
    assert len(report.admitted["train-a/container-0"]) == 4
    taken = [i for ids in report.admitted.values() for i in ids]
    assert len(taken) == len(set(taken)) == 8
    assert report.recovery_s >= 0.2
    assert 0 < report.reregistration_ms < 1000
    assert any("registered again" in line for line in report.lines)
    shared = "nvidia.com/mig-1g.18gb.shared"
    assert report.partitioned == {"nvidia.com/mig-2g.35gb": 1, shared: 18, "nvidia.com/mig-3g.71gb": 1}
    # GPU 1 holds seven 1g.18gb partitions, fourteen replicas: all of them go, GPU 0's stay.
    assert report.partitioned_after_xid == {"nvidia.com/mig-2g.35gb": 1, shared: 4, "nvidia.com/mig-3g.71gb": 1}
