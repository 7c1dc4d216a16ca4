"""Fuzzing the DRA plugin's NodePrepareResources and NodeUnprepareResources over its real unix socket: any
request gets a per-claim answer or INVALID_ARGUMENT, never a failure inside the plugin.

As in test_fuzz_rpc.py, hypothesis runs in a worker thread and sends each example's RPC to the test's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.dra.claims import ClaimRef
from gpuplugin.dra.service import MAX_CLAIMS_PER_REQUEST
from gpuplugin.kubelet.api.k8s.io.kubelet.pkg.apis.dra import v1
from gpuplugin.kubelet.codec import PrecodedCodec
from tests.fakes import short_tmp_dir
from tests.test_dra import DRIVER, DraNode, dra_node

T = TypeVar("T")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PREPARE = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"
UNPREPARE = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources"


@dataclass
class Target:
    """The plugin on two mock GPUs (the second unhealthy), a good claim per GPU, and the test's loop."""

    node: DraNode
    loop: asyncio.AbstractEventLoop
    good: ClaimRef
    on_unhealthy: ClaimRef
    channel: Channel

    def outcome(self, make: Callable[[], Awaitable[T]]) -> T | Status:
        """The call's result, or the status it failed with (which must come with a message)."""
        try:
            return asyncio.run_coroutine_threadsafe(_run(make), self.loop).result(timeout=10)
        except GRPCError as exc:
            status, message = exc.status, exc.message
        assert message, f"{status} without a message"
        return status

    async def raw(self, method: str, payload: bytes) -> Any:
        """Send ``payload`` as the request's bytes, as they are."""
        async with self.channel.request(method, Cardinality.UNARY_UNARY, bytes, v1.NodePrepareResourcesResponse) as s:
            await s.send_message(payload, end=True)
            response = await s.recv_message()
            await s.recv_trailing_metadata()
            return response


async def _run(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    with short_tmp_dir() as directory:
        async with dra_node(directory) as node:
            node.backend.xid(1, 79)
            await node.refresh()
            first, second = node.names()
            channel = Channel(path=str(node.settings.socket_path), codec=PrecodedCodec())
            try:
                yield Target(node, asyncio.get_running_loop(), node.claim(first), node.claim(second), channel)
            finally:
                channel.close()


def claims_of(target: Target) -> st.SearchStrategy[ClaimRef]:
    text = st.text(max_size=20)
    return st.one_of(
        st.just(target.good),
        st.just(target.on_unhealthy),
        st.builds(ClaimRef, text, text, text),
        st.builds(ClaimRef, st.just("default"), text, st.uuids().map(str)),
    )


async def test_prepare_and_unprepare_answer_every_claim(target: Target) -> None:
    """Every claim of any request gets an entry: the good one prepared, all others a non-empty error."""

    @FUZZ
    @given(claims=st.lists(claims_of(target), max_size=6), unprepare=st.booleans())
    def check(claims: list[ClaimRef], unprepare: bool) -> None:
        kubelet = target.node.kubelet
        call = kubelet.unprepare if unprepare else kubelet.prepare
        result = target.outcome(lambda: call(DRIVER, claims))
        assert not isinstance(result, Status), f"the request was refused whole: {result!r}"
        assert set(result.claims) == {c.uid for c in claims}
        if unprepare:
            return
        for claim in claims:
            entry = result.claims[claim.uid]
            if claim.uid == target.good.uid and claim == target.good:
                assert entry.error == "" and len(entry.devices) == 1
            elif claim.uid not in (target.good.uid, target.on_unhealthy.uid):
                assert entry.error, f"{claim} prepared"

    await asyncio.to_thread(check)


async def test_undecodable_requests_get_invalid_argument(target: Target) -> None:
    """Bytes that are no request get INVALID_ARGUMENT; bytes that happen to decode get a per-claim answer."""

    @FUZZ
    @given(payload=st.binary(max_size=200), method=st.sampled_from([PREPARE, UNPREPARE]))
    def check(payload: bytes, method: str) -> None:
        result = target.outcome(lambda: target.raw(method, payload))
        assert result == Status.INVALID_ARGUMENT or hasattr(result, "claims"), f"got {result!r}"

    await asyncio.to_thread(check)


async def test_too_many_claims_are_refused_whole(target: Target) -> None:
    """A request naming more claims than a pod can have is refused with INVALID_ARGUMENT naming the limit."""
    claims = [ClaimRef("default", f"c{i}", f"uid-{i}") for i in range(MAX_CLAIMS_PER_REQUEST + 1)]
    with pytest.raises(GRPCError) as refused:
        await target.node.prepare(*claims)
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert f"at most {MAX_CLAIMS_PER_REQUEST}" in (refused.value.message or "")


async def test_an_undecodable_health_watch_gets_invalid_argument(target: Target) -> None:
    """NodeWatchResources with bytes that end inside a varint is refused with INVALID_ARGUMENT, not a failure."""
    health = "/v1alpha1.DRAResourceHealth/NodeWatchResources"
    result = await asyncio.to_thread(target.outcome, lambda: target.raw(health, b"\x08"))
    assert result == Status.INVALID_ARGUMENT
