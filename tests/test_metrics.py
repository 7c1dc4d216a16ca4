"""Metrics over real HTTP: a manager on the mock backend, the kubelet simulator, and a scrape of ``/metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from grpclib import GRPCError
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gpuplugin import package_version
from gpuplugin.backends.mock import MockBackend
from gpuplugin.daemon.manager import Manager
from gpuplugin.daemon.metrics import RPC_BUCKETS_S, Metrics
from gpuplugin.daemon.probes import ListenAddress, ProbeServer, ProbeSettings
from gpuplugin.devices.health import MAX_XID
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import mock_manager, until

GPU = "nvidia.com/gpu"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Plant:
    """A manager with metrics and probes served over HTTP, and a client for them."""

    manager: Manager
    backend: MockBackend
    metrics: Metrics
    probes: ProbeServer
    http: aiohttp.ClientSession
    directory: Path

    async def get(self, path: str, **headers: str) -> tuple[int, str, str]:
        """Status, body and content type of a GET on the probe server."""
        async with self.http.get(f"http://127.0.0.1:{self.probes.port}{path}", headers=headers) as response:
            return response.status, await response.text(), response.headers.get("Content-Type", "")

    async def scrape(self) -> Samples:
        status, text, _ = await self.get("/metrics")
        assert status == 200
        return parse(text)


def parse(exposition: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def make_manager(directory: Path, metrics: Metrics) -> Manager:
    manager = mock_manager(directory, server_factory=metrics.server_factory)
    metrics.attach(manager)
    return manager


@asynccontextmanager
async def plant(directory: Path, settings: ProbeSettings | None = None) -> AsyncIterator[Plant]:
    """Probes first, as ``serve`` would start them; the manager is started but no kubelet runs yet."""
    metrics = Metrics()
    manager = make_manager(directory, metrics)
    probes = ProbeServer(manager, metrics, settings or ProbeSettings(address=ListenAddress("127.0.0.1", 0)))
    await probes.start()
    try:
        async with aiohttp.ClientSession() as http:
            await manager.start()
            try:
                assert isinstance(manager.backend, MockBackend)
                yield Plant(manager, manager.backend, metrics, probes, http, directory)
            finally:
                await manager.aclose()
    finally:
        await probes.aclose()


@asynccontextmanager
async def node(directory: Path) -> AsyncIterator[tuple[Plant, KubeletSimulator]]:
    """A plant registered with a running kubelet simulator, all eight GPUs allocatable."""
    async with KubeletSimulator(directory) as kubelet, plant(directory) as p:
        await kubelet.wait_registered(GPU, timeout=5)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8 and kubelet.stream_open(GPU), timeout=5)
        yield p, kubelet


async def test_allocate_histogram_counts_admissions(workdir: Path) -> None:
    """Each admission through the kubelet adds one Allocate and one GetPreferredAllocation observation."""
    async with node(workdir) as (p, kubelet):
        before = await p.scrape()
        assert sample(before, "gpuplugin_rpc_duration_seconds_count", resource=GPU, method="Allocate") is None
        for pod in ("a", "b", "c"):
            await kubelet.admit(pod, [{GPU: 2}])
        after = await p.scrape()
        for method in ("Allocate", "GetPreferredAllocation"):
            assert sample(after, "gpuplugin_rpc_duration_seconds_count", resource=GPU, method=method) == 3
            assert sample(after, "gpuplugin_rpc_total", resource=GPU, method=method, code="OK") == 3
            inf = sample(after, "gpuplugin_rpc_duration_seconds_bucket", resource=GPU, method=method, le="+Inf")
            assert inf == 3
            total_s = sample(after, "gpuplugin_rpc_duration_seconds_sum", resource=GPU, method=method)
            assert total_s is not None and 0 < total_s < 3.0


def allocate_one(device_id: str) -> api.AllocateRequest:
    return api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[device_id])])


async def test_failed_rpcs_counted_by_their_grpc_status_code(workdir: Path) -> None:
    """Refused Allocates are timed and counted under their gRPC status code: an unknown device under
    INVALID_ARGUMENT, an unhealthy one under FAILED_PRECONDITION, apart from each other and from OK."""
    async with node(workdir) as (p, kubelet):
        with pytest.raises(GRPCError):
            await kubelet.stub(GPU).allocate(allocate_one("GPU-nope"))
        p.backend.xid(3, 79)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 7, timeout=2)
        with pytest.raises(GRPCError):
            await kubelet.stub(GPU).allocate(allocate_one(p.backend.status()[3].uuid))
        samples = await p.scrape()
        codes = {
            dict(labels)["code"]: value
            for (name, labels), value in samples.items()
            if name == "gpuplugin_rpc_total" and dict(labels)["method"] == "Allocate"
        }
        assert codes == {"OK": 0, "INVALID_ARGUMENT": 1, "FAILED_PRECONDITION": 1}
        assert sample(samples, "gpuplugin_rpc_duration_seconds_count", resource=GPU, method="Allocate") == 2


async def test_xid_moves_a_device_between_health_gauges(workdir: Path) -> None:
    """A fatal XID moves one device from Healthy to Unhealthy and is counted by XID, action and health change."""
    async with node(workdir) as (p, kubelet):
        before = await p.scrape()
        assert sample(before, "gpuplugin_devices", resource=GPU, health="Healthy") == 8
        assert sample(before, "gpuplugin_devices", resource=GPU, health="Unhealthy") == 0
        p.backend.xid(3, 79)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 7, timeout=2)
        after = await p.scrape()
        assert sample(after, "gpuplugin_devices", resource=GPU, health="Healthy") == 7
        assert sample(after, "gpuplugin_devices", resource=GPU, health="Unhealthy") == 1
        assert sample(after, "gpuplugin_xid_events_total", xid="79", action="fatal") == 1
        assert sample(after, "gpuplugin_health_changes_total", health="Unhealthy", xid="79") == 1


async def test_xid_label_is_bounded_to_the_xid_range(workdir: Path) -> None:
    """XIDs past the range (a driver's odd value, a typo) are counted under xid="other", never as new series."""
    async with node(workdir) as (p, kubelet):
        p.backend.xid(1, 99999999999)
        p.backend.xid(2, MAX_XID + 1)
        p.backend.xid(3, MAX_XID)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 5, timeout=2)
        samples = await p.scrape()
        xids = {dict(labels)["xid"] for (name, labels), _ in samples.items() if name == "gpuplugin_xid_events_total"}
        assert xids == {"other", str(MAX_XID)}
        assert sample(samples, "gpuplugin_xid_events_total", xid="other", action="recover") == 2
        assert sample(samples, "gpuplugin_health_changes_total", health="Unhealthy", xid="other") == 2


async def test_ignored_xid_counted_without_health_change(workdir: Path) -> None:
    """An application XID (13) is counted with action ignore while every device stays Healthy."""
    async with node(workdir) as (p, _):
        p.backend.xid(0, 13)
        samples = await p.scrape()
        assert sample(samples, "gpuplugin_xid_events_total", xid="13", action="ignore") == 1
        assert sample(samples, "gpuplugin_devices", resource=GPU, health="Healthy") == 8
        assert not [name for name, _ in samples if name == "gpuplugin_health_changes_total"]


async def test_lost_gpu_counted_as_backend_error(workdir: Path) -> None:
    """A backend's fault counters appear as backend errors, labelled with the backend's name."""
    async with node(workdir) as (p, kubelet):
        p.backend.lose(5)
        await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 7, timeout=2)
        samples = await p.scrape()
        assert sample(samples, "gpuplugin_backend_errors_total", backend="mock", kind="gpu-lost") == 1
        assert sample(samples, "gpuplugin_health_changes_total", health="Unhealthy", xid="") == 1


async def test_streams_and_registrations_follow_the_kubelet(workdir: Path) -> None:
    """The stream gauge, registration counter and ready gauge track a kubelet restart and re-registration."""
    async with node(workdir) as (p, kubelet):
        first = await p.scrape()
        assert sample(first, "gpuplugin_list_and_watch_streams", resource=GPU) == 1
        assert sample(first, "gpuplugin_registrations_total", resource=GPU) == 1
        assert sample(first, "gpuplugin_registered", resource=GPU) == 1
        assert sample(first, "gpuplugin_ready") == 1
        before = len(kubelet.registrations)
        await kubelet.restart()
        await kubelet.wait_registered(GPU, after=before, timeout=5)
        await kubelet.wait_for(lambda: kubelet.stream_open(GPU), timeout=2)
        again = await p.scrape()
        assert sample(again, "gpuplugin_registrations_total", resource=GPU) == 2
        assert sample(again, "gpuplugin_list_and_watch_streams", resource=GPU) == 1


async def test_stream_gauge_drops_when_the_kubelet_goes(workdir: Path) -> None:
    """With the kubelet gone the stream gauge reads 0 and the ready gauge 0."""
    async with node(workdir) as (p, kubelet):
        await kubelet.aclose()
        server = p.manager.servers[GPU]
        await until(lambda: server.open_streams == 0)
        samples = await p.scrape()
        assert sample(samples, "gpuplugin_list_and_watch_streams", resource=GPU) == 0
        assert sample(samples, "gpuplugin_ready") == 0


async def test_build_info_and_loop_lag_reported(workdir: Path) -> None:
    """Every scrape carries the build info with the package version (value 1) and the event loop's lag."""
    async with plant(workdir) as p:
        samples = await p.scrape()
        build = [(dict(labels), value) for (name, labels), value in samples.items() if name == "gpuplugin_build_info"]
        assert len(build) == 1 and build[0][0]["version"] == package_version() and build[0][1] == 1
        lag = sample(samples, "gpuplugin_event_loop_lag_seconds")
        assert lag is not None and 0 <= lag < 1


async def test_process_and_platform_metrics_reported(workdir: Path) -> None:
    """A scrape carries the process's CPU time, resident memory and open file descriptors, and python_info."""
    async with plant(workdir) as p:
        samples = await p.scrape()
        resident = sample(samples, "process_resident_memory_bytes")
        assert resident is not None and resident > 1024 * 1024
        fds = sample(samples, "process_open_fds")
        assert fds is not None and fds > 0
        assert sample(samples, "process_cpu_seconds_total") is not None
        assert [name for name, _ in samples if name == "python_info"] == ["python_info"]


def test_observe_rpc_bucket_bounds_are_inclusive() -> None:
    """An observation equal to a bucket's bound lands in it; one past the last bound only in +Inf."""
    metrics = Metrics()
    metrics.observe_rpc(GPU, "Allocate", RPC_BUCKETS_S[0], "OK")
    metrics.observe_rpc(GPU, "Allocate", 1.5, "OK")
    samples = parse(metrics.render()[0].decode())
    labels = {"resource": GPU, "method": "Allocate"}
    assert sample(samples, "gpuplugin_rpc_duration_seconds_bucket", le=str(RPC_BUCKETS_S[0]), **labels) == 1
    assert sample(samples, "gpuplugin_rpc_duration_seconds_bucket", le="1.0", **labels) == 1
    assert sample(samples, "gpuplugin_rpc_duration_seconds_bucket", le="+Inf", **labels) == 2
    assert sample(samples, "gpuplugin_rpc_duration_seconds_sum", **labels) == pytest.approx(1.5 + RPC_BUCKETS_S[0])


def test_each_metrics_has_its_own_registry() -> None:
    """Two Metrics never share series, and neither touches prometheus_client's global registry."""
    one, two = Metrics(), Metrics()
    one.observe_rpc(GPU, "Allocate", 0.001, "OK")
    assert b"gpuplugin_rpc_duration_seconds_count" in one.render()[0]
    assert b"gpuplugin_rpc_duration_seconds_count" not in two.render()[0]
    assert REGISTRY.get_sample_value("gpuplugin_rpc_duration_seconds_count") is None
