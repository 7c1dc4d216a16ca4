"""The DRA kubelet plugin end to end over real unix sockets: registered through ``plugins_registry`` by the DRA
kubelet simulator, claims of the mock backend's GPUs prepared and unprepared, a restart, an unhealthy GPU.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dra_prepare import measure
from gpuplugin.backends.mock import MockBackend
from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.model import DeviceTree
from gpuplugin.devices.mps import ControlDaemonSettings
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DriverSettings
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.dra.plugin import DraPlugin
from gpuplugin.dra.registration import DRA_PLUGIN_TYPE
from gpuplugin.testing.dra import ClaimTable, DraKubelet

DRIVER = "gpu.gpuplugin.dev"
NODE = "node-a"


@dataclass
class DraNode:
    """The mock backend, the plugin over its current tree, the simulated kubelet and the scheduler's claims."""

    settings: DriverSettings
    backend: MockBackend
    kubelet: DraKubelet
    claims: ClaimTable
    plugin: DraPlugin
    tree: DeviceTree
    mps: ControlDaemonSettings | None = None
    """How claims' MPS control daemons run (tests/fake_mps_control.py in the MPS tests)."""

    def names(self) -> list[str]:
        return list(device_names(self.tree))

    async def refresh(self) -> None:
        """Take the backend's tree now (what the daemon's health folding hands the plugin)."""
        self.tree = await self.backend.discover()
        await self.plugin.tree_changed()

    def claim(self, *devices: str, request: str = "gpu") -> ClaimRef:
        return self.claims.allocate(DRIVER, NODE, {request: devices})

    async def prepare(self, *claims: ClaimRef) -> Any:
        return await self.kubelet.prepare(DRIVER, claims)

    async def unprepare(self, *claims: ClaimRef) -> Any:
        return await self.kubelet.unprepare(DRIVER, claims)

    async def restart(self) -> None:
        await self.plugin.aclose()
        await self.kubelet.wait_gone(DRIVER)
        self.plugin = DraPlugin(self.settings, lambda: self.tree, self.claims, backend=self.backend, mps=self.mps)
        await self.plugin.start()
        await self.kubelet.wait_registered(DRIVER)


def settings_in(directory: Path) -> DriverSettings:
    return DriverSettings(
        node_name=NODE,
        driver_name=DRIVER,
        plugins_dir=directory / "plugins",
        plugins_registry_dir=directory / "plugins_registry",
        cdi_dir=directory / "cdi",
    )


@asynccontextmanager
async def served(driver: DraDriver) -> AsyncIterator[DraKubelet]:
    """``driver`` started and registered with a simulated kubelet of its settings; closed on leaving."""
    async with DraKubelet(driver.settings.plugins_registry_dir) as kubelet:
        await driver.start()
        try:
            await kubelet.wait_registered(driver.settings.driver_name)
            yield kubelet
        finally:
            await driver.aclose()


@asynccontextmanager
async def dra_node(directory: Path, gpus: int = 2, mps: ControlDaemonSettings | None = None) -> AsyncIterator[DraNode]:
    settings = settings_in(directory)
    backend = create_mock(
        BackendContext(options={"control_socket": str(directory / "mock.sock"), "gpus": gpus}, state_dir=directory)
    )
    await backend.start()
    claims = ClaimTable()
    try:
        async with DraKubelet(settings.plugins_registry_dir) as kubelet:
            node = DraNode(settings, backend, kubelet, claims, None, await backend.discover(), mps)  # type: ignore[arg-type]
            node.plugin = DraPlugin(settings, lambda: node.tree, claims, backend=backend, mps=mps)
            await node.plugin.start()
            try:
                await kubelet.wait_registered(DRIVER)
                yield node
            finally:
                await node.plugin.aclose()
    finally:
        await backend.aclose()


def cdi_spec(node: DraNode, claim: ClaimRef) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(spec_path(node.settings, claim.uid).read_text())
    return result


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    (device,) = spec["devices"]
    return dict(item.split("=", 1) for item in device["containerEdits"].get("env", []))


async def test_registration_names_the_dra_type_driver_socket_and_v1_first(workdir: Path) -> None:
    """The plugin watcher registers it as a DRAPlugin of the driver, at its DRA socket, with the v1 service."""
    async with dra_node(workdir) as node:
        plugin = node.kubelet.plugins[DRIVER]
        assert plugin.service == "v1.DRAPlugin"
        assert plugin.endpoint == str(node.settings.socket_path)
        assert node.plugin.registration.registered.is_set()
        assert DRA_PLUGIN_TYPE == "DRAPlugin"
        assert plugin.services == ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth")
        assert node.kubelet.rejections == []


async def test_a_claim_for_one_gpu_gets_its_cdi_device_and_spec(workdir: Path) -> None:
    """One GPU prepared: the kubelet is given the device and the claim's CDI device, whose spec shows that GPU."""
    async with dra_node(workdir) as node:
        first = node.names()[0]
        claim = node.claim(first)
        response = await node.prepare(claim)
        entry = response.claims[claim.uid]
        assert entry.error == ""
        (device,) = entry.devices
        assert (device.pool_name, device.device_name, device.request_names) == (NODE, first, ["gpu"])
        assert device.cdi_device_ids == [f"k8s.gpu.gpuplugin.dev/claim={claim.uid}-gpu"]
        spec = cdi_spec(node, claim)
        assert spec["kind"] == "k8s.gpu.gpuplugin.dev/claim"
        assert spec["devices"][0]["name"] == f"{claim.uid}-gpu"
        assert env_of(spec)["NVIDIA_VISIBLE_DEVICES"] == node.tree.devices[0].id
        nodes = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
        assert nodes == ["/dev/nvidia0"]


async def test_a_claim_for_two_gpus_sees_both_in_one_cdi_device(workdir: Path) -> None:
    """Two GPUs of one claim: two devices in the answer, one CDI device listing both GPUs and both nodes."""
    async with dra_node(workdir) as node:
        claim = node.claim(*node.names())
        entry = (await node.prepare(claim)).claims[claim.uid]
        assert entry.error == ""
        assert [d.device_name for d in entry.devices] == node.names()
        spec = cdi_spec(node, claim)
        assert env_of(spec)["NVIDIA_VISIBLE_DEVICES"] == ",".join(d.id for d in node.tree.devices)
        nodes = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
        assert nodes == ["/dev/nvidia0", "/dev/nvidia1"]


async def test_each_request_of_a_claim_has_its_own_cdi_device(workdir: Path) -> None:
    """A claim of two requests: each device is given its request's CDI device, which holds that request's GPU only,
    so a container naming one request sees one GPU."""
    async with dra_node(workdir) as node:
        first, second = node.names()
        claim = node.claims.allocate(DRIVER, NODE, {"train": [first], "eval": [second]})
        entry = (await node.prepare(claim)).claims[claim.uid]
        kind = "k8s.gpu.gpuplugin.dev/claim"
        assert [(d.request_names, d.cdi_device_ids) for d in entry.devices] == [
            (["train"], [f"{kind}={claim.uid}-train"]),
            (["eval"], [f"{kind}={claim.uid}-eval"]),
        ]
        devices = {d["name"]: d["containerEdits"] for d in cdi_spec(node, claim)["devices"]}
        for request, gpu in (("train", node.tree.devices[0]), ("eval", node.tree.devices[1])):
            edits = devices[f"{claim.uid}-{request}"]
            assert edits["env"] == [f"NVIDIA_VISIBLE_DEVICES={gpu.id}"]
            assert [n["path"] for n in edits["deviceNodes"]] == [gpu.spec.device_nodes[0].container_path]


async def test_preparing_twice_answers_the_same_and_reads_the_claim_once(workdir: Path) -> None:
    """A second NodePrepareResources for a prepared claim answers the same devices without reading it again."""
    async with dra_node(workdir) as node:
        claim = node.claim(node.names()[1])
        first = await node.prepare(claim)
        second = await node.prepare(claim)
        assert first == second
        assert node.claims.reads == 1


async def test_unprepare_removes_the_claims_spec_and_is_idempotent(workdir: Path) -> None:
    """NodeUnprepareResources removes the claim's CDI spec and checkpoint entry; a second one succeeds too."""
    async with dra_node(workdir) as node:
        claim = node.claim(node.names()[0])
        await node.prepare(claim)
        assert spec_path(node.settings, claim.uid).exists()
        for _ in range(2):
            response = await node.unprepare(claim)
            assert response.claims[claim.uid].error == ""
        assert not spec_path(node.settings, claim.uid).exists()
        assert claim.uid not in node.plugin.checkpoint.claims


async def test_a_plugin_restart_keeps_prepared_claims(workdir: Path) -> None:
    """After a restart the checkpoint answers a prepared claim as before, and unprepare still finds it."""
    async with dra_node(workdir) as node:
        claim = node.claim(node.names()[0])
        before = await node.prepare(claim)
        await node.restart()
        assert claim.uid in node.plugin.checkpoint.claims
        node.claims.claims.clear()  # the claim is no longer readable: only the checkpoint can answer
        after = await node.prepare(claim)
        assert after == before
        assert (await node.unprepare(claim)).claims[claim.uid].error == ""
        assert not spec_path(node.settings, claim.uid).exists()


async def test_a_restart_writes_a_lost_spec_of_a_prepared_claim_again(workdir: Path) -> None:
    """A prepared claim whose spec vanished (a wiped /var/run/cdi) gets it written again on the next prepare."""
    async with dra_node(workdir) as node:
        claim = node.claim(node.names()[0])
        await node.prepare(claim)
        spec_path(node.settings, claim.uid).unlink()
        await node.restart()
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert env_of(cdi_spec(node, claim))["NVIDIA_VISIBLE_DEVICES"] == node.tree.devices[0].id


async def test_an_unhealthy_gpu_is_refused_and_the_other_claims_go_on(workdir: Path) -> None:
    """A claim on a GPU an XID made unhealthy gets a per-claim error and no spec; a claim on the other succeeds."""
    async with dra_node(workdir) as node:
        bad, good = node.names()
        node.backend.xid(0, 79)
        await node.refresh()
        refused, accepted = node.claim(bad), node.claim(good)
        response = await node.prepare(refused, accepted)
        assert response.claims[refused.uid].error == f"device {bad} is unhealthy"
        assert response.claims[accepted.uid].error == ""
        assert not spec_path(node.settings, refused.uid).exists()
        assert refused.uid not in node.plugin.checkpoint.claims


@pytest.mark.parametrize(
    ("devices", "pool", "error"),
    [
        (["gpu-nowhere"], NODE, "device gpu-nowhere is not on this node"),
        (["x"], "node-b", f"device x is in pool node-b, not {NODE}"),
    ],
)
async def test_devices_not_here_are_refused_per_claim(workdir: Path, devices: list[str], pool: str, error: str) -> None:
    """A device unknown on this node, or in another node's pool, fails that claim with a message naming it."""
    async with dra_node(workdir) as node:
        claim = node.claims.allocate(DRIVER, pool, {"gpu": devices})
        assert (await node.prepare(claim)).claims[claim.uid].error == error


async def test_a_request_name_no_cdi_device_can_carry_fails_the_claim(workdir: Path) -> None:
    """A request name that cannot become part of a CDI device name fails its claim with a message naming it."""
    async with dra_node(workdir) as node:
        claim = node.claims.allocate(DRIVER, NODE, {"a b": node.names()[:1]})
        assert (await node.prepare(claim)).claims[claim.uid].error == "request name 'a b' cannot name a CDI device"


async def test_a_checkpoint_that_cannot_be_written_fails_the_claim_and_leaves_no_spec(workdir: Path) -> None:
    """When the checkpoint cannot be rewritten the claim is not prepared, and the spec written for it is removed."""
    async with dra_node(workdir) as node:
        node.settings.checkpoint_path.mkdir()  # a directory where the file goes: the atomic rename fails
        claim = node.claim(node.names()[0])
        error = (await node.prepare(claim)).claims[claim.uid].error
        assert error.startswith("cannot write the checkpoint: ")
        assert not spec_path(node.settings, claim.uid).exists()
        node.settings.checkpoint_path.rmdir()


async def test_a_claim_the_api_server_does_not_know_fails_alone(workdir: Path) -> None:
    """A claim that cannot be read gets its error; the kubelet asks again later."""
    async with dra_node(workdir) as node:
        ghost = ClaimRef("default", "ghost", "0b0c5b6e-1111-4222-8333-944455556666")
        assert (await node.prepare(ghost)).claims[ghost.uid].error == "claim default/ghost not found"


async def test_a_restarted_kubelet_registers_the_plugin_again_and_finds_its_claims(workdir: Path) -> None:
    """A new kubelet (its plugin watcher starting over) registers the running plugin from its socket, and a claim
    prepared before answers the same."""
    async with dra_node(workdir) as node:
        claim = node.claim(node.names()[0])
        before = await node.prepare(claim)
        async with DraKubelet(node.settings.plugins_registry_dir) as restarted:
            await restarted.wait_registered(DRIVER)
            assert await restarted.prepare(DRIVER, [claim]) == before
        assert node.claims.reads == 1


def health_of(response: Any) -> dict[str, tuple[str, int]]:
    return {d.device.device_name: (d.device.pool_name, d.health) for d in response.devices}


async def test_the_health_stream_lists_every_device_and_follows_an_xid(workdir: Path) -> None:
    """NodeWatchResources sends every device Healthy, then the list again with the GPU an XID hit Unhealthy."""
    async with dra_node(workdir) as node, node.kubelet.health_stream(DRIVER) as stream:
        first, second = node.names()
        assert health_of(await stream.recv_message()) == {first: (NODE, 1), second: (NODE, 1)}
        node.backend.xid(0, 79)
        await node.refresh()
        assert health_of(await stream.recv_message()) == {first: (NODE, 2), second: (NODE, 1)}


async def test_the_prepare_benchmark_measures_every_call(workdir: Path) -> None:
    """``benchmarks.dra_prepare`` times one prepare and one unprepare per claim, each answered without error."""
    times = await measure(workdir, claims=3, gpus=2)
    assert {call: len(samples) for call, samples in times.items()} == {
        "NodePrepareResources": 3,
        "NodeUnprepareResources": 3,
    }
    assert not list((workdir / "cdi").glob("*.json")), "every claim's spec was removed"
