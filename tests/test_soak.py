"""Soak: 100,000 Allocate calls through a grpclib stub to an in-process plugin; memory, descriptors, tasks stay flat.

The plugin (the manager, the mock backend, the kubelet simulator) runs in the test's process, where its memory is
measured; the calls come from a client in a subprocess, so that client and plugin each have a CPU of their own.
The client stops at every checkpoint until the test has measured, so nothing is in flight while it does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog
from grpclib.client import Channel, UnaryUnaryMethod

from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.core.backend import Backend
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.codec import PrecodedCodec
from gpuplugin.kubelet.server import ResourceServer, ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator

GPU = "nvidia.com/gpu"
TOTAL = 100_000
#: Memory is compared between this call and the last one: the first calls warm caches and allocator pools.
WARM = 10_000
CHECKPOINT = 10_000
#: Calls in flight at once: enough to pipeline on one connection, well under its 100 concurrent streams.
CONCURRENCY = 8
RSS_GROWTH_LIMIT_KIB = 5 * 1024
ROOT = Path(__file__).resolve().parent.parent


def rss_kib() -> int:
    """This process's resident set size, after a full collection."""
    gc.collect()
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# The client, run in a subprocess: ``python -c CLIENT socket total checkpoint concurrency id...``.

CLIENT = "import sys; from tests.test_soak import client_main; client_main(sys.argv[1:])"


def client_main(argv: list[str]) -> None:
    path, total, checkpoint, concurrency, *ids = argv
    asyncio.run(drive(path, ids, int(total), int(checkpoint), int(concurrency)))


class RawCodec(PrecodedCodec):
    """The client's codec: requests go out pre-encoded, responses come back as bytes, decoded only when checked.

    Decoding every AllocateResponse would cost the client more than the plugin spends answering it.
    """

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


async def drive(path: str, ids: list[str], total: int, checkpoint: int, concurrency: int) -> None:
    """Allocate one device per call, ``concurrency`` calls in flight on one channel; report and wait at checkpoints."""
    requests = [
        bytes(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[i])])) for i in ids
    ]
    channel = Channel(path=path, codec=RawCodec())
    # The method object the generated stub calls Allocate through.
    allocate: UnaryUnaryMethod[Any, Any] = UnaryUnaryMethod(
        channel, "/v1beta1.DevicePlugin/Allocate", api.AllocateRequest, api.AllocateResponse
    )

    async def worker(start: int, stop: int) -> None:
        for n in range(start, stop, concurrency):
            device_id = ids[n % len(ids)]
            response = await allocate(requests[n % len(requests)])
            if n % 1000 == 0:
                (container,) = api.AllocateResponse.parse(response).container_responses
                assert container.envs["NVIDIA_VISIBLE_DEVICES"] == device_id, container

    try:
        done = 0
        while done < total:
            end = min(done + checkpoint, total)
            await asyncio.gather(*(worker(done + w, end) for w in range(concurrency)))
            done = end
            print(done, flush=True)
            if done < total:
                # Nothing is in flight: the test measures, then says go on.
                sys.stdin.readline()
    finally:
        channel.close()


async def test_soak_100k_allocate_calls_keep_memory_fds_and_tasks_flat(workdir: Path) -> None:
    """100,000 Allocate calls: all answered OK, RSS grows < 5 MB from call 10,000 on, fds and tasks stay flat."""
    # By default h2 remembers the IDs of the last 65,536 closed streams of each connection: 12 MB of it would
    # arrive between call 10,000 and 65,536. The server bounds that record (CLOSED_STREAMS_REMEMBERED), so the
    # growth allowed here is the plugin's, grpclib's and h2's together.
    # RPCs log at debug; a test run's default structlog set-up would print every one of them.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    outcomes: Counter[tuple[str, str]] = Counter()

    def server(resource: str, backend: Backend, settings: ServerSettings) -> ResourceServer:
        return ResourceServer(
            resource, backend, settings, on_rpc=lambda _, method, __, outcome: outcomes.update([(method, outcome)])
        )

    backend = create_mock(BackendContext(options={"control_socket": str(workdir / "mock.sock")}, state_dir=workdir))
    manager = Manager(backend, ManagerSettings(server=ServerSettings(kubelet_dir=workdir)), server_factory=server)
    samples: dict[int, tuple[int, int, int]] = {}
    async with KubeletSimulator(workdir) as kubelet:
        await manager.start()
        try:
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) == 8 and kubelet.stream_open(GPU), timeout=5)
            socket = manager.servers[GPU].socket_path
            assert socket is not None
            ids = sorted(kubelet.devices(GPU))
            started, cpu_started = time.perf_counter(), cpu_s()
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                str(socket),
                str(TOTAL),
                str(CHECKPOINT),
                str(CONCURRENCY),
                *ids,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            assert client.stdin is not None and client.stdout is not None and client.stderr is not None
            try:
                async with asyncio.timeout(280):
                    while line := await client.stdout.readline():
                        samples[int(line)] = (rss_kib(), open_fds(), len(asyncio.all_tasks()))
                        if int(line) < TOTAL:
                            client.stdin.write(b"go\n")
                            await client.stdin.drain()
                    errors = await client.stderr.read()
                    returncode = await client.wait()
            finally:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
            elapsed, cpu = time.perf_counter() - started, cpu_s() - cpu_started
        finally:
            await manager.aclose()
    assert returncode == 0, errors.decode()
    assert outcomes[("Allocate", "OK")] == TOTAL
    assert [key for key in outcomes if key[1] != "OK"] == []
    trace = ", ".join(
        f"{n // 1000}k: {rss // 1024} MiB {fds} fds {tasks} tasks" for n, (rss, fds, tasks) in samples.items()
    )
    (rss_warm, fds_warm, tasks_warm), (rss_end, fds_end, tasks_end) = samples[WARM], samples[TOTAL]
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_KIB, f"RSS grew {rss_end - rss_warm} KiB: {trace}"
    assert fds_end - fds_warm <= 1, trace
    assert tasks_end == tasks_warm, trace
    client_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"soak: {TOTAL} Allocate calls in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s), CPU: plugin {cpu:.1f} s, "
        f"client and other children {client_cpu.ru_utime + client_cpu.ru_stime:.1f} s; {trace}"
    )
