"""The DRA driver on real GPUs through the NVML backend; skipped where NVML does not start.

Run on a GPU node with ``.venv/bin/pytest -q -m gpu tests/test_dra_gpu.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.dra.slices import build_slices
from gpuplugin.testing.dra import ClaimTable, DraKubelet
from tests.test_deploy import validate
from tests.test_dra import DRIVER, NODE, settings_in
from tests.test_nvml_gpu import real_nvml

__all__ = ["real_nvml"]  # the fixture, used by name
pytestmark = pytest.mark.gpu


@pytest.fixture
async def driver(real_nvml: Any, workdir: Path) -> AsyncIterator[tuple[DraDriver, DraKubelet, ClaimTable]]:
    settings = settings_in(workdir)
    backend = NvmlBackend(NvmlSettings(event_wait_timeout_ms=500), HealthPolicy(), real_nvml)
    claims = ClaimTable()
    started = DraDriver(backend, settings, claims)
    async with DraKubelet(settings.plugins_registry_dir) as kubelet:
        await started.start()
        try:
            await kubelet.wait_registered(DRIVER)
            yield started, kubelet, claims
        finally:
            await started.aclose()


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
