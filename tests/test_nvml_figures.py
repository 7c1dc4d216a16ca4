"""``python -m benchmarks.nvml_figures --fake``: every figure of the NVML backend, against the fake NVML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_fake_run_writes_every_figure(tmp_path: Path) -> None:
    """A small run against the fake writes JSON and markdown with discovery, RPCs, idle CPU, XID delay and node."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.nvml_figures",
            "--fake",
            *("--calls", "200", "--preferred-calls", "50", "--discoveries", "2", "--idle", "0.5", "--xids", "4"),
            # A short event wait: closing the backend waits out one, and the fake's wait really blocks.
            *("--wait-timeout-ms", "100", "--out", str(tmp_path)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "warning" not in done.stderr, done.stderr
    data = json.loads((tmp_path / "nvml_figures.json").read_text())

    assert data["nvml"] == "fake"
    for figure in ("start_ms", "rediscovery_ms"):
        assert data["discovery"][figure]["count"] == 2 and data["discovery"][figure]["median"] > 0
    assert data["allocate"]["count"] == 200 and data["allocate"]["errors"] == 0
    assert data["allocate"]["p99_ms"] >= data["allocate"]["p50_ms"] > 0
    assert data["preferred_allocation"]["count"] == 50 and data["preferred_allocation"]["errors"] == 0
    idle = data["health_thread_idle"]
    assert idle["idle_s"] >= 0.5 and 0 <= idle["cpu_s_per_s"] < 0.5 and idle["source"] in ("schedstat", "stat")
    xid = data["xid_to_list_and_watch"]
    assert xid["count"] == 4 and xid["xids_counted"] == 4 and 0 < xid["median_ms"] <= xid["max_ms"]
    assert xid["healthy_again"]["count"] == 4
    node = data["node"]
    assert node["devices"] == 2 and len(set(node["uuids"])) == 2 and node["driver_version"]
    assert node["links"] == [{"a": node["ids"][0], "b": node["ids"][1], "nvlinks": 18, "pcie": "HOSTBRIDGE"}]
    assert data["close_ms"] > 0
    text = (tmp_path / "nvml_figures.md").read_text()
    assert "(d) XID → ListAndWatch Unhealthy" in text and "| 18 | HOSTBRIDGE |" in text
    assert "(b) Allocate p50 / p99" in done.stdout
