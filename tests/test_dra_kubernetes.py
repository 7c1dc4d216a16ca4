"""The DRA driver against a real Kubernetes control plane (tests/controlplane.py: etcd, kube-apiserver with RBAC,
kube-scheduler, from the cached upstream binaries), the kubelet played by the DRA kubelet simulator.

The API server validates the published ResourceSlices and deploy/dra/'s objects; the driver runs with the token
of deploy/dra/'s service account, so the ClusterRole is what authorizes it; the scheduler allocates a claim with
the example template's CEL selector from our slices; the plugin prepares what it allocated. Skipped where the
binaries are not cached (deploy/e2e/build-k8s.sh builds them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node, Pod, ServiceAccount
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice
from lightkube.types import PatchType

from gpuplugin.backends.registry import BackendContext, load_factory
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.apiserver import ApiClaimSource, SlicePublisher
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.dra.slices import SliceShape
from gpuplugin.testing.dra import DraKubelet
from tests import controlplane
from tests.controlplane import ADMIN_TOKEN, ControlPlane, available, control_plane
from tests.test_dra import served

DRA = Path(__file__).resolve().parent.parent / "deploy" / "dra"
NODE = "node-a"
DRIVER = "gpu.gpuplugin.dev"
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with control_plane() as started:
        yield started


def client_for(plane: ControlPlane, token: str) -> AsyncClient:
    return AsyncClient(config=KubeConfig.from_dict(plane.kubeconfig(token)), field_manager="test", trust_env=False)


async def apply_all(admin: AsyncClient, path: Path, namespace: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] != "Pod":
            if doc["kind"] == "ServiceAccount":
                doc["metadata"].setdefault("namespace", namespace)
            await admin.apply(from_dict(doc), field_manager="test")


async def ready_node(admin: AsyncClient) -> None:
    """A Node the scheduler places pods on: Ready, with room, no kubelet behind it (none is needed to schedule)."""
    node = cast(Node, from_dict({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
    await admin.apply(node, field_manager="test")
    room = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    now = "2026-01-01T00:00:00Z"
    ready = {"type": "Ready", "status": "True", "reason": "Test", "lastHeartbeatTime": now, "lastTransitionTime": now}
    status = {"status": {"conditions": [ready], "capacity": room, "allocatable": room}}
    await admin.patch(Node.Status, NODE, status, patch_type=PatchType.MERGE)
    # The API server taints a new Node not-ready until a kubelet reports; it is Ready now.
    await admin.patch(Node, NODE, {"spec": {"taints": []}}, patch_type=PatchType.MERGE)


async def driver_token(admin: AsyncClient) -> str:
    request = ServiceAccount.Token(metadata=ObjectMeta(), spec=TokenRequestSpec(audiences=[], expirationSeconds=3600))
    token = await admin.create(request, "gpuplugin-dra", namespace="kube-system")
    assert token.status is not None
    return str(token.status.token)


async def eventually(check: Any) -> Any:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            found = await check()
            if found:
                return found
            await asyncio.sleep(0.1)


@asynccontextmanager
async def cluster_node(
    plane: ControlPlane, directory: Path, backend: str = "mock", gpus: int = 2, **options: Any
) -> AsyncIterator[tuple[AsyncClient, DraDriver, DraKubelet]]:
    """deploy/dra applied, a Node, and the driver on a backend of mock GPUs with the service account's token."""
    admin = client_for(plane, ADMIN_TOKEN)
    driver_client: AsyncClient | None = None
    try:
        await apply_all(admin, DRA / "rbac.yaml", "kube-system")
        await apply_all(admin, DRA / "deviceclass.yaml", "")
        await apply_all(admin, DRA / "claim-template.yaml", "default")
        await admin.apply(cast(ServiceAccount, from_dict(_service_account("default"))), field_manager="test")
        await ready_node(admin)
        driver_client = client_for(plane, await driver_token(admin))
        settings = DriverSettings(
            node_name=NODE,
            plugins_dir=directory / "plugins",
            plugins_registry_dir=directory / "plugins_registry",
            cdi_dir=directory / "cdi",
        )
        mock = {"control_socket": str(directory / "mock.sock"), "gpus": gpus}
        context = BackendContext(
            options=mock if backend == "mock" else {**options, "parent_options": mock},
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=directory,
        )
        publisher = SlicePublisher(settings, driver_client)
        driver = DraDriver(load_factory(backend)(context), settings, ApiClaimSource(driver_client), publisher)
        async with served(driver) as kubelet:
            yield admin, driver, kubelet
    finally:
        await admin.close()
        if driver_client is not None:
            await driver_client.close()


def _service_account(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": namespace}}


async def published(admin: AsyncClient) -> list[str]:
    return [d.name for s in [s async for s in admin.list(ResourceSlice)] for d in (s.spec.devices or [])]


async def claim_and_pod(admin: AsyncClient, name: str, spec: dict[str, Any]) -> None:
    """A claim ``name`` with ``spec`` and a pod of the same name using it, in the default namespace."""
    claim_doc = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }
    await admin.create(cast(ResourceClaim, from_dict(claim_doc)))
    pod_doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "containers": [{"name": "cuda", "image": "none", "resources": {"claims": [{"name": "claim"}]}}],
            "resourceClaims": [{"name": "claim", "resourceClaimName": name}],
        },
    }
    await admin.create(cast(Pod, from_dict(pod_doc)))


async def schedule(admin: AsyncClient, name: str, template: str) -> dict[str, Any]:
    """A claim made from the example ``template`` and a pod using it; the claim (as JSON) once the scheduler
    allocated it."""
    templates = yaml.safe_load_all((DRA / "claim-template.yaml").read_text())
    spec = next(t for t in templates if t["metadata"]["name"] == template)["spec"]["spec"]
    await claim_and_pod(admin, name, spec)
    requests = [r["name"] for r in spec["devices"]["requests"]]

    async def allocated() -> dict[str, Any] | None:
        claim: dict[str, Any] = (await admin.get(ResourceClaim, name, namespace="default")).to_dict()
        return claim if claim.get("status", {}).get("allocation") else None

    claim: dict[str, Any] = await eventually(allocated)
    assert {r["request"] for r in results(claim)} == set(requests)
    return claim


def results(claim: dict[str, Any]) -> list[dict[str, str]]:
    found: list[dict[str, str]] = claim["status"]["allocation"]["devices"]["results"]
    return found


async def prepare(kubelet: DraKubelet, driver: DraDriver, claim: dict[str, Any]) -> tuple[list[str], list[str]]:
    """NodePrepareResources of an allocated claim: the devices the kubelet is given, and the CDI spec's env."""
    ref = ClaimRef("default", claim["metadata"]["name"], claim["metadata"]["uid"])
    entry = (await kubelet.prepare(DRIVER, [ref])).claims[ref.uid]
    assert entry.error == ""
    cdi = json.loads(spec_path(driver.settings, ref.uid).read_text())
    return [d.device_name for d in entry.devices], cdi["devices"][0]["containerEdits"]["env"]


async def test_a_claim_is_allocated_by_the_scheduler_from_our_slices_and_prepared(
    plane: ControlPlane, workdir: Path
) -> None:
    """Slices published under the driver's own RBAC; the scheduler allocates the example template's claim (CEL on
    product name and memory) for a pod; the plugin prepares it from the real allocation; an XID on that GPU takes
    it out of the slice, as the API server's DRADeviceTaints gate is off (it drops taints)."""
    async with cluster_node(plane, workdir) as (admin, driver, kubelet):
        names = list(device_names(driver.tree))
        assert await eventually(lambda: _equal(published(admin), names))
        claim = await schedule(admin, "train", "one-large-gpu")
        (result,) = results(claim)
        assert (result["driver"], result["pool"]) == (DRIVER, NODE)
        devices, env = await prepare(kubelet, driver, claim)
        assert devices == [result["device"]]
        gpu = device_names(driver.tree)[result["device"]]
        assert f"NVIDIA_VISIBLE_DEVICES={gpu.id}" in env

        driver.backend.xid(int(gpu.attributes["index"]), 79)  # type: ignore[attr-defined]
        rest = [n for n in names if n != result["device"]]
        assert await eventually(lambda: _equal(published(admin), rest))


async def test_a_claim_for_two_gpus_on_one_numa_node_gets_both_in_one_cdi_device(
    plane: ControlPlane, workdir: Path
) -> None:
    """Four GPUs on two NUMA nodes: the example pair claim (matchAttribute numaNode) gets two GPUs of one NUMA node
    from the scheduler, and the plugin's CDI spec shows both."""
    async with cluster_node(plane, workdir, gpus=4) as (admin, driver, kubelet):
        names = list(device_names(driver.tree))
        assert await eventually(lambda: _equal(published(admin), names))
        claim = await schedule(admin, "pair", "two-gpus-one-numa-node")
        chosen = [device_names(driver.tree)[r["device"]] for r in results(claim)]
        assert len(chosen) == 2
        assert len({gpu.numa_node for gpu in chosen}) == 1
        devices, env = await prepare(kubelet, driver, claim)
        assert devices == [r["device"] for r in results(claim)]
        assert f"NVIDIA_VISIBLE_DEVICES={','.join(gpu.id for gpu in chosen)}" in env


async def test_partitions_are_allocated_by_profile_and_prepared(plane: ControlPlane, workdir: Path) -> None:
    """With the partitioned backend, and the API server's DRAPartitionableDevices gate off (it drops shared
    counters), the slice holds the partitions alone, without their whole GPUs and without counters; the example
    partition claim (CEL on the profile) gets one 1g.18gb partition, prepared with that partition in the CDI
    spec."""
    async with cluster_node(plane, workdir, "partitioned", layout="all-1g.18gb") as (admin, driver, kubelet):
        names = [name for name, device in device_names(driver.tree).items() if device.instance is not None]
        assert len(names) == 14
        assert await eventually(lambda: _equal(published(admin), names))
        assert isinstance(driver.publisher, SlicePublisher)
        assert driver.publisher.shape == SliceShape(counters=False, taints=False)
        assert not any([s.spec.sharedCounters async for s in admin.list(ResourceSlice)])
        claim = await schedule(admin, "small", "one-small-partition")
        (result,) = results(claim)
        partition = device_names(driver.tree)[result["device"]]
        assert partition.attributes["profile"] == "1g.18gb"
        devices, env = await prepare(kubelet, driver, claim)
        assert devices == [result["device"]]
        assert f"NVIDIA_VISIBLE_DEVICES={partition.id}" in env


async def _equal(found: Any, wanted: list[str]) -> bool:
    return bool(await found == wanted)


def test_the_dra_kustomization_and_example_claims_pass_the_real_api_server(plane: ControlPlane) -> None:
    """``kubectl kustomize deploy/dra`` and the example claim templates are accepted by a server-side dry run."""
    rendered = plane.kubectl("kustomize", str(DRA))
    assert rendered.returncode == 0, rendered.stderr
    applied = plane.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "daemonset.apps/gpuplugin created (server dry run)" in applied.stdout
    templates = "".join(
        yaml.safe_dump(doc, explicit_start=True)
        for doc in yaml.safe_load_all((DRA / "claim-template.yaml").read_text())
        if doc["kind"] == "ResourceClaimTemplate"
    )
    applied = plane.kubectl("apply", "--dry-run=server", "-f", "-", stdin=templates)
    assert applied.returncode == 0, applied.stderr


def test_without_the_cached_binaries_the_control_plane_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where the binaries are not cached, ``available`` names the directory, and the tests above skip with it."""
    monkeypatch.setattr(controlplane, "BIN", tmp_path / "absent")
    reason = controlplane.available()
    assert reason is not None
    assert str(tmp_path / "absent") in reason
