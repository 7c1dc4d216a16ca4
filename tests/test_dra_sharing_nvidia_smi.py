"""The NVML backend's time-slice capability through ``nvidia-smi compute-policy`` (tests/fake_nvidia_smi.py in its
place): the interval set and read back, the command's first line of error, its timeout, a missing program, and a
time-sliced DRA claim on the fake H200 node setting and restoring its GPU's interval.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpuplugin.backends.nvml import NvmlBackend, NvmlSettings
from gpuplugin.backends.nvml.fake import h200_node
from gpuplugin.backends.nvml.timeslice import ComputePolicy, parse_timeslice
from gpuplugin.core.backend import TimeSliceControl, TimeSliceFailed
from gpuplugin.devices.health import HealthPolicy
from gpuplugin.dra.names import device_names
from gpuplugin.dra.node import DraDriver
from gpuplugin.testing.dra import ClaimTable, DraKubelet
from tests.test_dra import DRIVER, NODE, served, settings_in
from tests.test_dra_sharing import opaque, time_sliced

FAKE_SMI = str(Path(__file__).with_name("fake_nvidia_smi.py"))
GPU = "GPU-11111111-2222-3333-4444-555555555555"


@pytest.fixture
def smi_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake's state file, naming one GPU at Default."""
    state = tmp_path / "smi.json"
    state.write_text(json.dumps({GPU: 0}))
    monkeypatch.setenv("FAKE_NVIDIA_SMI_STATE", str(state))
    return state


@pytest.mark.parametrize(
    ("listing", "interval"),
    [
        ("| GPU     Name           Value        |\n|   0   Timeslice       Default       |", 0),
        ("|   0  Timeslice         LONG            |", 3),
        ("GPU 0\n    Compute Policy\n        Time Slice : Medium\n", 2),
        ("timeslice=1", 1),
        ("| GPU  Policy Name  Value |\n|   0  Power  200 |", None),
        ("Timeslice: N/A", None),
        ("", None),
    ],
)
def test_the_listing_is_read_by_the_line_naming_the_time_slice(listing: str, interval: int | None) -> None:
    """The interval is the first name or number after the words time slice on their line; none there, none read."""
    assert parse_timeslice(listing) == interval


async def test_an_interval_set_is_read_back(smi_state: Path) -> None:
    """``--set-timeslice=2`` then ``-l``: Medium (2) read back, and the fake recorded it."""
    policy = ComputePolicy((FAKE_SMI,), 10.0)
    await policy.set_timeslice(GPU, 2)
    assert await policy.timeslice(GPU) == 2
    assert json.loads(smi_state.read_text()) == {GPU: 2}


async def test_a_failing_command_gives_its_first_line_of_error(smi_state: Path) -> None:
    """An unknown GPU: one line naming the GPU, the command, its exit status and the first line it wrote."""
    with pytest.raises(TimeSliceFailed) as failed:
        await ComputePolicy((FAKE_SMI,), 10.0).set_timeslice("GPU-0", 1)
    assert str(failed.value) == (
        f"GPU GPU-0: {FAKE_SMI} compute-policy -i GPU-0 --set-timeslice=1: exit status 6: No devices were found"
    )


async def test_a_command_that_does_not_answer_is_timed_out(smi_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command slower than the timeout fails with one line saying so (its process killed and reaped)."""
    monkeypatch.setenv("FAKE_NVIDIA_SMI_SLEEP", "30")
    with pytest.raises(TimeSliceFailed, match=r"-l: no answer in 0\.3 s$"):
        await ComputePolicy((FAKE_SMI,), 0.3).timeslice(GPU)


async def test_a_missing_program_is_named() -> None:
    """No such program: one line naming it."""
    with pytest.raises(TimeSliceFailed, match="cannot run it: No such file or directory"):
        await ComputePolicy(("/nonexistent/nvidia-smi",), 1.0).set_timeslice(GPU, 0)


@pytest.fixture
async def nvml_dra(workdir: Path, smi_state: Path) -> AsyncIterator[tuple[DraDriver, DraKubelet, ClaimTable]]:
    """The DRA driver on the fake H200 node's NVML backend, time slices through the fake nvidia-smi."""
    settings = settings_in(workdir)
    backend = NvmlBackend(NvmlSettings(driver_root="/nonexistent", nvidia_smi=FAKE_SMI), HealthPolicy(), h200_node(1))
    claims = ClaimTable()
    driver = DraDriver(backend, settings, claims)
    async with served(driver) as kubelet:
        yield driver, kubelet, claims


async def test_a_long_claim_on_the_nvml_backend_sets_and_restores_its_gpu(
    nvml_dra: tuple[DraDriver, DraKubelet, ClaimTable], smi_state: Path
) -> None:
    """The NVML backend is a TimeSliceControl: a Long claim sets its GPU to 3 through nvidia-smi, and its unprepare
    sets it back to 0; the backend records both."""
    driver, kubelet, claims = nvml_dra
    assert isinstance(driver.backend, TimeSliceControl)
    name, gpu = next(iter(device_names(driver.tree).items()))
    smi_state.write_text(json.dumps({gpu.id: 0}))
    claim = claims.allocate(DRIVER, NODE, {"gpu": [name]}, config=[opaque(time_sliced("Long"))])
    assert (await kubelet.prepare(DRIVER, [claim])).claims[claim.uid].error == ""
    assert json.loads(smi_state.read_text()) == {gpu.id: 3}
    assert (await kubelet.unprepare(DRIVER, [claim])).claims[claim.uid].error == ""
    assert json.loads(smi_state.read_text()) == {gpu.id: 0}
    assert isinstance(driver.backend, NvmlBackend) and driver.backend.timeslices == {gpu.id: 0}
