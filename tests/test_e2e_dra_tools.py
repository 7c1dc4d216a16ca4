"""The offline parts of `make e2e-dra` (deploy/e2e/run_dra.py): the DaemonSet's route to the API server, slice
attributes, what a test container prints, a CDI spec's environment. The cluster runs only under `make e2e-dra`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_e2e_tools import ROOT, load

run_dra = load("run_dra")
# run_dra puts deploy/e2e on sys.path to import its siblings; the rest of the suite must not see them.
sys.path.remove(str(ROOT / "deploy/e2e"))


def test_host_api_daemonset_points_the_plugin_at_the_loopback_api_server() -> None:
    """The DaemonSet goes on the host's network with KUBERNETES_SERVICE_* replaced; other objects are untouched."""
    ds = {
        "kind": "DaemonSet",
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "p", "env": [{"name": "NODE_NAME"}, {"name": "KUBERNETES_SERVICE_HOST", "value": "x"}]}
                    ]
                }
            }
        },
    }
    other = {"kind": "ClusterRole", "rules": []}
    out = run_dra.host_api_daemonset([ds, other], 6443)
    spec = out[0]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["containers"][0]["env"] == [
        {"name": "NODE_NAME"},
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
    ]
    assert out[1] is other
    assert "hostNetwork" not in ds["spec"]["template"]["spec"]  # type: ignore[index]


def test_attribute_reads_qualified_and_plain_keys() -> None:
    """A slice attribute is found under its own name or the driver's domain, and is None when absent."""
    device = {"attributes": {"index": {"int": 3}, "gpu.gpuplugin.dev/uuid": {"string": "GPU-a"}}}
    assert run_dra.attribute(device, "index") == 3
    assert run_dra.attribute(device, "uuid") == "GPU-a"
    assert run_dra.attribute(device, "numaNode") is None


def test_visible_devices_reads_the_printed_line() -> None:
    """The IDs come from the NVIDIA_VISIBLE_DEVICES= line; an empty value or no line gives none."""
    assert run_dra.visible_devices("NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b\nnvidia0\n") == ["GPU-a", "GPU-b"]
    assert run_dra.visible_devices("NVIDIA_VISIBLE_DEVICES=\n") == []
    assert run_dra.visible_devices("nvidia0\n") == []


def test_spec_env_merges_spec_and_device_edits() -> None:
    """Environment from the spec's own edits and each device's edits, by name."""
    spec = {
        "containerEdits": {"env": ["A=1"]},
        "devices": [{"name": "d", "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b"]}}],
    }
    assert run_dra.spec_env(spec) == {"A": "1", "NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}


def test_results_are_written_only_from_a_clean_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An e2e's figures go to its results file under the commit measured; a changed checkout writes nothing."""
    path = tmp_path / "cluster/e2e.json"
    monkeypatch.setattr(run_dra.dp, "measured_commit", lambda: "a" * 40 + "-dirty")
    assert not run_dra.dp.write_results(path, {"figures_s": {"x_s": 1.0}})
    assert not path.exists()
    monkeypatch.setattr(run_dra.dp, "measured_commit", lambda: "a" * 40)
    assert run_dra.dp.write_results(path, {"figures_s": {"x_s": 1.0}})
    written = json.loads(path.read_text())
    assert written["commit"] == "a" * 40
    assert written["figures_s"] == {"x_s": 1.0}
