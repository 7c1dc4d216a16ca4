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

from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.apiserver import ApiClaimSource, SlicePublisher
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.testing.dra import DraKubelet
from tests import controlplane
from tests.controlplane import ADMIN_TOKEN, ControlPlane, available, control_plane

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
    await admin.create(cast(Node, from_dict({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})))
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
    plane: ControlPlane, directory: Path
) -> AsyncIterator[tuple[AsyncClient, DraDriver, DraKubelet]]:
    """deploy/dra applied, a Node, and the driver on two mock GPUs with the service account's token."""
    admin = client_for(plane, ADMIN_TOKEN)
    driver_client: AsyncClient | None = None
    try:
        await apply_all(admin, DRA / "rbac.yaml", "kube-system")
        await apply_all(admin, DRA / "deviceclass.yaml", "")
        await apply_all(admin, DRA / "claim-template.yaml", "default")
        await admin.create(cast(ServiceAccount, from_dict(_service_account("default"))))
        await ready_node(admin)
        driver_client = client_for(plane, await driver_token(admin))
        settings = DriverSettings(
            node_name=NODE,
            plugins_dir=directory / "plugins",
            plugins_registry_dir=directory / "plugins_registry",
            cdi_dir=directory / "cdi",
        )
        backend = create_mock(
            BackendContext(
                options={"control_socket": str(directory / "mock.sock"), "gpus": 2},
                health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
                state_dir=directory,
            )
        )
        publisher = SlicePublisher(settings, driver_client)
        driver = DraDriver(backend, settings, ApiClaimSource(driver_client), publisher)
        async with DraKubelet(settings.plugins_registry_dir) as kubelet:
            await driver.start()
            try:
                await kubelet.wait_registered(DRIVER)
                yield admin, driver, kubelet
            finally:
                await driver.aclose()
    finally:
        await admin.close()
        if driver_client is not None:
            await driver_client.close()


def _service_account(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": namespace}}


async def published(admin: AsyncClient) -> list[str]:
    return [d.name for s in [s async for s in admin.list(ResourceSlice)] for d in (s.spec.devices or [])]


async def test_a_claim_is_allocated_by_the_scheduler_from_our_slices_and_prepared(
    plane: ControlPlane, workdir: Path
) -> None:
    """Slices published under the driver's own RBAC; the scheduler allocates the example template's claim (CEL on
    product name and memory) for a pod; the plugin prepares it from the real allocation; an XID on that GPU takes
    it out of the slice."""
    async with cluster_node(plane, workdir) as (admin, driver, kubelet):
        names = list(device_names(driver.tree))
        assert await eventually(lambda: _equal(published(admin), names))

        template = yaml.safe_load_all((DRA / "claim-template.yaml").read_text())
        spec = next(t for t in template if t["metadata"]["name"] == "one-large-gpu")["spec"]["spec"]
        claim_doc = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "train", "namespace": "default"},
            "spec": spec,
        }
        await admin.create(cast(ResourceClaim, from_dict(claim_doc)))
        pod_doc = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "train", "namespace": "default"},
            "spec": {
                "containers": [{"name": "cuda", "image": "none", "resources": {"claims": [{"name": "gpu"}]}}],
                "resourceClaims": [{"name": "gpu", "resourceClaimName": "train"}],
            },
        }
        await admin.create(cast(Pod, from_dict(pod_doc)))

        async def allocated() -> ResourceClaim | None:
            claim = await admin.get(ResourceClaim, "train", namespace="default")
            return claim if claim.status is not None and claim.status.allocation is not None else None

        claim = await eventually(allocated)
        (result,) = claim.status.allocation.devices.results
        assert (result.driver, result.pool, result.request) == (DRIVER, NODE, "gpu")
        assert result.device in names

        ref = ClaimRef("default", "train", claim.metadata.uid)
        response = await kubelet.prepare(DRIVER, [ref])
        entry = response.claims[ref.uid]
        assert entry.error == ""
        assert [d.device_name for d in entry.devices] == [result.device]
        cdi = json.loads(spec_path(driver.settings, ref.uid).read_text())
        gpu = device_names(driver.tree)[result.device]
        assert f"NVIDIA_VISIBLE_DEVICES={gpu.id}" in cdi["devices"][0]["containerEdits"]["env"]

        index = int(gpu.attributes["index"])
        driver.backend.xid(index, 79)  # type: ignore[attr-defined]
        rest = [n for n in names if n != result.device]
        assert await eventually(lambda: _equal(published(admin), rest))


async def _equal(found: Any, wanted: list[str]) -> bool:
    return bool(await found == wanted)


def test_without_the_cached_binaries_the_control_plane_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where the binaries are not cached, ``available`` names the directory, and the tests above skip with it."""
    monkeypatch.setattr(controlplane, "BIN", tmp_path / "absent")
    reason = controlplane.available()
    assert reason is not None
    assert str(tmp_path / "absent") in reason
