"""deploy/overlays/mps: the NVML overlay plus hostIPC, the MPS root on the host and the compute capability."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.test_deploy import DEPLOY, canonical, env, mounts, plugin_container, pod_spec, render, the, validate, volumes

MPS = DEPLOY / "overlays" / "mps"


def test_mps_overlay_adds_host_ipc_and_the_mps_root_and_nothing_more() -> None:
    """The overlay is the NVML one with hostIPC, /run/nvidia/mps read-write from the host, and compute added."""
    ours, nvml = render(MPS), render(DEPLOY / "overlays" / "nvml")
    assert pod_spec(the(ours, "DaemonSet"))["hostIPC"] is True
    assert volumes(ours)["mps-root"] == {
        "name": "mps-root",
        "hostPath": {"path": "/run/nvidia/mps", "type": "DirectoryOrCreate"},
    }
    assert mounts(ours)["/run/nvidia/mps"]["name"] == "mps-root"
    assert not mounts(ours)["/run/nvidia/mps"].get("readOnly", False)
    assert env(ours)["NVIDIA_DRIVER_CAPABILITIES"] == "utility,compute"
    assert env(ours)["GPUPLUGIN_BACKEND"] == "nvml"
    assert set(volumes(ours)) - set(volumes(nvml)) == {"mps-root"}
    assert {k: v for k, v in env(ours).items() if k != "NVIDIA_DRIVER_CAPABILITIES"} == {
        k: v for k, v in env(nvml).items() if k != "NVIDIA_DRIVER_CAPABILITIES"
    }
    container = plugin_container(ours)
    assert container["securityContext"] == plugin_container(nvml)["securityContext"]


def test_mps_overlay_renders_as_kubectl_kustomize_does() -> None:
    """Where kubectl is installed, its ``kustomize`` renders the MPS overlay as the test renderer does."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the test renderer alone is used")
    result = subprocess.run([kubectl, "kustomize", str(MPS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = {(o["kind"], o["metadata"]["name"]): canonical(o) for o in yaml.safe_load_all(result.stdout)}
    ours: dict[tuple[str, str], Any] = {(o["kind"], o["metadata"]["name"]): canonical(o) for o in render(MPS)}
    assert ours == theirs


def test_mps_overlay_matches_the_kubernetes_schema() -> None:
    """Every object of the MPS overlay is valid for the Kubernetes API."""
    pytest.importorskip("kubernetes", reason="schema validation needs the kubernetes package (test group)")
    for obj in render(MPS):
        validate(obj)


def test_helm_mps_values_render_what_the_mps_overlay_has() -> None:
    """The chart with ``mps.enabled`` renders the MPS overlay's pod: hostIPC, mounts, volumes and environment."""
    from tests import test_helm

    if test_helm.HELM is None or test_helm.KUBECTL is None:
        pytest.skip("helm or kubectl not built (make e2e builds them)")
    chart, kust = test_helm.helm_template("backend=nvml", "mps.enabled=true"), test_helm.kustomize("mps")
    hp, kp = test_helm.pod_spec(chart), test_helm.pod_spec(kust)
    assert hp["hostIPC"] is kp["hostIPC"] is True
    hc, kc = test_helm.container(chart), test_helm.container(kust)
    assert test_helm.by_name(hc["volumeMounts"]) == test_helm.by_name(kc["volumeMounts"])
    assert test_helm.by_name(hp["volumes"]) == test_helm.by_name(kp["volumes"])
    assert test_helm.by_name(hc["env"]) == test_helm.by_name(kc["env"])
    assert "hostIPC" not in test_helm.pod_spec(test_helm.helm_template("backend=nvml"))
