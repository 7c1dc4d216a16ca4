"""``gpuplugin kubelet --kubelet-api dra``: the DRA kubelet simulator as a command, with ``serve --kubelet-api dra``
on the mock run against it in another process (the fake API server holding the slices and the claim), and its bad
input refused with one line.

``workdir`` (a short directory under /tmp) comes from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gpuplugin.backends.mock.control import control
from gpuplugin.cli import main
from gpuplugin.dra.claimspec import spec_path
from gpuplugin.dra.driver import DriverSettings
from tests.fake_apiserver import fake_apiserver
from tests.test_dra_apiserver import eventually
from tests.test_dra_cli import DRIVER, NODE, serving
from tests.test_dra_sharing import opaque, time_sliced
from tests.test_kubelet_command import DEADLINE_S, next_line_with
from tests.test_reliability import serve_env


def resource_claim(device: str, **config: Any) -> dict[str, Any]:
    """A ResourceClaim allocated one device of the node's pool, time-sliced at Long by its config."""
    results = [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "ns", "name": "try", "uid": "uid-try"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpuplugin.dev"}}]}},
        "status": {"allocation": {"devices": {"results": results, "config": [opaque(time_sliced("Long"))]}}},
        **config,
    }


async def test_the_dra_kubelet_command_registers_serve_follows_health_and_prepares_a_claim(workdir: Path) -> None:
    """``serve --kubelet-api dra`` on two mock GPUs against ``gpuplugin kubelet --kubelet-api dra --prepare``: the
    command prints the registration, a health update with both devices, the claim prepared with its CDI device (the
    GPU now time-sliced at Long on the mock); on SIGTERM it unprepares the claim (spec gone, GPU back at Default)."""
    settings = DriverSettings(node_name=NODE, plugins_dir=workdir / "plugins", cdi_dir=workdir / "cdi")
    async with fake_apiserver() as api, serving(workdir, api) as plugin:
        api.add_node(NODE, "uid-1")
        await eventually(lambda: len(api.devices()) == 2)
        claim = resource_claim(api.devices()[0])
        api.claims[("ns", "try")] = claim
        claim_file = workdir / "claim.yaml"
        claim_file.write_text(yaml.safe_dump(claim))
        kubelet = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gpuplugin", "kubelet", "--kubelet-api", "dra"),
            *("--dir", str(workdir / "registry"), "--prepare", str(claim_file)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=serve_env(),
        )
        seen: list[str] = []
        try:
            assert kubelet.stdout is not None
            registered = await next_line_with(kubelet.stdout, "registered DRA driver", seen)
            assert registered.endswith(
                f"registered DRA driver {DRIVER} endpoint={settings.socket_path} service=v1.DRAPlugin"
            )
            health = await next_line_with(kubelet.stdout, "resource health", seen)
            assert health.endswith(f"resource health {DRIVER}: 2 devices, 2 healthy, 0 not healthy")
            prepared = await next_line_with(kubelet.stdout, "prepare", seen)
            cdi = "k8s.gpu.gpuplugin.dev/claim=uid-try-gpu"
            assert prepared.endswith(f"prepared ns/try: gpu {api.devices()[0]} cdi {cdi}"), prepared
            assert spec_path(settings, "uid-try").exists()
            socket = workdir / "state" / "mock.sock"
            assert list((await control(socket, {"op": "timeslices"}))["timeslices"].values()) == [3, 0]
            kubelet.send_signal(signal.SIGTERM)
            assert (await next_line_with(kubelet.stdout, "unprepare", seen)).endswith("unprepared ns/try")
            await next_line_with(kubelet.stdout, "kubelet stopped", seen)
            assert await asyncio.wait_for(kubelet.wait(), DEADLINE_S) == 0
            assert not spec_path(settings, "uid-try").exists()
            assert list((await control(socket, {"op": "timeslices"}))["timeslices"].values()) == [0, 0]
            plugin.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(plugin.wait(), DEADLINE_S) == 0
        finally:
            if kubelet.returncode is None:
                kubelet.kill()
                await kubelet.wait()
        assert kubelet.stderr is not None
        assert await kubelet.stderr.read() == b"", "nothing failed inside the simulator"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[1, 2", "not YAML or JSON"),
        ("[]", "a ResourceClaim is a mapping, got list"),
        (json.dumps({"kind": "Pod"}), "kind: must be ResourceClaim, got 'Pod'"),
        (json.dumps({"metadata": {"name": "c"}}), "metadata.uid: missing"),
        (json.dumps({"metadata": {"name": "c", "uid": 7}}), "metadata.uid: must be a string, got 7"),
        (
            json.dumps({"metadata": {"name": "c", "uid": "u"}}),
            "status.allocation.devices.results: must name one driver (the claim allocated), found none",
        ),
    ],
)
def test_a_bad_claim_file_is_refused_in_one_line_naming_the_field(tmp_path: Path, document: str, message: str) -> None:
    """``--prepare`` a file that is no allocated ResourceClaim: exit 2, one line naming the flag and the field."""
    claim_file = tmp_path / "claim.yaml"
    claim_file.write_text(document)
    result = CliRunner().invoke(main, ["kubelet", "--kubelet-api", "dra", "--prepare", str(claim_file)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--prepare" in result.output and message in result.output, result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--kubelet-api", "dra", "--admit", "nvidia.com/gpu=1"], "--admit"),
        (["--prepare", "CLAIM"], "--prepare"),
        (["--kubelet-api", "dra", "--prepare", "/nonexistent/claim.yaml"], "--prepare"),
    ],
)
def test_flags_of_the_other_api_are_refused_in_one_line(tmp_path: Path, args: list[str], flag: str) -> None:
    """Admissions belong to the device plugin API, claims to DRA; a missing claim file is named."""
    claim_file = tmp_path / "claim.yaml"
    claim_file.write_text(yaml.safe_dump(resource_claim("gpu-0")))
    result = CliRunner().invoke(main, ["kubelet", *[str(claim_file) if a == "CLAIM" else a for a in args]])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and flag in result.output, result.output
