"""The DRA driver on real GPUs through the NVML backend; skipped where NVML does not start.

Run on a GPU node with ``.venv/bin/pytest -q -m gpu tests/test_dra_gpu.py``. The machine may be shared: the
time-slice tests only ever set the interval the GPU already has, and MPS runs in the claim's own daemon, quit at the
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.devices.mps import ControlDaemon
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.dra.preparer import mps_key
from gpuplugin.dra.sharing import API_VERSION, INTERVALS, KIND
from gpuplugin.dra.slices import build_slices
from gpuplugin.testing.dra import ClaimTable, DraKubelet
from tests.test_deploy import validate
from tests.test_dra import DRIVER, NODE, served, settings_in
from tests.test_nvml_gpu import real_nvml

__all__ = ["real_nvml"]  # the fixture, used by name
pytestmark = pytest.mark.gpu


@pytest.fixture
async def driver(real_nvml: Any, workdir: Path) -> AsyncIterator[tuple[DraDriver, DraKubelet, ClaimTable]]:
    settings = settings_in(workdir)
    # The device nodes in the specs too, as for runtimes without the NVIDIA hook: the claim spec names them.
    backend = NvmlBackend(NvmlSettings(event_wait_timeout_ms=500, pass_device_specs=True), HealthPolicy(), real_nvml)
    claims = ClaimTable()
    started = DraDriver(backend, settings, claims)
    async with served(started) as kubelet:
        yield started, kubelet, claims


async def test_real_gpus_become_a_valid_slice_with_their_attributes(
    driver: tuple[DraDriver, DraKubelet, ClaimTable],
) -> None:
    """Every real GPU is a device of the slice with its UUID, product name, index, minor, PCI bus ID, compute
    capability and memory, and the API's models accept the slice."""
    dra, _, _ = driver
    slices = build_slices(dra.tree, dra.settings, 1)
    for slice_ in slices:
        validate(slice_)
    devices = [d for s in slices for d in s["spec"]["devices"]]
    assert len(devices) == len(dra.tree.devices) > 0
    for device in devices:
        attributes = device["attributes"]
        assert attributes["uuid"]["string"].startswith("GPU-")
        assert attributes["productName"]["string"].startswith("NVIDIA")
        assert {"index", "minor", "pciBusID", "computeCapability", "driverVersion", "cudaVersion"} <= attributes.keys()
        assert device["capacity"]["memory"]["value"].endswith("Mi")
    print(json.dumps(slices[0], indent=1))  # shown with -s: the slice of this machine


async def test_a_real_gpu_is_prepared_and_unprepared(driver: tuple[DraDriver, DraKubelet, ClaimTable]) -> None:
    """A claim for the first GPU: its CDI spec names the GPU's UUID and device node; unprepare removes it."""
    dra, kubelet, claims = driver
    name, gpu = next(iter(device_names(dra.tree).items()))
    claim = claims.allocate(DRIVER, NODE, {"gpu": [name]})
    entry = (await kubelet.prepare(DRIVER, [claim])).claims[claim.uid]
    assert entry.error == ""
    edits = json.loads(spec_path(dra.settings, claim.uid).read_text())["devices"][0]["containerEdits"]
    assert f"NVIDIA_VISIBLE_DEVICES={gpu.id}" in edits["env"]
    assert f"/dev/nvidia{gpu.attributes['minor']}" in [n["path"] for n in edits["deviceNodes"]]
    assert (await kubelet.unprepare(DRIVER, [claim])).claims[claim.uid].error == ""
    assert not spec_path(dra.settings, claim.uid).exists()


def gpu_config(sharing: dict[str, Any]) -> list[dict[str, Any]]:
    """An allocation result's config list: our GpuConfig with ``sharing``, for every request."""
    parameters = {"apiVersion": API_VERSION, "kind": KIND, "sharing": sharing}
    return [{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": parameters}}]


async def test_the_time_slice_interval_the_gpu_has_is_set_and_read_back(
    driver: tuple[DraDriver, DraKubelet, ClaimTable],
) -> None:
    """``nvidia-smi compute-policy``: the first GPU's interval read, set to that same value, and read back unchanged;
    a claim time-sliced at that interval is prepared and unprepared with the GPU still at it (the GPU is never left
    at another interval: this machine may be shared)."""
    dra, kubelet, claims = driver
    backend = dra.backend
    assert isinstance(backend, NvmlBackend)
    name, gpu = next(iter(device_names(dra.tree).items()))
    uuid = gpu.attributes.get("uuid") or gpu.gpu
    before = await backend.timeslice(uuid)
    if before is None:
        pytest.skip("nvidia-smi compute-policy -l lists no time slice on this GPU")
    try:
        await backend.set_timeslice(uuid, before)
        assert await backend.timeslice(uuid) == before
        if before == 0:
            # Default changes nothing, prepared or unprepared; any other interval would be put back to Default
            # at unprepare, which is not ours to do on a GPU someone else set.
            claim = claims.allocate(DRIVER, NODE, {"gpu": [name]}, config=gpu_config({"strategy": "TimeSlicing"}))
            assert (await kubelet.prepare(DRIVER, [claim])).claims[claim.uid].error == ""
            assert await backend.timeslice(uuid) == before
            assert (await kubelet.unprepare(DRIVER, [claim])).claims[claim.uid].error == ""
        assert await backend.timeslice(uuid) == before
        print(f"GPU {uuid}: time slice {INTERVALS[before]} ({before}), set and read back")
    finally:
        if await backend.timeslice(uuid) != before:
            await backend.set_timeslice(uuid, before)


#: An MPS client: 1 GiB fits under its 2 GiB limit, 3 GiB in one allocation does not.
MPS_CLIENT = r"""
import torch
small = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
try:
    big = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print("allocated 3 GiB")
except torch.OutOfMemoryError:
    print("refused 3 GiB")
"""


async def test_an_mps_claim_runs_its_daemon_and_holds_a_client_to_its_limit(
    driver: tuple[DraDriver, DraKubelet, ClaimTable],
) -> None:
    """An MPS claim (2Gi pinned memory, 50 % of the SMs) on the first GPU: the real nvidia-cuda-mps-control answers
    on the claim's pipe directory, the spec carries the limits, a CUDA client with the spec's environment is refused
    3 GiB in one allocation (where the GPU alone has far more); unpreparing quits the daemon."""
    if shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("nvidia-cuda-mps-control is not installed")
    dra, kubelet, claims = driver
    name, gpu = next(iter(device_names(dra.tree).items()))
    uuid = gpu.attributes.get("uuid") or gpu.gpu
    mps = {"defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "2Gi"}
    claim = claims.allocate(DRIVER, NODE, {"gpu": [name]}, config=gpu_config({"strategy": "MPS", "mpsConfig": mps}))
    daemon = ControlDaemon(mps_key(claim.uid), dra.plugin.preparer.mps, lambda: None, [uuid])
    try:
        assert (await kubelet.prepare(DRIVER, [claim])).claims[claim.uid].error == ""
        assert await daemon.query("get_server_list") is not None
        (device,) = json.loads(spec_path(dra.settings, claim.uid).read_text())["devices"]
        env = dict(item.split("=", 1) for item in device["containerEdits"]["env"])
        pipe = str(dra.plugin.preparer.mps.pipe_dir(mps_key(claim.uid)))
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        assert (env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"], env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]) == ("50", "0=2048M")
        if importlib.util.find_spec("torch") is not None:
            mps_env = {k: v for k, v in env.items() if k.startswith("CUDA_MPS_")}
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                MPS_CLIENT,
                env={**os.environ, **mps_env, "CUDA_VISIBLE_DEVICES": uuid},
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(client.communicate(), 120)
            assert client.returncode == 0 and out.decode().strip() == "refused 3 GiB", out
            print(f"MPS client under {pipe}: {out.decode().strip()} with CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=2048M")
        assert (await kubelet.unprepare(DRIVER, [claim])).claims[claim.uid].error == ""
        assert await daemon.query("get_server_list") is None
    finally:
        with contextlib.suppress(Exception):
            await daemon.quit()
