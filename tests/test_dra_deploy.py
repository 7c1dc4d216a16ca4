"""deploy/dra/: the DeviceClasses, example claims and RBAC of DRA mode, checked without a cluster: every object
against the API's own models, the names and attributes against what the driver publishes, and the RBAC against
the requests the driver makes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gpuplugin.backends.mock.inventory import Inventory
from gpuplugin.backends.mock.settings import MockSettings
from gpuplugin.cli import serve
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.driver import DEFAULT_DRIVER_NAME
from gpuplugin.dra.slices import device_attributes, device_capacity
from tests.test_deploy import render, validate
from tests.test_dra import DRIVER, NODE
from tests.test_dra_apiserver import cluster, eventually
from tests.test_dra_slices import partition

DRA = Path(__file__).resolve().parent.parent / "deploy" / "dra"
#: The HTTP requests the driver makes, as the RBAC verbs that allow them.
VERB_OF = {"GET": "get", "PATCH": "patch", "DELETE": "delete"}


def objects(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DRA / name).read_text()) if doc]


def all_objects() -> list[dict[str, Any]]:
    """The objects of the files applied as they are (the DaemonSet patch is checked rendered)."""
    return [obj for name in ("rbac.yaml", "deviceclass.yaml", "claim-template.yaml") for obj in objects(name)]


def expressions() -> list[str]:
    text = yaml.safe_dump(all_objects())
    return re.findall(r"expression: (.+(?:\n\s+.+)*)", text)


def test_every_object_is_valid_for_the_api() -> None:
    """Each object of deploy/dra/ passes the API's models: no unknown field, no wrong type, nothing missing."""
    found = all_objects()
    assert {o["kind"] for o in found} >= {"DeviceClass", "ResourceClaimTemplate", "ClusterRole", "Pod"}
    for obj in found:
        validate(obj)


def test_the_kustomization_renders_valid_objects_of_dra_mode() -> None:
    """deploy/dra renders the mock overlay's DaemonSet in DRA mode under its service account, with the kubelet's
    plugins directory mounted and the base's probes on its metrics port (DRA mode serves them), beside the RBAC and
    DeviceClasses; every rendered object passes the API's models."""
    objects = render(DRA)
    for obj in objects:
        validate(obj)
    assert {o["kind"] for o in objects} >= {"DaemonSet", "ServiceAccount", "ClusterRole", "DeviceClass"}
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "gpuplugin-dra"
    assert spec["automountServiceAccountToken"] is True
    (container,) = spec["containers"]
    assert container["args"][-2:] == ["--kubelet-api", "dra"]
    context = serve.make_context("serve", list(container["args"]))
    assert context.params["kubelet_api"] == "dra"
    assert {e["name"] for e in container["env"]} >= {"NODE_NAME", "GPUPLUGIN_BACKEND"}
    assert context.params["metrics_address"] is not None
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi", "/run/gpuplugin"} <= mounts
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {"/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi"} <= host_paths


def test_cel_names_only_what_the_driver_publishes() -> None:
    """The driver name, attributes and capacities the CEL expressions and constraints use are the published ones."""
    gpu = Inventory.build(MockSettings(gpus=1, nvlink_groups=(), pcie_switches=())).devices[0]
    attributes = set(device_attributes(gpu)) | set(device_attributes(partition(gpu, 1)))
    capacity = set(device_capacity(gpu))
    text = "\n".join(expressions())
    assert set(re.findall(r'device\.driver == "([^"]+)"', text)) == {DEFAULT_DRIVER_NAME}
    used_attributes = set(re.findall(r'device\.attributes\["([^"]+)"\]\.(\w+)', text))
    used_capacity = set(re.findall(r'device\.capacity\["([^"]+)"\]\.(\w+)', text))
    assert used_attributes and used_capacity
    assert {domain for domain, _ in used_attributes | used_capacity} == {DEFAULT_DRIVER_NAME}
    assert {name for _, name in used_attributes} <= attributes
    assert {name for _, name in used_capacity} <= capacity
    constraints = [
        c["matchAttribute"]
        for o in all_objects()
        if o["kind"] == "ResourceClaimTemplate"
        for c in o["spec"]["spec"]["devices"].get("constraints", [])
    ]
    assert constraints and all(c.partition("/")[2] in attributes for c in constraints)


async def test_rbac_allows_what_the_driver_does_and_no_more(workdir: Path) -> None:
    """A start, a restart finding a stale slice and a prepared claim make exactly the requests the ClusterRole
    allows: each (group, resource, verb) used is granted, and each granted one is used."""
    async with cluster(workdir) as c:
        c.api.slices["stale"] = {**next(iter(c.api.slices.values())), "metadata": {"name": "stale"}}
        c.backend.xid(0, 79)
        await eventually(lambda: "stale" not in c.api.slices)
        c.api.add_claim("ns", "x", "u-1", [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gone"}])
        await c.kubelet.prepare(DRIVER, [ClaimRef("ns", "x", "u-1")])
        requests = list(c.api.requests)
    used = set()
    for request in requests:
        method, path = request.split(" ", 1)
        parts = path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        collection = len(parts) % 2 == (1 if parts[0] == "api" else 0)
        resource = parts[-1] if collection else parts[-2]
        verb = "list" if method == "GET" and collection else VERB_OF[method]
        used.add((group, resource, verb))
    # A server-side apply that creates the object is authorized as a create too.
    used.add(("resource.k8s.io", "resourceslices", "create"))
    (role,) = [o for o in objects("rbac.yaml") if o["kind"] == "ClusterRole"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used == granted
