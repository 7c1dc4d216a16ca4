"""The plugin as production runs it: ``python -m gpuplugin serve`` in its own process, watched with psutil."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

#: How long SIGTERM may take before the process is killed; the plugin stops its servers in well under a second.
STOP_TIMEOUT_S = 10.0
#: RSS sampling period (seconds): rare enough that the syscall does not disturb the load generator's loop.
SAMPLE_PERIOD_S = 0.25


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """CPU and memory of the plugin process at one moment."""

    cpu_s: float
    """User plus system CPU time since the process started (seconds)."""
    rss_mb: float
    """Resident set size in MB (10**6 bytes)."""
    peak_rss_mb: float
    """The kernel's high-water mark (VmHWM) where there is one, else the highest sampled RSS."""


class ServerProcess:
    """A child process serving on unix sockets; stopped with SIGTERM and waited for, killed only if it hangs."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.started_s = 0.0
        """``time.monotonic()`` just before the process was created."""
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._max_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._popen.pid

    def start(self) -> None:
        # A file, not a pipe: a chatty child can never block on a full pipe nobody reads.
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_s = time.monotonic()
        self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self._ps = psutil.Process(self._popen.pid)
        self._sampler = asyncio.get_running_loop().create_task(self._sample(), name=f"rss-sampler:{self.name}")

    def check_alive(self) -> None:
        """Raise with the end of the child's log if it has exited."""
        if self._popen is not None and self._popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self._popen.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def usage(self) -> ProcessUsage:
        if self._ps is None:
            raise RuntimeError(f"{self.name} is not running")
        with self._ps.oneshot():
            cpu = self._ps.cpu_times()
            rss = self._ps.memory_info().rss
        self._max_rss = max(self._max_rss, rss)
        return ProcessUsage(
            cpu_s=cpu.user + cpu.system,
            rss_mb=rss / 1e6,
            peak_rss_mb=max(self._max_rss, _high_water_mark(self.pid)) / 1e6,
        )

    async def stop(self) -> int | None:
        """SIGTERM, wait, and close everything; the exit code, or None if it never started."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        popen, self._popen = self._popen, None
        code: int | None = None
        if popen is not None:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(popen.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                popen.kill()
                code = await asyncio.to_thread(popen.wait)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.usage()
            await asyncio.sleep(SAMPLE_PERIOD_S)


def _high_water_mark(pid: int) -> int:
    """Peak RSS in bytes from /proc (Linux); 0 where there is none."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def plugin_argv(
    kubelet_dir: Path,
    state_dir: Path,
    gpus: int,
    backend: str = "mock",
    config: Path | None = None,
    python: Sequence[str] = (),
) -> list[str]:
    """Exactly how a node starts the plugin: this interpreter, the environment inherited; mock GPUs only on mock.

    ``python`` replaces this interpreter (``python3 -S``: the image's bare interpreter, without the host's
    site-packages and their start-up hooks). With a ``config`` file, the file names the backend and the GPU count
    (a partitioned or time-sliced mock node), so neither ``--backend`` nor ``--mock-gpus`` is given: flags would
    win over the file.
    """
    argv = [*(python or [sys.executable]), "-m", "gpuplugin", "serve"]
    if config is not None:
        argv += ["--config", str(config)]
    else:
        argv += ["--backend", backend]
    argv += ["--kubelet-dir", str(kubelet_dir), "--state-dir", str(state_dir)]
    if backend == "mock" and config is None:
        argv += ["--mock-gpus", str(gpus)]
    return [*argv, "--log-level", "warning", "--log-format", "json"]
