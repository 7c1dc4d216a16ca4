"""Fixtures shared by every test, and the checks that hold for all of them (no leaked asyncio tasks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import structlog

from gpuplugin.backends.mock import MockBackend
from gpuplugin.daemon.manager import Manager, TreeSink, TreeTransform
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import mock_manager, short_tmp_dir

MOCK_GPU = "nvidia.com/gpu"


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail any test that leaves an asyncio task running behind it."""
    before = set(asyncio.all_tasks())
    yield
    # Give tasks that are finishing a few loop turns to do so.
    for _ in range(5):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"leaked tasks: {[t.get_name() for t in leaked]}"


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Undo any logging set-up a test made (the CLI configures a level filter), so capture_logs sees everything."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes, and tmp_path can be longer."""
    with short_tmp_dir() as path:
        yield path


@dataclass
class MockNode:
    """The manager on two mock GPUs, registered with the kubelet simulator over real unix sockets."""

    kubelet: KubeletSimulator
    manager: Manager
    backend: MockBackend

    def gpus(self) -> list[str]:
        """The GPUs' device IDs as discovered, before time-slicing or a device-list strategy."""
        return [d.id for d in self.manager.discovered.devices]

    async def allocate(self, *ids: str, resource: str = MOCK_GPU) -> api.ContainerAllocateResponse:
        """Allocate ``ids`` for one container, straight to the plugin (no admission); its one response."""
        request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=list(ids))])
        (response,) = (await self.kubelet.stub(resource).allocate(request)).container_responses
        return response


class MockNodeFactory(Protocol):
    def __call__(
        self,
        transforms: Sequence[TreeTransform],
        sinks: Sequence[TreeSink] = (),
        *,
        resources: Sequence[str] = (MOCK_GPU,),
    ) -> AbstractAsyncContextManager[MockNode]: ...


@pytest.fixture
def mock_node(workdir: Path) -> MockNodeFactory:
    """Starts a MockNode in ``workdir`` serving through ``transforms`` and ``sinks``, once each of ``resources``
    is registered with devices allocatable; closes it after the block."""

    @asynccontextmanager
    async def start(
        transforms: Sequence[TreeTransform], sinks: Sequence[TreeSink] = (), *, resources: Sequence[str] = (MOCK_GPU,)
    ) -> AsyncIterator[MockNode]:
        async with KubeletSimulator(workdir) as kubelet:
            manager = mock_manager(workdir, {"gpus": 2}, transforms=transforms, sinks=sinks)
            await manager.start()
            try:
                for resource in resources:
                    await kubelet.wait_registered(resource, timeout=5)
                await kubelet.wait_for(lambda: all(kubelet.allocatable(r) > 0 for r in resources), timeout=5)
                assert isinstance(manager.backend, MockBackend)
                yield MockNode(kubelet, manager, manager.backend)
            finally:
                await manager.aclose()

    return start
