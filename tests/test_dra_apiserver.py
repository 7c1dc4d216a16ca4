"""The DRA driver against an API server: ResourceSlices published and kept in step with inventory and health, and
claims read for their allocation, over real HTTP to a fake API server on loopback (tests/fake_apiserver.py).

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.backends.mock import MockBackend
from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.partitioned import PartitionedBackend
from gpuplugin.backends.partitioned import create as create_partitioned
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.clock import VirtualClock
from gpuplugin.core.errors import ConfigError
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.apiserver import RECONCILE_INTERVAL_S, ApiClaimSource, SlicePublisher, api_client
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.kubelet.api import v1alpha1
from gpuplugin.kubelet.api.pluginregistration import RegistrationStatus
from gpuplugin.testing.dra import DraKubelet
from tests.fake_apiserver import FakeApiServer, fake_apiserver
from tests.test_dra import DRIVER, NODE, served, settings_in

TIMEOUT_S = 5.0


async def eventually(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while not predicate():  # noqa: ASYNC110 (the fake API server has no event to wait on)
            await asyncio.sleep(0.01)


@dataclass
class Cluster:
    api: FakeApiServer
    driver: DraDriver
    kubelet: DraKubelet
    clock: VirtualClock

    @property
    def backend(self) -> MockBackend:
        """The mock GPUs (under the partitioned backend, its parent)."""
        backend = self.driver.backend
        if isinstance(backend, PartitionedBackend):
            backend = backend.parent
        assert isinstance(backend, MockBackend)
        return backend

    def names(self) -> list[str]:
        return list(device_names(self.driver.discovered))

    def generations(self) -> set[int]:
        return {s["spec"]["pool"]["generation"] for s in self.api.slices.values()}


@asynccontextmanager
async def cluster(directory: Path, gpus: int = 2, **partitioned: Any) -> AsyncIterator[Cluster]:
    """The DRA driver on mock GPUs, publishing to the fake API server and reading claims from it, registered with
    the DRA kubelet simulator; with ``partitioned`` options, the partitioned backend over the mock."""
    settings = settings_in(directory)
    clock = VirtualClock()
    async with fake_apiserver() as api:
        api.add_node(NODE, "node-uid-1")
        client = api_client(api.url)
        mock = {"control_socket": str(directory / "mock.sock"), "gpus": gpus}
        context = BackendContext(
            options={**partitioned, "parent_options": mock} if partitioned else mock,
            health_policy=HealthPolicy(recovery_quiet_period_s=0.05),
            state_dir=directory,
        )
        backend = create_partitioned(context) if partitioned else create_mock(context)
        publisher = SlicePublisher(settings, client, clock=clock)
        driver = DraDriver(backend, settings, ApiClaimSource(client), publisher, clock=clock)
        try:
            async with served(driver) as kubelet:
                # The check the registration starts, done: the tests change the API server's slices after it.
                await eventually(lambda: publisher.checks >= 1)
                yield Cluster(api, driver, kubelet, clock)
        finally:
            await client.close()


async def test_the_nodes_gpus_are_published_as_one_slice_owned_by_the_node(workdir: Path) -> None:
    """At start the node's two GPUs are in one ResourceSlice of the node's pool, owned by the Node."""
    async with cluster(workdir) as c:
        assert c.api.devices() == c.names()
        (slice_,) = c.api.slices.values()
        assert slice_["metadata"]["ownerReferences"][0]["uid"] == "node-uid-1"
        assert slice_["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}


async def test_an_xid_takes_the_gpu_out_of_the_slice_and_recovery_brings_it_back(workdir: Path) -> None:
    """XID 79 on GPU 0: the slice loses it at a new generation; the GPU's recovery publishes it again."""
    async with cluster(workdir) as c:
        first, second = c.names()
        c.backend.xid(0, 79)
        await eventually(lambda: c.api.devices() == [second])
        assert c.generations() == {2}
        c.backend.recover(0)
        await eventually(lambda: c.api.devices() == [first, second])
        assert c.generations() == {3}


async def test_an_unplugged_gpu_leaves_the_slice(workdir: Path) -> None:
    """An inventory change (a GPU unplugged) is published like a health change."""
    async with cluster(workdir) as c:
        _, second = c.names()
        assert c.backend.unplug(0)
        await eventually(lambda: c.api.devices() == [second])


async def test_a_restart_continues_the_generation_and_deletes_stale_slices(workdir: Path) -> None:
    """A new publisher goes on from the highest generation on the server and deletes this node's extra slices;
    another node's slices stay."""
    async with cluster(workdir) as c:
        stale = {**c.api.slices[next(iter(c.api.slices))], "metadata": {"name": "leftover"}}
        other = {**stale, "metadata": {"name": "elsewhere"}, "spec": {**stale["spec"], "nodeName": "node-b"}}
        c.api.slices.update({"leftover": stale, "elsewhere": other})
        client = api_client(c.api.url)
        publisher = SlicePublisher(c.driver.settings, client)
        try:
            await publisher.publish(c.driver.tree)
        finally:
            await publisher.aclose()
            await client.close()
        assert sorted(c.api.slices) == ["elsewhere", f"{NODE}-{DRIVER}-0"]
        assert c.api.slices[f"{NODE}-{DRIVER}-0"]["spec"]["pool"]["generation"] == 2


async def test_slices_a_starting_kubelet_deleted_are_published_again_when_it_registers_the_plugin(
    workdir: Path,
) -> None:
    """A kubelet deletes its node's slices when it starts; the plugin's registration with the new kubelet publishes
    them again at once, at a new generation, with no device having changed."""
    async with cluster(workdir) as c:
        c.api.slices.clear()
        async with DraKubelet(c.driver.settings.plugins_registry_dir) as restarted:
            await restarted.wait_registered(DRIVER)
            await eventually(lambda: c.api.devices() == c.names())
            assert isinstance(c.driver.publisher, SlicePublisher)
            assert c.driver.publisher.checks == 2
        assert c.generations() == {2}


async def test_slices_a_starting_kubelet_deletes_seconds_after_registration_come_back_within_a_second(
    workdir: Path,
) -> None:
    """A starting kubelet deletes its node's slices once it has found its Node, which can be after the plugin
    registered again: the checks every second after a registration publish them again, long before the 30 s check."""
    async with cluster(workdir) as c:
        publisher = c.driver.publisher
        assert isinstance(publisher, SlicePublisher)
        for _ in range(3):
            await c.clock.advance(1.0)
        before = publisher.checks
        c.api.slices.clear()
        await c.clock.advance(1.0)
        await eventually(lambda: c.api.devices() == c.names())
        assert publisher.checks == before + 1
        assert c.generations() == {2}


async def test_slices_removed_behind_the_plugins_back_come_back_on_the_next_check(workdir: Path) -> None:
    """Slices deleted on the API server with no registration after are restored by the periodic check."""
    async with cluster(workdir) as c:
        c.api.slices.clear()
        async with asyncio.timeout(TIMEOUT_S):
            await c.clock.until_sleeping()
        await c.clock.advance(RECONCILE_INTERVAL_S)
        await eventually(lambda: c.api.devices() == c.names())
        assert c.generations() == {2}


async def test_an_unreachable_api_server_is_a_problem_retried_until_published(workdir: Path) -> None:
    """While the API server answers 503 the change is kept as ``problem`` and retried on the backoff; once it is
    back, the retry publishes and the problem clears."""
    async with cluster(workdir) as c:
        publisher = c.driver.publisher
        assert isinstance(publisher, SlicePublisher)
        c.api.down = True
        c.backend.xid(0, 79)
        await eventually(lambda: publisher.problem is not None)
        assert publisher.problem == "cannot publish ResourceSlices: 503 ServiceUnavailable: the fake API server is down"
        async with asyncio.timeout(TIMEOUT_S):
            await c.clock.until_sleeping()
        c.api.down = False
        await c.clock.advance_to_next()
        await eventually(lambda: publisher.problem is None)
        assert c.api.devices() == c.names()[1:]


async def test_claims_are_read_from_the_api_server(workdir: Path) -> None:
    """NodePrepareResources reads the claim's allocation from the API server; a claim it lacks fails alone."""
    async with cluster(workdir) as c:
        first = c.names()[0]
        c.api.add_claim("ns", "train", "uid-1", [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": first}])
        known, ghost = ClaimRef("ns", "train", "uid-1"), ClaimRef("ns", "ghost", "uid-2")
        response = await c.kubelet.prepare(DRIVER, [known, ghost])
        assert [d.device_name for d in response.claims["uid-1"].devices] == [first]
        assert response.claims["uid-2"].error == "claim ns/ghost not found"
        assert spec_path(c.driver.settings, "uid-1").exists()


async def test_the_kubelets_health_stream_follows_an_xid_and_its_recovery(workdir: Path) -> None:
    """Through the driver's health folding, NodeWatchResources reports the GPU an XID hit Unhealthy, then Healthy
    once it recovers."""
    async with cluster(workdir) as c, c.kubelet.health_stream(DRIVER) as stream:
        first = c.names()[0]

        async def health() -> v1alpha1.HealthStatus:
            response = await stream.recv_message()
            assert response is not None
            status: v1alpha1.HealthStatus = {d.device.device_name: d.health for d in response.devices}[first]
            return status

        assert await health() == v1alpha1.HealthStatus.HEALTHY
        c.backend.xid(0, 79)
        assert await health() == v1alpha1.HealthStatus.UNHEALTHY
        c.backend.recover(0)
        assert await health() == v1alpha1.HealthStatus.HEALTHY


async def test_an_xid_on_one_partition_takes_only_that_partition_out(workdir: Path) -> None:
    """With the partitioned backend, an XID naming one partition's instance removes that partition from the slice,
    its siblings and the other GPU's partitions stay; its recovery brings it back."""
    async with cluster(workdir, layout="all-1g.18gb") as c:
        names = c.names()
        assert len(names) == 14
        gpu0 = (await c.backend.discover()).devices[0].id
        (hit,) = [n for n, d in device_names(c.driver.discovered).items() if (d.gpu, d.instance) == (gpu0, (3, 0))]
        c.backend.xid(0, 79, instance=(3, 0))
        await eventually(lambda: c.api.devices() == [n for n in names if n != hit])
        c.backend.recover(0, instance=(3, 0))
        await eventually(lambda: c.api.devices() == names)


def test_no_way_to_an_api_server_is_one_line_naming_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Outside a cluster and without a kubeconfig, the client is refused with a ConfigError naming the flag."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^kube API server: .*set --kube-api-server or KUBECONFIG$"):
        api_client()


async def test_a_registration_reported_while_the_driver_closes_starts_no_check(workdir: Path) -> None:
    """A kubelet's registration report reaching a driver that is closing (its socket still served while its tasks
    end) is taken without error and starts no slice check."""
    async with cluster(workdir) as c:
        publisher = c.driver.publisher
        assert isinstance(publisher, SlicePublisher)
    checks = publisher.checks
    c.driver.plugin.registration._on_status(RegistrationStatus(plugin_registered=True))
    assert c.driver.plugin.registration.registered.is_set()
    await asyncio.sleep(0)
    assert publisher.checks == checks
