"""The Helm chart (deploy/helm/gpuplugin) against the Kustomize manifests (deploy/overlays): what matters agrees.

Needs helm and kubectl (for `kubectl kustomize`): taken from GPUPLUGIN_E2E_HELM / GPUPLUGIN_E2E_KUBECTL, else from
the cache that `make e2e` builds them into (~/.cache/gpuplugin-e2e), else from PATH; skipped when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy/helm/gpuplugin"
CACHE = Path(
    os.environ.get("E2E_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpuplugin-e2e")
)


def find_tool(name: str, env: str, pattern: str) -> str | None:
    """The tool named by `env`, else the newest cached build, else PATH."""
    if os.environ.get(env):
        return os.environ[env]
    cached = sorted(CACHE.glob(pattern))
    if cached:
        return str(cached[-1])
    return shutil.which(name)


HELM = find_tool("helm", "GPUPLUGIN_E2E_HELM", "helm-*/bin/helm")
KUBECTL = find_tool("kubectl", "GPUPLUGIN_E2E_KUBECTL", "k8s-*/bin/kubectl")
pytestmark = pytest.mark.skipif(
    HELM is None or KUBECTL is None,
    reason="helm or kubectl not built: deploy/e2e/build-helm.sh and deploy/e2e/build-k8s.sh (make e2e) build them",
)


def docs(text: str) -> dict[str, dict[str, Any]]:
    """The objects of a multi-document YAML, by kind."""
    return {d["kind"]: d for d in yaml.safe_load_all(text) if d}


TEMPLATE = ("template", "gpuplugin", str(CHART), "--namespace", "kube-system")
LINT = ("lint", "--strict", str(CHART))


def helm(command: tuple[str, ...], *sets: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm with the chart (TEMPLATE or LINT) and `--set` values."""
    assert HELM is not None
    args = [HELM, *command]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, check=check)


def helm_template(*sets: str) -> dict[str, dict[str, Any]]:
    """`helm template gpuplugin` in kube-system, with `--set` values."""
    return docs(helm(TEMPLATE, *sets).stdout)


def kustomize(overlay: str) -> dict[str, dict[str, Any]]:
    """`kubectl kustomize deploy/overlays/<overlay>`."""
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy/overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return docs(out)


def pod_spec(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The DaemonSet's pod spec."""
    return objs["DaemonSet"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The plugin's container."""
    return pod_spec(objs)["containers"][0]  # type: ignore[no-any-return]


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A list of named entries (mounts, volumes, env) as a mapping."""
    return {i["name"]: i for i in items}


@pytest.mark.parametrize(("overlay", "backend"), [("nvml", "nvml"), ("mock", "mock")])
def test_chart_agrees_with_kustomize(overlay: str, backend: str) -> None:
    """securityContext, mounts, volumes, tolerations, affinity, priority class, probes, ports, args, env agree."""
    chart, kust = helm_template(f"backend={backend}"), kustomize(overlay)
    hp, kp = pod_spec(chart), pod_spec(kust)
    hc, kc = container(chart), container(kust)
    for key in ("securityContext", "tolerations", "priorityClassName", "automountServiceAccountToken", "affinity"):
        assert hp.get(key) == kp.get(key), f"pod {key}: chart {hp.get(key)} != kustomize {kp.get(key)}"
    for key in ("securityContext", "livenessProbe", "readinessProbe", "ports", "args", "resources", "imagePullPolicy"):
        assert hc.get(key) == kc.get(key), f"container {key}: chart {hc.get(key)} != kustomize {kc.get(key)}"
    assert by_name(hc["volumeMounts"]) == by_name(kc["volumeMounts"])
    assert by_name(hp["volumes"]) == by_name(kp["volumes"])
    assert by_name(hc["env"]) == by_name(kc["env"])
    assert chart["DaemonSet"]["metadata"]["name"] == kust["DaemonSet"]["metadata"]["name"]
    assert chart["DaemonSet"]["metadata"]["namespace"] == kust["DaemonSet"]["metadata"]["namespace"]


def test_default_config_and_image_match_the_base() -> None:
    """The chart's default config file is deploy/base/config.yaml; its default image is the base's."""
    chart = helm_template()
    base = yaml.safe_load((ROOT / "deploy/base/config.yaml").read_text())
    assert yaml.safe_load(chart["ConfigMap"]["data"]["config.yaml"]) == base
    assert chart["ConfigMap"]["metadata"]["name"] == kustomize("nvml")["ConfigMap"]["metadata"]["name"]
    base_ds = yaml.safe_load((ROOT / "deploy/base/daemonset.yaml").read_text())
    assert container(chart)["image"] == base_ds["spec"]["template"]["spec"]["containers"][0]["image"]


def test_nvidia_style_values() -> None:
    """NVIDIA's chart values (migStrategy, failOnInitError, runtimeClassName, config.name) render as NVIDIA's do."""
    chart = helm_template("migStrategy=mixed", "failOnInitError=false", "runtimeClassName=nvidia", "config.name=mine")
    env = {e["name"]: e.get("value") for e in container(chart)["env"]}
    assert env["MIG_STRATEGY"] == "mixed"
    assert env["FAIL_ON_INIT_ERROR"] == "false"
    assert pod_spec(chart)["runtimeClassName"] == "nvidia"
    assert "ConfigMap" not in chart
    assert by_name(pod_spec(chart)["volumes"])["config"]["configMap"]["name"] == "mine"
    assert container(chart)["args"][:2] == ["--config", "/etc/gpuplugin/default"]


def test_bad_backend_is_refused() -> None:
    """An unknown backend fails the render with a message naming the choices."""
    proc = helm(TEMPLATE, "backend=cuda", check=False)
    assert proc.returncode != 0
    assert "backend must be mock, nvml or partitioned" in proc.stderr


def test_lint() -> None:
    """helm lint --strict passes."""
    proc = helm(LINT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def objects(text: str) -> list[dict[str, Any]]:
    """Every object of a multi-document YAML, in order."""
    return [d for d in yaml.safe_load_all(text) if d]


def helm_objects(*sets: str) -> list[dict[str, Any]]:
    """`helm template gpuplugin` in kube-system, every object (several of a kind)."""
    return objects(helm(TEMPLATE, *sets).stdout)


def kustomize_dra() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/dra`: DRA mode on the mock overlay."""
    assert KUBECTL is not None
    command = [KUBECTL, "kustomize", str(ROOT / "deploy/dra")]
    return objects(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def of_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The objects of ``kind``, by name."""
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_kubelet_api_dra_renders_the_dra_overlays_daemonset_rbac_and_device_classes() -> None:
    """kubeletApi=dra renders what deploy/dra does: `--kubelet-api dra`, NODE_NAME, the plugins, plugin-watcher
    and CDI mounts, the ServiceAccount with its token and the same minimal RBAC, the same DeviceClasses, and both
    keep the probes and the metrics port, which DRA mode serves."""
    chart, kust = helm_objects("kubeletApi=dra", "backend=mock"), kustomize_dra()
    (chart_ds,), (kust_ds,) = of_kind(chart, "DaemonSet").values(), of_kind(kust, "DaemonSet").values()
    hp, kp = chart_ds["spec"]["template"]["spec"], kust_ds["spec"]["template"]["spec"]
    hc, kc = hp["containers"][0], kp["containers"][0]
    assert hc["args"][-2:] == ["--kubelet-api", "dra"] and kc["args"][-2:] == ["--kubelet-api", "dra"]
    assert hp["serviceAccountName"] == kp["serviceAccountName"] == "gpuplugin-dra"
    assert hp["automountServiceAccountToken"] is True and kp["automountServiceAccountToken"] is True
    assert by_name(hc["env"])["NODE_NAME"] == by_name(kc["env"])["NODE_NAME"]
    chart_mounts, kust_mounts = by_name(hc["volumeMounts"]), by_name(kc["volumeMounts"])
    chart_volumes, kust_volumes = by_name(hp["volumes"]), by_name(kp["volumes"])
    for name in ("kubelet-plugins", "plugins-registry", "cdi", "state", "config"):
        assert chart_mounts[name] == kust_mounts[name], name
        assert chart_volumes[name].keys() == kust_volumes[name].keys(), name
    for name in ("kubelet-plugins", "plugins-registry", "cdi", "state"):
        assert chart_volumes[name]["hostPath"] == kust_volumes[name]["hostPath"], name
    # What DRA mode does not use is not mounted.
    assert not {"device-plugins", "pod-resources"} & chart_mounts.keys()
    for container in (hc, kc):
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert "--metrics-address" in container["args"]
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        assert of_kind(chart, kind).keys() == of_kind(kust, kind).keys() == {"gpuplugin-dra"}, kind
    assert (
        of_kind(chart, "ClusterRole")["gpuplugin-dra"]["rules"]
        == of_kind(kust, "ClusterRole")["gpuplugin-dra"]["rules"]
    )
    chart_binding = of_kind(chart, "ClusterRoleBinding")["gpuplugin-dra"]
    kust_binding = of_kind(kust, "ClusterRoleBinding")["gpuplugin-dra"]
    assert (chart_binding["roleRef"], chart_binding["subjects"]) == (kust_binding["roleRef"], kust_binding["subjects"])
    assert of_kind(chart, "ServiceAccount")["gpuplugin-dra"]["metadata"]["namespace"] == "kube-system"
    chart_classes, kust_classes = of_kind(chart, "DeviceClass"), of_kind(kust, "DeviceClass")
    assert chart_classes.keys() == kust_classes.keys() and len(chart_classes) == 3
    for name, device_class in chart_classes.items():
        assert device_class["spec"] == kust_classes[name]["spec"], name


def test_the_default_renders_the_device_plugin_without_dra_objects() -> None:
    """Without kubeletApi the chart renders the device plugin: no API server token, no DRA objects or flags."""
    chart = helm_objects()
    assert {o["kind"] for o in chart} == {"ConfigMap", "DaemonSet"}
    (daemonset,) = of_kind(chart, "DaemonSet").values()
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    assert "--kubelet-api" not in spec["containers"][0]["args"]
    assert "device-plugins" in by_name(spec["containers"][0]["volumeMounts"])


def test_a_driver_name_reaches_the_flags_and_device_classes_and_a_class_can_be_left_out() -> None:
    """dra.driverName is passed as --dra-driver-name and selected by every DeviceClass; an empty class name makes
    no such class."""
    chart = helm_objects("kubeletApi=dra", "dra.driverName=gpu.example.com", "dra.deviceClasses.partition=")
    (daemonset,) = of_kind(chart, "DaemonSet").values()
    args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--dra-driver-name") + 1] == "gpu.example.com"
    classes = of_kind(chart, "DeviceClass")
    assert classes.keys() == {"gpu.gpuplugin.dev", "whole-gpu.gpuplugin.dev"}
    for device_class in classes.values():
        assert 'device.driver == "gpu.example.com"' in device_class["spec"]["selectors"][0]["cel"]["expression"]


def test_bad_kubelet_api_is_refused() -> None:
    """An unknown kubeletApi fails the render with a message naming the choices."""
    proc = helm(TEMPLATE, "kubeletApi=csi", check=False)
    assert proc.returncode != 0
    assert "kubeletApi must be device-plugin or dra" in proc.stderr


def test_lint_in_dra_mode() -> None:
    """helm lint --strict passes with kubeletApi=dra."""
    proc = helm(LINT, "kubeletApi=dra", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
