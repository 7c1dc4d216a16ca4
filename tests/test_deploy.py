"""The deployment (deploy/): image, Kustomize manifests and the kind end-to-end script, checked without a cluster.

Manifests are rendered by a small renderer of the Kustomize subset deploy/ uses (resources, namespace,
configMapGenerator, strategic-merge patches, images), compared with ``kubectl kustomize`` where kubectl is
installed, and every rendered object is validated against the Kubernetes API schemas of the ``kubernetes``
client's models: unknown or misspelled fields fail, as do wrong types and missing required fields. The e2e
script's fault-injection commands are run as written against a real ``gpuplugin serve`` started with the mock
overlay's own arguments, environment and config file, registered with the kubelet simulator.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from gpuplugin.backends.mock import gpu_uuid
from gpuplugin.cli import main
from gpuplugin.daemon.settings import Overrides, PluginSettings, parse_config, resolve
from gpuplugin.devices.cdi import CdiSettings
from gpuplugin.testing.simulator import KubeletSimulator

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("nvml", "mock")
GPU = "nvidia.com/gpu"
E2E = DEPLOY / "kind" / "e2e.sh"

# ---------------------------------------------------------------------------------------------------------------
# A renderer for the Kustomize subset deploy/ uses.

#: Strategic-merge keys of the lists deploy/ patches (from the Kubernetes API's patchMergeKey); other lists are
#: replaced whole, as in a strategic merge patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "patches", "images"}


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Apply a strategic merge patch: maps merge, ``null`` deletes, keyed lists merge by key, others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge({}, value, key) if isinstance(value, dict) else copy.deepcopy(value)
        return merged
    key = MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item[key]: n for n, item in enumerate(merged_list)}
        for item in patch:
            if item[key] in index:
                merged_list[index[item[key]]] = strategic_merge(merged_list[index[item[key]]], item, field)
            else:
                merged_list.append(strategic_merge({}, item, field))
        return merged_list
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory (the subset above; anything else is refused, not ignored)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test renderer does not know {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for generator in kustomization.get("configMapGenerator", []):
        assert generator.get("options", {}).get("disableNameSuffixHash"), "hashed names are not rendered here"
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for patch_ref in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / patch_ref["path"]).read_text())
        targets = [
            n
            for n, o in enumerate(objects)
            if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]
        ]
        assert len(targets) == 1, f"patch {patch_ref['path']} matches {len(targets)} objects"
        objects[targets[0]] = strategic_merge(objects[targets[0]], patch)
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in pod_spec(obj).get("containers", []) if obj["kind"] in WORKLOADS else []:
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def canonical(value: Any, field: str = "") -> Any:
    """Order-insensitive form of keyed lists (Kustomize may reorder them), for comparing two renderings."""
    if isinstance(value, dict):
        return {k: canonical(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [canonical(v, field) for v in value]
        key = MERGE_KEYS.get(field)
        return sorted(items, key=lambda item: str(item[key])) if key else items
    return value


WORKLOADS = {"DaemonSet", "Deployment", "Pod"}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Schema validation against the kubernetes client's models.


def model_class(type_name: str) -> Any:
    client = importlib.import_module("kubernetes.client")
    return getattr(client, type_name)


def inner_type(type_name: str) -> tuple[str, str]:
    """('list', T), ('dict', T) or ('', T) for the kubernetes client's type strings, old and new spellings."""
    for prefix, kind in (("List[", "list"), ("list[", "list")):
        if type_name.startswith(prefix):
            return kind, type_name[len(prefix) : -1]
    for prefix, kind in (("Dict[str, ", "dict"), ("dict(str, ", "dict")):
        if type_name.startswith(prefix):
            return kind, type_name[len(prefix) : -1]
    return "", type_name


def unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Every key of ``value`` that the API type has no field for, as JSON paths (recursively)."""
    container, element = inner_type(type_name)
    if container == "list":
        return [e for n, item in enumerate(value or []) for e in unknown_fields(item, element, f"{path}[{n}]")]
    if container == "dict":
        return [e for k, item in (value or {}).items() for e in unknown_fields(item, element, f"{path}.{k}")]
    if not re.match(r"^(V\d|Core|Apps|Storage)\w*$", element) or value is None:
        return []
    model = model_class(element)
    json_to_attribute = {json_name: attr for attr, json_name in model.attribute_map.items()}
    if not isinstance(value, dict):
        return [f"{path}: expected an object for {element}, got {type(value).__name__}"]
    errors = [f"{path}.{key}: no such field in {element}" for key in value if key not in json_to_attribute]
    for key, item in value.items():
        if key in json_to_attribute:
            errors += unknown_fields(item, model.openapi_types[json_to_attribute[key]], f"{path}.{key}")
    return errors


def quantities_as_strings(value: Any, field: str = "") -> Any:
    """Resource quantities as strings: the API takes ``2`` or ``"2"``, the client's models only the second."""
    if isinstance(value, dict):
        if field in {"limits", "requests"}:
            return {k: str(v) if isinstance(v, int | float) else v for k, v in value.items()}
        return {k: quantities_as_strings(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [quantities_as_strings(v, field) for v in value]
    return str(value) if field == "sizeLimit" and isinstance(value, int | float) else value


def validate(obj: dict[str, Any]) -> None:
    """Fail on any field the API does not define, on a wrong type, or on a missing required field."""
    obj = quantities_as_strings(obj)
    group_version, kind = obj["apiVersion"], obj["kind"]
    version = group_version.rpartition("/")[2]
    type_name = f"{version.capitalize()}{kind}"
    errors = unknown_fields(obj, type_name, kind)
    assert not errors, "\n".join(errors)
    model = model_class(type_name)
    if hasattr(model, "from_dict"):
        model.from_dict(obj)  # pydantic models: strict types and required fields
    else:  # older clients: the ApiClient's deserializer checks required fields
        client = importlib.import_module("kubernetes.client")
        response = type("Response", (), {"data": json.dumps(obj)})()
        client.ApiClient().deserialize(response, type_name)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(DEPLOY / "overlays" / overlay) for overlay in OVERLAYS}


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def plugin_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(the(objects, "DaemonSet"))["containers"]
    assert [c["name"] for c in containers] == ["gpuplugin"]
    container: dict[str, Any] = containers[0]
    return container


def volumes(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(the(objects, "DaemonSet"))["volumes"]}


def mounts(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in plugin_container(objects)["volumeMounts"]}


#: The node the tests pretend to run on, for the downward API's ``spec.nodeName``.
NODE_NAME = "kind-worker"


def env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet would set it on node ``NODE_NAME``."""
    variables = {}
    for e in plugin_container(objects).get("env", []):
        if "value" in e:
            variables[e["name"]] = e["value"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, e
            variables[e["name"]] = NODE_NAME
    return variables


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


def script_variables() -> dict[str, str]:
    """The e2e script's top-level constants, ``NAME=value`` or ``NAME=${NAME:-value}``."""
    found = {}
    for match in re.finditer(r"^([A-Z_]+)=(\S*)$", E2E.read_text(), re.MULTILINE):
        name, value = match.groups()
        default = re.fullmatch(r"\$\{" + name + r":-(.*)\}", value)
        found[name] = default.group(1) if default else value
    return found


def script_commands(prefix: str) -> list[list[str]]:
    """The words of each script line that starts with ``prefix``, its "$VARS" expanded."""
    variables = script_variables()
    commands = []
    for line in E2E.read_text().splitlines():
        if line.strip().startswith(prefix):
            expanded = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: variables.get(m.group(1), m.group(0)), line.strip())
            commands.append(shlex.split(expanded))
    return commands


# ---------------------------------------------------------------------------------------------------------------
# The renderer itself.


def test_strategic_merge_merges_keyed_lists_and_replaces_others() -> None:
    """Keyed lists merge by key (new items appended), plain lists are replaced, maps merge recursively."""
    base = {"spec": {"containers": [{"name": "a", "args": ["x"], "env": [{"name": "A", "value": "1"}]}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["y"], "env": [{"name": "B", "value": "2"}]}]}}
    merged = strategic_merge(base, patch)
    assert merged == {
        "spec": {
            "containers": [
                {"name": "a", "args": ["y"], "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
            ]
        }
    }
    assert base["spec"]["containers"][0]["args"] == ["x"], "the base must not be modified"


def test_strategic_merge_null_deletes_a_field() -> None:
    """A null in the patch deletes the field: how the mock overlay swaps an emptyDir for a hostPath."""
    base = {"volumes": [{"name": "state", "emptyDir": {"medium": "Memory"}}, {"name": "tmp", "emptyDir": {}}]}
    patch = {"volumes": [{"name": "state", "emptyDir": None, "hostPath": {"path": "/run/x"}}]}
    assert strategic_merge(base, patch) == {
        "volumes": [{"name": "state", "hostPath": {"path": "/run/x"}}, {"name": "tmp", "emptyDir": {}}]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Where kubectl is installed, its ``kustomize`` renders the overlay exactly as the test renderer does."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the test renderer alone is used")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {(o["kind"], o["metadata"]["name"]): canonical(o) for o in yaml.safe_load_all(result.stdout)}
    ours = {(o["kind"], o["metadata"]["name"]): canonical(o) for o in rendered[overlay]}
    assert ours == theirs


# ---------------------------------------------------------------------------------------------------------------
# Schemas.


@pytest.fixture(scope="module")
def kubernetes_client() -> None:
    pytest.importorskip("kubernetes", reason="schema validation needs the kubernetes package (test group)")


@pytest.mark.usefixtures("kubernetes_client")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_matches_the_kubernetes_schema(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Every object of the overlay has only fields the API defines, of the right types, required ones present."""
    assert {o["kind"] for o in rendered[overlay]} == {"ConfigMap", "DaemonSet"}
    for obj in rendered[overlay]:
        validate(obj)


@pytest.mark.usefixtures("kubernetes_client")
def test_the_e2e_pod_matches_the_kubernetes_schema() -> None:
    """The e2e script's GPU pod is a valid Pod."""
    validate(yaml.safe_load((DEPLOY / "kind" / "gpu-pod.yaml").read_text()))


@pytest.mark.usefixtures("kubernetes_client")
def test_schema_validation_catches_misspelled_and_mistyped_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validator is strict: a misspelled field deep in the pod spec, a string port and a lost name all fail."""
    daemonset = the(rendered["mock"], "DaemonSet")
    misspelled = copy.deepcopy(daemonset)
    plugin_container([misspelled])["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(AssertionError, match=r"readOnlyRootFileSystem: no such field in V1SecurityContext"):
        validate(misspelled)
    mistyped = copy.deepcopy(daemonset)
    plugin_container([mistyped])["ports"][0]["containerPort"] = "9400"
    with pytest.raises(ValueError, match="containerPort"):
        validate(mistyped)
    nameless = copy.deepcopy(daemonset)
    del plugin_container([nameless])["volumeMounts"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate(nameless)


# ---------------------------------------------------------------------------------------------------------------
# What the manifests must say.


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemonset_runs_in_kube_system_as_node_critical_tolerating_gpu_taints(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """kube-system, system-node-critical, a toleration for nvidia.com/gpu:NoSchedule, as NVIDIA's plugin."""
    daemonset = the(rendered[overlay], "DaemonSet")
    spec = pod_spec(daemonset)
    assert {o["metadata"]["namespace"] for o in rendered[overlay]} == {"kube-system"}
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["automountServiceAccountToken"] is False
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_is_locked_down(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No privilege escalation, a read-only root, every capability dropped and none added, seccomp on."""
    container = plugin_container(rendered[overlay])
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("privileged", False) is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    pod_security = pod_spec(the(rendered[overlay], "DaemonSet"))["securityContext"]
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    # uid 0 is deliberate (the kubelet's directory is root's) and said explicitly, not left to the image.
    assert pod_security["runAsUser"] == 0
    spec = pod_spec(the(rendered[overlay], "DaemonSet"))
    assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in spec.items() if v}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_metrics_share_the_metrics_port(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Liveness on /healthz and readiness on /readyz, at the port --metrics-address listens on."""
    container = plugin_container(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(option(container["args"], "--metrics-address").rpartition(":")[2])
    assert ports["metrics"] == listen_port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        action = container[probe]["httpGet"]
        assert action["path"] == path
        assert ports.get(action["port"], action["port"]) == listen_port
    annotations = the(rendered[overlay], "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(listen_port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_have_requests_and_a_memory_limit(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """CPU and memory are requested, and memory is limited (a leak restarts the pod, not the node's kubelet)."""
    resources = plugin_container(rendered[overlay])["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_host_paths_are_the_kubelets_directories(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """device-plugins and pod-resources are hostPath directories, mounted where the plugin looks by default."""
    volume_by_name, mount_by_path = volumes(rendered[overlay]), mounts(rendered[overlay])
    defaults = PluginSettings()
    kubelet_dir = str(defaults.manager.server.kubelet_dir)
    plugins = mount_by_path[kubelet_dir]
    assert volume_by_name[plugins["name"]]["hostPath"] == {"path": kubelet_dir, "type": "Directory"}
    assert not plugins.get("readOnly", False), "the plugin creates its socket there"
    pod_resources = mount_by_path["/var/lib/kubelet/pod-resources"]
    assert volume_by_name[pod_resources["name"]]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert volume_by_name[pod_resources["name"]]["hostPath"]["type"].startswith("Directory")
    assert str(defaults.state_dir) in mount_by_path, "the state directory is writable under a read-only root"
    assert all("subPath" not in m for m in mount_by_path.values())
    assert set(volume_by_name) == {m["name"] for m in mount_by_path.values()}, "a volume without a mount, or reverse"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_state_directory_is_the_hosts_so_the_instance_lock_spans_pods(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """The state directory (and the lock in it) is a hostPath: a second pod on the node (a rollout with maxSurge,
    a second DaemonSet) sees the first's lock, which an emptyDir per pod would hide."""
    objects = rendered[overlay]
    state = mounts(objects)[str(PluginSettings().state_dir)]
    assert volumes(objects)[state["name"]]["hostPath"] == {"path": "/run/gpuplugin", "type": "DirectoryOrCreate"}
    assert not state.get("readOnly", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cdi_spec_directory_is_mounted_writable_from_the_host(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """/var/run/cdi, where the CDI writer puts specs and runtimes read them, is the host's, writable, whatever the
    config: a reload may turn a cdi-* strategy on (a read-only or missing directory failed every such Allocate)."""
    objects = rendered[overlay]
    spec_dir = str(CdiSettings().spec_dir)
    cdi = mounts(objects)[spec_dir]
    assert not cdi.get("readOnly", False)
    assert volumes(objects)[cdi["name"]]["hostPath"] == {"path": spec_dir, "type": "DirectoryOrCreate"}
    example = parse_config((DEPLOY / "examples" / "cdi.yaml").read_text(), "cdi.yaml")
    assert example["flags"]["plugin"]["cdiSpecDir"] == spec_dir


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_node_name_comes_from_the_downward_api(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """NODE_NAME is the pod's spec.nodeName, so the mock backend's UUIDs differ from node to node."""
    (node_name,) = [e for e in plugin_container(rendered[overlay])["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_nvml_overlay_targets_gpu_nodes_with_the_driver_root_read_only(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """NVML: GPU-node affinity, backend nvml, the driver root read-only where NVIDIA_DRIVER_ROOT says."""
    objects = rendered["nvml"]
    terms = pod_spec(the(objects, "DaemonSet"))["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    keys = {e["key"] for term in terms for e in term["matchExpressions"]}
    assert keys == {"feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.present"}
    variables = env(objects)
    assert variables["GPUPLUGIN_BACKEND"] == "nvml"
    assert variables["NVIDIA_VISIBLE_DEVICES"] == "all" and variables["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    driver_root = mounts(objects)[variables["NVIDIA_DRIVER_ROOT"]]
    assert driver_root["readOnly"] is True and driver_root["mountPropagation"] == "HostToContainer"
    assert volumes(objects)[driver_root["name"]]["hostPath"]["path"] == "/"
    assert plugin_container(objects)["image"] == "gpuplugin:0.1.0"


def test_mock_overlay_runs_anywhere_with_its_control_socket_on_the_host(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Mock: no node affinity, backend mock, the state directory (control socket) a hostPath, the kind image."""
    objects = rendered["mock"]
    assert "affinity" not in pod_spec(the(objects, "DaemonSet"))
    assert env(objects) == {"GPUPLUGIN_BACKEND": "mock", "NODE_NAME": NODE_NAME}
    state = mounts(objects)[str(PluginSettings().state_dir)]
    assert volumes(objects)[state["name"]] == {
        "name": state["name"],
        "hostPath": {"path": "/run/gpuplugin", "type": "DirectoryOrCreate"},
    }
    assert plugin_container(objects)["image"] == f"{script_variables()['IMAGE']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_is_mounted_as_a_directory_and_is_a_valid_config(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """--config names a file in a ConfigMap directory mount (no subPath, so updates arrive), and it parses."""
    objects = rendered[overlay]
    config_path = Path(option(plugin_container(objects)["args"], "--config"))
    mount = mounts(objects)[str(config_path.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount
    config_map = the(objects, "ConfigMap")
    assert volumes(objects)[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    text = config_map["data"][config_path.name]
    data = parse_config(text, "config.yaml")
    assert data["version"] == "v1"
    settings = resolve(Overrides(backend=env(objects)["GPUPLUGIN_BACKEND"]), data, {}, "config.yaml")
    assert settings.log_format == "json"
    assert 79 in settings.health.fatal_xids and 13 in settings.health.ignored_xids


# ---------------------------------------------------------------------------------------------------------------
# The image.


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_on_slim_python_with_an_exec_form_entrypoint() -> None:
    """Two stages on python:3.12-slim; the final one copies the built environment, runs `gpuplugin serve`."""
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    stages = [a for i, a in instructions if i == "FROM"]
    assert len(stages) >= 2
    assert args["PYTHON_IMAGE"] == "python:3.12-slim"
    assert all(s.split()[0] == "${PYTHON_IMAGE}" for s in stages)
    final = instructions[max(n for n, (i, _) in enumerate(instructions) if i == "FROM") :]
    assert any(i == "COPY" and a.startswith("--from=build ") for i, a in final)
    entrypoint = [a for i, a in final if i == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    command = json.loads(entrypoint[0])  # exec form: a JSON array, no shell in between
    assert command[0].endswith("/gpuplugin") and command[1:] == ["serve"]
    environment = " ".join(a for i, a in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    assert [a for i, a in final if i == "USER"] == ["65532:65532"]
    assert not [a for i, a in final if i == "RUN"], "the final stage runs nothing: it only copies"


def test_dockerfile_installs_the_pinned_requirements_and_checks_them() -> None:
    """The build installs deploy/requirements.txt, then the project without dependencies, then `pip check`."""
    runs = " ".join(a for i, a in dockerfile_instructions() if i == "RUN")
    copies = [a for i, a in dockerfile_instructions() if i == "COPY"]
    assert any(a.startswith("deploy/requirements.txt ") for a in copies)
    assert "-r /tmp/requirements.txt" in runs and "--only-binary=:all:" in runs
    assert "install --no-deps" in runs and "pip check" in runs


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version), f"not pinned exactly: {line!r}"
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_requirements_pin_every_runtime_dependency_within_its_range() -> None:
    """Every line is name==version, and every dependency of pyproject.toml is pinned inside its range."""
    pins = requirement_pins()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        requirement = Requirement(dependency)
        name = normalize(requirement.name)
        assert name in pins, f"{name} is a dependency of the project but not pinned in deploy/requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {dependency}"
        for extra in requirement.extras:  # betterproto2[grpclib]
            assert extra in pins


def test_requirements_are_closed_under_their_own_dependencies() -> None:
    """For each pin the venv has at that version, its own requirements (on Python 3.12, Linux) are pinned too."""
    pins = requirement_pins()
    environment = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux"}
    checked = 0
    for name, version in pins.items():
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if distribution.version != version:
            continue
        checked += 1
        for text in distribution.requires or []:
            requirement = Requirement(text)
            extras = ["", "grpclib"] if name == "betterproto2" else [""]  # the extra the project asks for
            if requirement.marker and not any(requirement.marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            dependency = normalize(requirement.name)
            assert dependency in pins, f"{name} needs {requirement}, which deploy/requirements.txt lacks"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), f"{name} needs {requirement}"
    assert checked >= len(pins) // 2, "too few pins could be checked against installed metadata"


def test_dockerfile_copies_every_package_of_the_wheel() -> None:
    """The build stage copies each package pyproject.toml puts in the wheel (a missing one is silently left out)."""
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    sources = {*wheel["packages"], *wheel.get("force-include", {})}
    copied = {a.split()[0] for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from")}
    assert sources <= copied, f"not copied: {sources - copied}"


def test_the_cli_imports_with_the_pinned_requirements_only(workdir: Path) -> None:
    """With only deploy/requirements.txt's packages importable, as in the image, every command of the CLI loads."""
    # A site directory of links to the pinned distributions' files and the project's packages, nothing else.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for package in packages["packages"]:
        (workdir / package).symlink_to(ROOT / package)
    for name in [*requirement_pins(), "gpuplugin"]:
        distribution = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in distribution.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            if not (workdir / top).exists() and not top.endswith(".pth"):
                (workdir / top).symlink_to(Path(str(distribution.locate_file(top))))
    code = """
from click.testing import CliRunner
from gpuplugin.cli import main
for args in (["--help"], ["serve", "--help"], ["devices", "--help"], ["mock", "xid", "--help"]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
import gpuplugin.backends.mock, gpuplugin.backends.nvml, h11, prometheus_client
import gpuplugin.daemon.metrics, gpuplugin.daemon.probes
"""
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],  # -S: no site-packages, only PYTHONPATH
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    """.dockerignore excludes everything but the files the Dockerfile copies from the context."""
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for instruction, arguments in dockerfile_instructions()
        if instruction == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert copied <= allowed, f"copied but ignored: {copied - allowed}"


# ---------------------------------------------------------------------------------------------------------------
# The kind end-to-end script and workflow.


def test_e2e_script_is_valid_bash_that_stops_on_errors_and_cleans_up() -> None:
    """bash -n accepts it; it sets -euo pipefail, traps EXIT, and is executable; shellcheck passes if present."""
    text = E2E.read_text()
    assert subprocess.run(["bash", "-n", str(E2E)], capture_output=True, timeout=10).returncode == 0
    assert "set -euo pipefail" in text and re.search(r"^trap cleanup EXIT$", text, re.MULTILINE)
    assert "kind delete cluster" in text
    assert os.access(E2E, os.X_OK)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(E2E)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout


def test_e2e_script_uses_the_mock_overlay_the_pod_and_the_mounted_socket(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The script deploys overlays/mock, runs gpu-pod.yaml (2 GPUs), and talks to the socket where it is mounted."""
    text, variables = E2E.read_text(), script_variables()
    assert '"$root/deploy/overlays/mock"' in text and '"$here/gpu-pod.yaml"' in text
    assert '--config "$here/cluster.yaml"' in text and (DEPLOY / "kind" / "cluster.yaml").is_file()
    pod = yaml.safe_load((DEPLOY / "kind" / "gpu-pod.yaml").read_text())
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {GPU: 2}
    assert variables["RESOURCE"] == GPU
    assert Path(variables["MOCK_SOCKET"]).parent == PluginSettings().state_dir
    assert str(PluginSettings().state_dir) in mounts(rendered["mock"])
    assert "allocatable.${RESOURCE//./\\\\.}" in text, "allocatable is read with kubectl's jsonpath"


def test_kind_cluster_config_and_workflow_run_the_script() -> None:
    """The kind config is a v1alpha4 Cluster; the workflow runs e2e.sh on ubuntu-latest on push and PR."""
    cluster = yaml.safe_load((DEPLOY / "kind" / "cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind-e2e.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = job["steps"]
    assert any(s.get("uses", "").startswith("helm/kind-action@") for s in steps)
    assert any(s.get("run", "").strip() == "deploy/kind/e2e.sh" for s in steps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def script_accepts_pod_output(output: str) -> bool:
    """Run the e2e script's checks of the GPU pod's log (from ``visible=`` to the device-node check) on ``output``."""
    lines = E2E.read_text().splitlines()
    first = next(n for n, line in enumerate(lines) if line.startswith("visible=$("))
    last = next(n for n, line in enumerate(lines) if line.startswith("[[ $nodes == 2 ]]"))
    checks = "\n".join(lines[first : last + 1])
    script = f'set -euo pipefail\nfail() {{ echo "$*" >&2; exit 1; }}\noutput=$1\n{checks}\n'
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, "bash", output, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 10) == 0


async def wait_http_ok(port: int, path: str, timeout: float = 10) -> None:  # noqa: ASYNC109
    """Poll until ``path`` answers 200 (readiness follows registration by a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (status := await http_status(port, path)) != 200:
        assert asyncio.get_running_loop().time() < deadline, f"{path} answered {status} for {timeout} s"
        await asyncio.sleep(0.1)


async def run_cli(*args: str) -> str:
    """Run ``gpuplugin ARGS`` as the script's ``kubectl exec`` would, in a thread: its own ``asyncio.run`` needs one."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def allocatable_is(kubelet: KubeletSimulator, count: int) -> Callable[[], bool]:
    return lambda: kubelet.allocatable(GPU) == count


async def test_e2e_steps_against_the_kubelet_simulator(
    workdir: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """The mock overlay's args, env and config, served to the simulator, pass the e2e script's own steps."""
    objects = rendered["mock"]
    container = plugin_container(objects)
    variables = script_variables()
    gpus = int(variables["MOCK_GPUS"])
    # Each mount becomes a directory of the test; the config file comes from the rendered ConfigMap.
    host = {path: workdir / m["name"] for path, m in mounts(objects).items()}
    for directory in host.values():
        directory.mkdir()
    config_path = Path(option(container["args"], "--config"))
    (host[str(config_path.parent)] / config_path.name).write_text(the(objects, "ConfigMap")["data"]["config.yaml"])
    args = [host[str(config_path.parent)] / config_path.name if a == str(config_path) else a for a in container["args"]]
    port = free_port()
    args[args.index("--metrics-address") + 1] = f"127.0.0.1:{port}"
    kubelet_dir = host[str(PluginSettings().manager.server.kubelet_dir)]
    state_dir = host[str(PluginSettings().state_dir)]
    socket_path = state_dir / Path(variables["MOCK_SOCKET"]).name
    log_path = workdir / "serve.log"
    async with KubeletSimulator(kubelet_dir) as kubelet:
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpuplugin",
                "serve",
                *map(str, args),
                "--kubelet-dir",
                str(kubelet_dir),
                "--state-dir",
                str(state_dir),
                stdout=log_file,
                stderr=log_file,
                env={**os.environ, **env(objects), "PYTHONUNBUFFERED": "1"},
            )
        try:
            await kubelet.wait_for(allocatable_is(kubelet, gpus), timeout=20)
            assert await http_status(port, "/healthz") == 200
            await wait_http_ok(port, "/readyz")
            # The pod of gpu-pod.yaml: 2 GPU IDs in NVIDIA_VISIBLE_DEVICES, 2 /dev/nvidiaN device nodes.
            admission = await kubelet.admit("gpu-smoke", [{GPU: 2}])
            response = admission.containers[0].allocations[GPU].response
            assert len(response.envs["NVIDIA_VISIBLE_DEVICES"].split(",")) == 2
            # Seeded by the node the pod runs on (NODE_NAME from the downward API), not a fixed name.
            assert set(kubelet.devices(GPU)) == {gpu_uuid(NODE_NAME, i) for i in range(gpus)}
            assert all(re.fullmatch(r"/dev/nvidia\d+", d.container_path) for d in response.devices)
            assert len(response.devices) == 2
            # What busybox prints for that response, judged by the script's own lines.
            printed = [f"NVIDIA_VISIBLE_DEVICES={response.envs['NVIDIA_VISIBLE_DEVICES']}"]
            printed += sorted(d.container_path for d in response.devices)
            assert await script_accepts_pod_output("\n".join(printed))
            assert not await script_accepts_pod_output(printed[0] + "\n" + printed[1])
            await kubelet.remove_pod("gpu-smoke")
            # The script's own fault injection and recovery, word for word, on the mounted socket.
            (xid,) = script_commands("plugin_exec gpuplugin mock xid")
            (recover,) = script_commands("plugin_exec gpuplugin mock recover")
            for command, expected in ((xid, gpus - 1), (recover, gpus)):
                words = command[2:]
                words[words.index("--socket") + 1] = str(socket_path)
                await run_cli(*words)
                await kubelet.wait_for(allocatable_is(kubelet, expected), timeout=10)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0, log_path.read_text()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    waits = re.findall(r"^wait_allocatable (.+)$", E2E.read_text(), re.MULTILINE)
    assert waits == ['"$MOCK_GPUS"', '"$((MOCK_GPUS - 1))"', '"$MOCK_GPUS"'], "the steps checked here changed"
