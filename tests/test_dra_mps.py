"""MPS through a claim (``sharing.strategy: MPS`` in our GpuConfig, NVIDIA's ``mpsConfig``): a control daemon per
claim on the claim's GPUs (tests/fake_mps_control.py in place of ``nvidia-cuda-mps-control``), its pipe directory
and the request's limits in the claim's CDI spec, the daemon quit on unprepare, kept across a plugin restart, and
bad configs failing their claim with one line naming the field.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gpuplugin.devices.mps import ControlDaemonSettings
from gpuplugin.dra.checkpoint import CheckpointCorrupt, PreparedClaim, decode, encode
from gpuplugin.dra.claims import AllocatedDevice, ClaimRef, OpaqueConfig
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.preparer import mps_key
from gpuplugin.dra.sharing import MpsShare, claim_sharing, quantity_mib
from tests.fake_mps_control import PID_FILE
from tests.fakes import until
from tests.test_dra import NODE, DraNode, cdi_spec, dra_node
from tests.test_dra_sharing import claim_example, envs, fake_daemons, gpu_config, opaque, shared_claim

MPS_EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "dra" / "mps-claim.yaml"


def mps(**config: Any) -> dict[str, Any]:
    return gpu_config({"strategy": "MPS", "mpsConfig": config})


def pipe_dir(node: DraNode, claim: ClaimRef) -> Path:
    return node.settings.state_dir / "mps" / mps_key(claim.uid) / "pipe"


def daemon_pid(node: DraNode, claim: ClaimRef) -> int | None:
    """The claim's fake daemon's PID while it runs (a zombie has exited), else None."""
    try:
        pid = int((pipe_dir(node, claim) / PID_FILE).read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return None if state in ("Z", "X") else pid


async def test_an_mps_claim_gets_its_daemon_and_its_limits_in_the_spec(workdir: Path) -> None:
    """An MPS claim on two GPUs (50 % of the SMs, 8Gi each, 4Gi on index 1): its own daemon runs on its pipe
    directory, and the CDI device carries the pipe directory, its mount and the limits by ordinal; unpreparing
    quits the daemon and removes its directories."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        config = mps(
            defaultActiveThreadPercentage=50,
            defaultPinnedDeviceMemoryLimit="8Gi",
            defaultPerDevicePinnedMemoryLimit={"1": "4096Mi"},
        )
        claim = shared_claim(node, opaque(config), devices={"gpu": node.names()})
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        pid = daemon_pid(node, claim)
        assert pid is not None
        pipe = str(pipe_dir(node, claim))
        env = envs(node, claim)["gpu"]
        assert {k: v for k, v in env.items() if k.startswith(("CUDA_MPS", "GPUPLUGIN"))} == {
            "CUDA_MPS_PIPE_DIRECTORY": pipe,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=8192M,1=4096M",
            "GPUPLUGIN_SHARING_STRATEGY": "MPS",
        }
        (device,) = cdi_spec(node, claim)["devices"]
        assert {"hostPath": pipe, "containerPath": pipe, "options": ["rw", "nosuid", "nodev", "bind"]} in device[
            "containerEdits"
        ]["mounts"]
        assert (await node.unprepare(claim)).claims[claim.uid].error == ""
        assert daemon_pid(node, claim) is None
        assert not (node.settings.state_dir / "mps" / mps_key(claim.uid)).exists()


async def test_mps_without_limits_gives_only_the_pipe_directory(workdir: Path) -> None:
    """``strategy: MPS`` alone: a daemon, and no thread or memory limit in the environment."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        claim = shared_claim(node, opaque(gpu_config({"strategy": "MPS"})))
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        env = envs(node, claim)["gpu"]
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe_dir(node, claim))
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env
        await node.unprepare(claim)
        assert daemon_pid(node, claim) is None


async def test_the_daemon_survives_a_plugin_restart_and_goes_with_its_claim(workdir: Path) -> None:
    """A plugin restart leaves the claim's daemon running (its pods use it); the unprepare after it quits it."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        claim = shared_claim(node, opaque(mps(defaultActiveThreadPercentage=25)))
        await node.prepare(claim)
        pid = daemon_pid(node, claim)
        await node.restart()
        assert daemon_pid(node, claim) == pid is not None
        assert node.plugin.checkpoint.claims[claim.uid].mps_gpus == (node.tree.devices[0].id,)
        assert (await node.unprepare(claim)).claims[claim.uid].error == ""
        assert daemon_pid(node, claim) is None


async def test_preparing_again_starts_a_daemon_that_died(workdir: Path) -> None:
    """The kubelet preparing a prepared claim again finds its daemon dead: it is started again, same spec."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        claim = shared_claim(node, opaque(mps()))
        await node.prepare(claim)
        before = cdi_spec(node, claim)
        pid = daemon_pid(node, claim)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        await until(lambda: daemon_pid(node, claim) != pid, timeout_s=5.0)
        assert (await node.prepare(claim)).claims[claim.uid].error == ""
        assert daemon_pid(node, claim) not in (None, pid)
        assert cdi_spec(node, claim) == before
        await node.unprepare(claim)


async def test_a_daemon_that_does_not_start_fails_the_claim_and_leaves_nothing(workdir: Path) -> None:
    """A control program that is not there: the claim fails with one line naming the GPU and the cause, and leaves
    no spec and no checkpoint entry."""
    settings = ControlDaemonSettings(command=("/nonexistent/nvidia-cuda-mps-control",), answer_timeout_s=2.0)
    async with dra_node(workdir, mps=settings) as node:
        claim = shared_claim(node, opaque(mps()))
        error = (await node.prepare(claim)).claims[claim.uid].error
        assert error.startswith(
            f"claim {claim.namespace}/{claim.name}: the MPS control daemon of GPUs {node.tree.devices[0].id} did "
            "not start: [Errno 2] No such file or directory"
        ), error
        assert "\n" not in error
        assert not spec_path(node.settings, claim.uid).exists()
        assert claim.uid not in node.plugin.checkpoint.claims


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (mps(defaultActiveThreadPercentage=0), "mpsConfig.defaultActiveThreadPercentage: must be an integer from 1"),
        (mps(defaultActiveThreadPercentage=101), "mpsConfig.defaultActiveThreadPercentage: must be an integer from 1"),
        (
            mps(defaultPinnedDeviceMemoryLimit="lots"),
            "mpsConfig.defaultPinnedDeviceMemoryLimit: not a quantity of bytes (like 8Gi or 512Mi), got 'lots'",
        ),
        (mps(defaultPinnedDeviceMemoryLimit="512Ki"), "mpsConfig.defaultPinnedDeviceMemoryLimit: at least 1Mi"),
        (mps(defaultPinnedDeviceMemoryLimit="2Ti"), "mpsConfig.defaultPinnedDeviceMemoryLimit: at most 1Ti"),
        (
            mps(defaultPerDevicePinnedMemoryLimit={"3": "1Gi"}),
            "mpsConfig.defaultPerDevicePinnedMemoryLimit.3: names no GPU of request gpu (a UUID, or an index below 1)",
        ),
        (mps(pinned="1Gi"), "mpsConfig.pinned: unknown setting"),
        (
            gpu_config({"strategy": "TimeSlicing", "mpsConfig": {}}),
            "sharing.mpsConfig: only with strategy MPS, not TimeSlicing",
        ),
    ],
)
async def test_a_bad_mps_config_fails_its_claim_with_one_line_naming_the_field(
    workdir: Path, config: dict[str, Any], error: str
) -> None:
    """A bad mpsConfig fails its claim with one line naming the field under the config's place; no daemon starts."""
    async with dra_node(workdir, mps=fake_daemons()) as node:
        claim = shared_claim(node, opaque(config))
        message = (await node.prepare(claim)).claims[claim.uid].error
        assert message.startswith(f"claim {claim.namespace}/{claim.name}: config[0].opaque.parameters."), message
        assert error in message and "\n" not in message
        assert not (node.settings.state_dir / "mps" / mps_key(claim.uid)).exists()


def test_quantities_read_as_kubernetes_writes_them() -> None:
    """Binary and decimal suffixes, exponents and plain byte counts, rounded down to MiB as NVIDIA's driver does."""
    cases: dict[int | str, int] = {
        "8Gi": 8192,
        "512Mi": 512,
        "1.5Gi": 1536,
        "1G": 953,
        "1e9": 953,
        "2097152": 2,
        3 << 20: 3,
    }
    assert {value: quantity_mib(value, "x") for value in cases} == cases


def test_the_checkpoint_keeps_a_claims_mps_share_and_daemon(tmp_path: Path) -> None:
    """An MPS claim's shares, its daemon's GPUs and the GPUs whose interval it set go through the checkpoint; a
    checkpoint with a share or GPU list out of shape is corrupt."""
    share = MpsShare(30, {"GPU-1": 1024})
    prepared = PreparedClaim(
        ClaimRef("ns", "c", "u-1"),
        (AllocatedDevice("gpu", NODE, "gpu-0"),),
        {},
        {"gpu": share},
        {"GPU-2": "Long"},
        ("GPU-1",),
    )
    content = encode({"u-1": prepared})
    read = decode(content, tmp_path)["u-1"]
    assert (read.mps, read.timeslice_gpus, read.mps_gpus) == ({"gpu": share}, {"GPU-2": "Long"}, ("GPU-1",))
    entry = json.loads(content)["claims"]["u-1"]
    assert entry["mps"] == {"gpu": {"activeThreadPercentage": 30, "pinnedMemoryMiB": {"GPU-1": 1024}}}
    for key, value in [
        ("mpsGpus", "GPU-1"),
        ("mps", {"gpu": {"activeThreadPercentage": 0, "pinnedMemoryMiB": {}}}),
        ("mps", {"gpu": {"activeThreadPercentage": None, "pinnedMemoryMiB": {"GPU-1": "1Gi"}}}),
        ("timeSliceGpus", {"GPU-2": "Forever"}),
    ]:
        broken = json.loads(content)
        broken["claims"]["u-1"][key] = value
        with pytest.raises(CheckpointCorrupt, match="unreadable checkpoint"):
            decode(json.dumps(broken).encode(), tmp_path)


def test_the_mps_claim_example_is_valid_and_decodes_to_mps_for_our_driver() -> None:
    """deploy/dra/mps-claim.yaml: objects the API accepts, a ResourceClaim whose config for our driver decodes to an
    MPS share of 50 % and 16 GiB on its one GPU, and a pod whose two containers name that claim."""
    _, config, pod = claim_example(MPS_EXAMPLE)
    opaque_config = OpaqueConfig(tuple(config["requests"]), config["opaque"]["parameters"])
    assert claim_sharing([opaque_config], {"gpu": ["GPU-1"]}).mps == {"gpu": MpsShare(50, {"GPU-1": 16384})}
    names = [c["name"] for container in pod["spec"]["containers"] for c in container["resources"]["claims"]]
    assert names == [pod["spec"]["resourceClaims"][0]["name"]] * 2
