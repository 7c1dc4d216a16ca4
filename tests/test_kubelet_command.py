"""``gpuplugin kubelet``: the simulator as a command, with ``serve`` run against it in another process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from gpuplugin.cli import main
from tests.test_reliability import serve_env

GPU = "nvidia.com/gpu"
#: Generous: only a broken command comes near it, and then the test fails instead of hanging.
DEADLINE_S = 60


async def next_line_with(stream: asyncio.StreamReader, text: str, seen: list[str]) -> str:
    """Read lines (kept in ``seen``) until one contains ``text``."""
    async with asyncio.timeout(DEADLINE_S):
        while True:
            raw = await stream.readline()
            assert raw, f"output ended before {text!r}; it was: {seen}"
            line = raw.decode().rstrip("\n")
            seen.append(line)
            if text in line:
                return line


async def test_kubelet_command_shows_registration_devices_and_an_admission_of_serve(workdir: Path) -> None:
    """``serve --backend mock`` against ``gpuplugin kubelet``: its output shows the registration, the 3 mock GPUs
    listed, a pod admitted with 2 of them, and on SIGTERM it stops and removes kubelet.sock."""
    kubelet_dir, state_dir = workdir / "k", workdir / "state"
    kubelet = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gpuplugin", "kubelet", "--dir", str(kubelet_dir), "--admit", f"{GPU}=2"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=serve_env(),
    )
    plugin: asyncio.subprocess.Process | None = None
    seen: list[str] = []
    try:
        assert kubelet.stdout is not None
        await next_line_with(kubelet.stdout, "kubelet serving", seen)
        assert (kubelet_dir / "kubelet.sock").is_socket()
        plugin = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gpuplugin", "serve", "--backend", "mock", "--mock-gpus", "3"),
            *("--kubelet-dir", str(kubelet_dir), "--state-dir", str(state_dir), "--log-format", "json"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=serve_env(),
        )
        registered = await next_line_with(kubelet.stdout, "registered", seen)
        assert f"registered {GPU} endpoint=gpuplugin-" in registered
        assert "options=GetPreferredAllocation" in registered
        listed = await next_line_with(kubelet.stdout, "ListAndWatch", seen)
        assert listed.endswith(f"ListAndWatch {GPU}: 3 devices, 3 healthy, 0 unhealthy")
        admitted = await next_line_with(kubelet.stdout, "admitted", seen)
        assert f"admitted pod-1 {GPU}=2: GPU-" in admitted
        assert "NVIDIA_VISIBLE_DEVICES=GPU-" in admitted
        plugin.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(plugin.wait(), DEADLINE_S) == 0
        kubelet.send_signal(signal.SIGTERM)
        await next_line_with(kubelet.stdout, "kubelet stopped", seen)
        assert await asyncio.wait_for(kubelet.wait(), DEADLINE_S) == 0
    finally:
        for process in (plugin, kubelet):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
    assert not (kubelet_dir / "kubelet.sock").exists()
    assert kubelet.stderr is not None
    assert await kubelet.stderr.read() == b"", "nothing failed inside the simulator"


def test_a_malformed_admit_is_refused_in_one_line_naming_the_flag() -> None:
    """``--admit`` without ``=COUNT`` exits 2 with one line that names the flag."""
    result = CliRunner().invoke(main, ["kubelet", "--admit", "nvidia.com/gpu"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--admit" in result.output


def test_an_admit_of_a_name_that_is_no_extended_resource_is_refused() -> None:
    """``--admit gpu=1`` is refused: a kubelet admits only extended resource names (vendor.example/name)."""
    result = CliRunner().invoke(main, ["kubelet", "--admit", "gpu=1"])
    assert result.exit_code == 2
    assert "extended resource name" in result.output


def test_admit_every_must_be_a_positive_finite_number() -> None:
    """``--admit-every nan`` is refused with exit status 2, as 0 and negative numbers are."""
    for value in ("nan", "0", "-1"):
        result = CliRunner().invoke(main, ["kubelet", "--admit-every", value])
        assert result.exit_code == 2, value
        assert "--admit-every" in result.output


def test_a_dir_that_is_a_file_is_refused_in_one_line(workdir: Path) -> None:
    """``--dir`` naming a file: exit 2 and one line naming the flag, no traceback."""
    (workdir / "file").write_text("")
    result = CliRunner().invoke(main, ["kubelet", "--dir", str(workdir / "file" / "k")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--dir" in result.output


def test_serve_does_not_import_the_simulator() -> None:
    """The ``kubelet`` command is lazy: listing commands or importing the CLI loads no simulator module."""
    code = "import sys, gpuplugin.cli; print(any(m.startswith('gpuplugin.testing') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=serve_env())
    assert out.stdout.strip() == "False"
