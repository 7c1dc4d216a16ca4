"""The command line: the daemon as its own process (signals, sockets, logs), ``devices`` and ``demo``."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from click.testing import CliRunner

from gpuplugin.cli import main
from gpuplugin.demo import run_demo
from gpuplugin.testing.simulator import KubeletSimulator
from tests.test_reliability import serve, sockets_left

GPU = "nvidia.com/gpu"


async def test_serve_registers_reloads_on_sighup_and_exits_cleanly_on_sigterm(workdir: Path) -> None:
    """``serve`` registers, rediscovers on SIGHUP, and on SIGTERM removes its sockets and exits 0."""
    async with (
        KubeletSimulator(workdir) as kubelet,
        serve(workdir, "--backend", "mock", "--mock-gpus", "4") as plugin,
    ):
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 4, timeout=20)
        plugin.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert plugin.process.returncode is None
        assert await plugin.terminate() == 0
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 0, timeout=5)
    names = [e["event"] for e in plugin.events]
    assert "registered" in names and "SIGHUP: reloading" in names and names[-1] == "stopped"
    assert all("level" in e and "timestamp" in e for e in plugin.events)
    assert plugin.other == [], "every line logged is JSON"
    assert sockets_left(workdir) == []


async def test_sigint_also_stops_cleanly(workdir: Path) -> None:
    """SIGINT stops the daemon like SIGTERM: exit 0, sockets removed."""
    async with KubeletSimulator(workdir) as kubelet, serve(workdir, "--backend", "mock") as plugin:
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8, timeout=20)
        plugin.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(plugin.process.wait(), 10) == 0
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
