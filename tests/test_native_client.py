"""The Go load client (benchmarks/gokubelet) against the plugin over real unix sockets, through its Python wrapper.

The tests that run the binary are skipped where it is not built (CI without Go): benchmarks/gokubelet/build.sh.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from benchmarks.measure import Clock
from benchmarks.native_client import GOKUBELET_ENV, delimited, native_client, run_native
from gpuplugin.backends.mock import create as create_mock
from gpuplugin.backends.registry import BackendContext
from gpuplugin.daemon.manager import Manager, ManagerSettings
from gpuplugin.kubelet.api import v1beta1 as api
from gpuplugin.kubelet.server import ServerSettings
from gpuplugin.testing.simulator import KubeletSimulator

GPU = "nvidia.com/gpu"


@pytest.fixture
def gokubelet() -> Path:
    """The built gokubelet binary; the test is skipped where there is none."""
    binary = native_client()
    if binary is None:
        pytest.skip("gokubelet is not built (run benchmarks/gokubelet/build.sh; it needs Go from Debian's packages)")
    return binary


@dataclass
class Plugin:
    socket: Path
    ids: list[str]


@asynccontextmanager
async def running_plugin(directory: Path) -> AsyncIterator[Plugin]:
    """The plugin on the mock backend (8 GPUs), registered with the kubelet simulator in ``directory``."""
    async with KubeletSimulator(directory) as kubelet:
        backend = create_mock(
            BackendContext(options={"control_socket": str(directory / "mock.sock")}, state_dir=directory)
        )
        manager = Manager(backend, ManagerSettings(server=ServerSettings(kubelet_dir=directory)))
        await manager.start()
        try:
            await kubelet.wait_registered(GPU, timeout=5)
            await kubelet.wait_for(lambda: kubelet.allocatable(GPU) > 0, timeout=5)
            socket = manager.servers[GPU].socket_path
            assert socket is not None
            yield Plugin(socket, [d.id for d in manager.tree.devices if d.resource == GPU])
        finally:
            await manager.aclose()


def allocate_request(*containers: list[str]) -> bytes:
    request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=c) for c in containers])
    return bytes(request)


def test_delimited_prefixes_each_message_with_its_varint_length() -> None:
    """delimited() writes each message after its length as a varint, one byte below 128 and two from 128."""
    assert delimited([b"", b"ab", b"x" * 300]) == b"\x00" + b"\x02ab" + b"\xac\x02" + b"x" * 300


def test_native_client_is_none_without_a_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """native_client() is None when GPUPLUGIN_GOKUBELET names no file, and that file once it is executable."""
    binary = tmp_path / "gokubelet"
    monkeypatch.setenv(GOKUBELET_ENV, str(binary))
    assert native_client() is None
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert native_client() == binary


async def test_allocate_records_every_call_per_target(gokubelet: Path, workdir: Path) -> None:
    """Allocate on two targets records exactly ``calls`` samples each, no errors, on the run's clock."""
    clock = Clock()
    async with running_plugin(workdir) as plugin:
        requests = [allocate_request([plugin.ids[0]]), allocate_request(plugin.ids[2:4])]
        measures, versions = await run_native(
            gokubelet,
            "allocate",
            {"a": plugin.socket, "b": plugin.socket},
            clock,
            calls=60,
            callers=2,
            block_calls=25,
            warmup_calls=5,
            requests=requests,
        )
    assert set(measures) == {"a", "b"}
    for latencies in measures.values():
        assert latencies.count == 60 and len(latencies.samples) == 60
        assert not latencies.errors
        assert latencies.wall_s > 0
        assert all(0 <= started <= clock.now() and 0 < elapsed < 5 for started, elapsed in latencies.samples)
    assert versions["go"].startswith("go") and versions["grpc"]


async def test_preferred_records_every_call(gokubelet: Path, workdir: Path) -> None:
    """GetPreferredAllocation calls are recorded like Allocate's, without errors on valid requests."""
    async with running_plugin(workdir) as plugin:
        request = api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(available_deviceIDs=plugin.ids, allocation_size=2)
            ]
        )
        measures, _ = await run_native(
            gokubelet,
            "preferred",
            {"plugin": plugin.socket},
            Clock(),
            calls=20,
            block_calls=10,
            warmup_calls=2,
            requests=[bytes(request)],
        )
    assert measures["plugin"].count == 20 and not measures["plugin"].errors


async def test_unknown_device_is_recorded_as_invalid_argument(gokubelet: Path, workdir: Path) -> None:
    """Allocate of an unknown device ID counts every call as an INVALID_ARGUMENT error and records no sample."""
    async with running_plugin(workdir) as plugin:
        measures, _ = await run_native(
            gokubelet,
            "allocate",
            {"plugin": plugin.socket},
            Clock(),
            calls=10,
            block_calls=10,
            warmup_calls=0,
            requests=[allocate_request(["no-such-gpu"])],
        )
    latencies = measures["plugin"]
    assert latencies.count == 0
    assert sum(latencies.errors.values()) == 10
    assert all(message.startswith("INVALID_ARGUMENT: ") for message in latencies.errors)


async def test_admission_writes_the_checkpoint_with_the_allocated_devices(gokubelet: Path, workdir: Path) -> None:
    """Admissions are timed whole and leave the kubelet's checkpoint naming the last pod's allocated devices."""
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir()
    async with running_plugin(workdir) as plugin:
        measures, _ = await run_native(
            gokubelet,
            "admission",
            {"plugin": plugin.socket},
            Clock(),
            calls=6,
            block_calls=3,
            warmup_calls=1,
            devices=plugin.ids,
            sizes=[1, 2],
            checkpoint_dir=checkpoints,
            resource=GPU,
        )
    assert measures["plugin"].count == 6 and not measures["plugin"].errors
    # Only the checkpoint remains: every temporary file was renamed over it.
    assert [p.name for p in checkpoints.iterdir()] == ["kubelet_internal_checkpoint"]
    data = json.loads((checkpoints / "kubelet_internal_checkpoint").read_text())["Data"]
    (entry,) = data["PodDeviceEntries"]
    assert entry["ResourceName"] == GPU and entry["ContainerName"] == "container-0"
    # The last admission is number 5, of size sizes[5 % 2] = 2.
    ids = entry["DeviceIDs"]["-1"]
    assert len(ids) == 2 and set(ids) <= set(plugin.ids)
    assert data["RegisteredDevices"] == {GPU: plugin.ids}


async def test_unknown_mode_raises_with_the_binary_message(gokubelet: Path, workdir: Path) -> None:
    """run_native refuses an unknown mode; a bad argument reaching the binary raises RuntimeError with its stderr."""
    with pytest.raises(ValueError, match="mode"):
        await run_native(gokubelet, "bogus", {"x": workdir / "x.sock"}, Clock(), calls=1, block_calls=1, warmup_calls=0)
    with pytest.raises(RuntimeError, match=r"exited 2: .*--sizes"):
        await run_native(
            gokubelet,
            "admission",
            {"x": workdir / "x.sock"},
            Clock(),
            calls=1,
            block_calls=1,
            warmup_calls=0,
            devices=["GPU-0"],
            sizes=[0],
            checkpoint_dir=workdir,
        )


async def test_bad_arguments_exit_2_with_a_message(gokubelet: Path, workdir: Path) -> None:
    """The binary exits 2 with a message on stderr for bad arguments and for a socket that never answers."""
    requests = workdir / "requests.bin"
    requests.write_bytes(delimited([allocate_request(["GPU-0"])]))
    truncated = workdir / "truncated.bin"
    truncated.write_bytes(b"\x05ab")
    cases = {
        "no mode given": [],
        "NAME=SOCKET": ["allocate", "--target", "nosocket", "--requests", str(requests)],
        "needs --requests": ["allocate", "--target", f"x={workdir / 'x.sock'}"],
        "truncated length prefix": ["allocate", "--target", f"x={workdir / 'x.sock'}", "--requests", str(truncated)],
        "cannot reach target x": [
            "allocate",
            "--target",
            f"x={workdir / 'x.sock'}",
            "--requests",
            str(requests),
            "--dial-timeout",
            "200ms",
        ],
    }
    for expected, argv in cases.items():
        process = await asyncio.create_subprocess_exec(
            gokubelet, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 2, argv
        assert stdout == b""
        assert expected in stderr.decode(), (expected, stderr)


async def test_cancelling_run_native_kills_the_binary(gokubelet: Path, workdir: Path) -> None:
    """Cancelled while gokubelet waits for a socket, run_native kills it and waits: no process outlives the run."""
    run = asyncio.create_task(
        run_native(
            gokubelet,
            "allocate",
            {"x": workdir / "x.sock"},
            Clock(),
            calls=1,
            block_calls=1,
            warmup_calls=0,
            requests=[allocate_request(["GPU-0"])],
        )
    )
    async with asyncio.timeout(5):
        while not any(child.name() == gokubelet.name for child in psutil.Process().children()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert not any(child.name() == gokubelet.name for child in psutil.Process().children())
