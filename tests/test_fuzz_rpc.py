"""Fuzzing Allocate and GetPreferredAllocation over a real unix socket: any request gets a clean answer.

Hypothesis does not drive coroutines, so each test starts the plugin in its own event loop, runs a synchronous
``@given`` function in a worker thread, and that function sends every example's RPC to the loop with
``run_coroutine_threadsafe`` over one grpclib channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.core.model import Health
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import ServerSettings
from tests.fakes import GPU_RESOURCE, SHARED_RESOURCE, StaticBackend, gpu_tree, serve_kubelet, short_tmp_dir

T = TypeVar("T")

EXAMPLES = 100
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: The statuses a refused request may get; UNKNOWN or INTERNAL would mean the plugin failed inside.
REFUSALS = {Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION}
#: GPU-7 (and its replicas) is unhealthy from the start.
TREE = gpu_tree(8, replicas=2, unhealthy=(7,))


@dataclass
class Target:
    """A served resource, its devices as the test knows them, and a way to run coroutines on the plugin's loop."""

    resource: str
    stub: api.DevicePluginStub
    loop: asyncio.AbstractEventLoop
    gpu_of: dict[str, str]
    unhealthy: frozenset[str]

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run an RPC on the plugin's loop from the hypothesis thread; returns its result or raises its error."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def outcome(self, make: Callable[[], Awaitable[T]]) -> T | Status:
        """The RPC's result, or the status it failed with (which must come with a message)."""
        try:
            return self.call(make)
        except GRPCError as exc:
            status, message = exc.status, exc.message
        assert message, f"{status} without a message"
        return status


@pytest.fixture(params=[GPU_RESOURCE, SHARED_RESOURCE])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """Eight GPUs and their replicas served by a Manager; a grpclib client on the parametrized resource."""
    resource: str = request.param
    with short_tmp_dir() as directory:
        async with serve_kubelet(directory) as kubelet:
            manager = Manager(StaticBackend(TREE), ManagerSettings(server=ServerSettings(kubelet_dir=directory)))
            await manager.start()
            try:
                await kubelet.wait_for(2)
                channel = Channel(path=str(directory / kubelet.endpoint(resource)))
                try:
                    devices = TREE.of(resource)
                    yield Target(
                        resource=resource,
                        stub=api.DevicePluginStub(channel),
                        loop=asyncio.get_running_loop(),
                        gpu_of={d.id: d.gpu for d in devices},
                        unhealthy=frozenset(d.id for d in devices if d.health is Health.UNHEALTHY),
                    )
                    await still_serving(channel, resource)
                finally:
                    channel.close()
            finally:
                await manager.aclose()


async def still_serving(channel: Channel, resource: str) -> None:
    """After the fuzzing, the plugin answers every RPC as before and its ListAndWatch stream is intact."""
    stub = api.DevicePluginStub(channel)
    options = await stub.get_device_plugin_options(api.Empty())
    assert options.get_preferred_allocation_available
    first = TREE.of(resource)[0].id
    response = await stub.allocate(
        api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[first])])
    )
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == first.split("::")[0]
    async with asyncio.timeout(5):
        async for listed in stub.list_and_watch(api.Empty()):
            assert [d.id for d in listed.devices] == [d.id for d in TREE.of(resource)]
            break


def known_ids(resource: str) -> st.SearchStrategy[str]:
    return st.sampled_from([d.id for d in TREE.of(resource)])


def any_id(resource: str) -> st.SearchStrategy[str]:
    """Mostly the resource's IDs; also other resources' IDs, near misses, empty, long and unicode strings."""
    known = known_ids(resource)
    return st.one_of(
        known,
        known,
        known,
        st.sampled_from([d.id for d in TREE.devices]),
        known.map(lambda i: i.lower()),
        known.map(lambda i: i + " "),
        st.just(""),
        st.text(max_size=10),
        st.text(min_size=64, max_size=3000),
        st.text(alphabet=st.characters(min_codepoint=0x80, codec="utf-8"), min_size=1, max_size=80),
    )


def fuzz_in_thread(test: Callable[[], None]) -> Awaitable[None]:
    return asyncio.to_thread(test)


async def test_allocate_answers_any_request_cleanly(target: Target) -> None:
    """Allocate answers any request with OK or INVALID_ARGUMENT / FAILED_PRECONDITION as the request deserves."""
    id_lists = st.lists(any_id(target.resource), max_size=6)

    @FUZZ
    @given(containers=st.lists(id_lists, max_size=4))
    def check(containers: list[list[str]]) -> None:
        request = api.AllocateRequest(
            container_requests=[api.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
        )
        result = target.outcome(lambda: target.stub.allocate(request))
        problems = set()
        if not containers:
            problems.add(Status.INVALID_ARGUMENT)
        for ids in containers:
            if not ids or len(set(ids)) != len(ids) or not set(ids) <= target.gpu_of.keys():
                problems.add(Status.INVALID_ARGUMENT)
            elif not target.unhealthy.isdisjoint(ids):
                problems.add(Status.FAILED_PRECONDITION)
        if problems:
            assert result in problems, f"expected one of {problems}, got {result!r}"
            return
        assert isinstance(result, api.AllocateResponse), f"expected a response, got {result!r}"
        assert len(result.container_responses) == len(containers)
        for ids, response in zip(containers, result.container_responses, strict=True):
            visible = list(dict.fromkeys(target.gpu_of[i] for i in ids))
            assert response.envs["NVIDIA_VISIBLE_DEVICES"].split(",") == visible
            assert [c.name for c in response.cdi_devices] == [f"example.com/gpu={g}" for g in visible]

    await fuzz_in_thread(check)


@st.composite
def preferred_container(draw: st.DrawFn, resource: str) -> tuple[list[str], list[str], int]:
    """(available, must_include, allocation_size), mostly consistent with each other, sometimes not."""
    available = draw(st.lists(st.one_of(known_ids(resource), known_ids(resource), any_id(resource)), max_size=12))
    must_source = st.sampled_from(available) if available else any_id(resource)
    must_include = draw(st.lists(st.one_of(must_source, must_source, any_id(resource)), max_size=4))
    size = draw(
        st.one_of(
            st.integers(min_value=0, max_value=len(set(available)) + 1),
            st.integers(min_value=-(2**31), max_value=2**31 - 1),
            st.sampled_from([-(2**31), -1, 2**31 - 1]),
        )
    )
    return available, must_include, size


async def test_preferred_allocation_answers_any_request_cleanly(target: Target) -> None:
    """GetPreferredAllocation answers OK within the contract, or INVALID_ARGUMENT when no answer can satisfy it."""

    @FUZZ
    @given(containers=st.lists(preferred_container(target.resource), max_size=3))
    def check(containers: list[tuple[list[str], list[str], int]]) -> None:
        request = api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
                )
                for available, must, size in containers
            ]
        )
        result = target.outcome(lambda: target.stub.get_preferred_allocation(request))
        possible = bool(containers) and all(
            set(available) | set(must) <= target.gpu_of.keys()
            and set(must) <= set(available)
            and size >= 1
            and len(set(must)) <= size <= len(set(available))
            for available, must, size in containers
        )
        if not possible:
            assert result == Status.INVALID_ARGUMENT, f"expected INVALID_ARGUMENT, got {result!r}"
            return
        assert isinstance(result, api.PreferredAllocationResponse), f"expected a response, got {result!r}"
        assert len(result.container_responses) == len(containers)
        for (available, must, size), response in zip(containers, result.container_responses, strict=True):
            chosen = response.device_i_ds
            assert len(chosen) == size
            assert len(set(chosen)) == size
            assert set(chosen) <= set(available)
            assert set(must) <= set(chosen)

    await fuzz_in_thread(check)
