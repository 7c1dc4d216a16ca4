"""benchmarks.dra_baseline: this plugin and the DRA example driver's kubelet plugin, both as processes on a real API
server (tests/controlplane.py), called by one DRA kubelet simulator; skipped where the binaries are not cached."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import dra_baseline
from benchmarks.dra_baseline import CALLS, EXAMPLE, OURS, add_node, measure, percentiles_ms, report
from tests.controlplane import BIN, ControlPlane, available, control_plane


def cached_example() -> Path | None:
    """The example plugin benchmarks/draexample/build.sh left in the cache beside the Kubernetes binaries, if any."""
    found = sorted(BIN.parent.parent.glob(f"dra-example-*-{BIN.parent.name}/bin/dra-example-kubeletplugin"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with control_plane() as started:
        add_node(started)
        yield started


async def test_both_plugins_prepare_and_unprepare_every_claim_from_the_api_server(
    plane: ControlPlane, workdir: Path
) -> None:
    """Each driver prepares and unprepares each claim allocated from its own published slice, one timing a call."""
    example = cached_example()
    if example is None:
        pytest.skip("the DRA example plugin is not cached (benchmarks/draexample/build.sh builds it)")
    times = await measure(plane, workdir, example, 3)
    assert set(times) == {OURS, EXAMPLE}
    for calls in times.values():
        assert set(calls) == set(CALLS)
        assert all(len(samples) == 3 and min(samples) > 0 for samples in calls.values())


def test_the_results_name_the_commit_and_each_driver_s_percentiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The results file holds the commit measured, the versions, and nearest-rank p50 and p99 of each call in ms."""
    monkeypatch.setenv("GPUPLUGIN_COMMIT", "abc123")
    samples = [n / 1000 for n in range(1, 101)]
    assert percentiles_ms(samples) == {"p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}
    binary = Path("/cache/dra-example-v0.2.1-k8s-v1.34.4/bin/dra-example-kubeletplugin")
    result = report({OURS: dict.fromkeys(CALLS, samples)}, 100, binary)
    assert (result["commit"], result["dra_example_driver"], result["kubernetes"]) == ("abc123", "v0.2.1", "v1.34.4")
    assert result["drivers"][OURS]["NodePrepareResources"]["p99_ms"] == 99.0


def test_the_build_script_refuses_an_unknown_argument() -> None:
    """benchmarks/draexample/build.sh with an argument it does not know exits 2, naming it."""
    done = subprocess.run([str(dra_baseline.BUILD), "--nope"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "unknown argument --nope" in done.stderr
