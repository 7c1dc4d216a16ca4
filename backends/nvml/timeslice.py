"""A GPU's compute time slice, through ``nvidia-smi compute-policy``: NVML has no public call for it, and NVIDIA's
own DRA driver runs the same command.

``--set-timeslice=<0..3>`` sets it (0 Default, 1 Short, 2 Medium, 3 Long); ``-l`` lists the GPU's policies, read
back here without relying on the table's exact layout (it is meant for people): the line naming the time slice,
then the first interval name or number on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence

from gpuplugin.core.backend import TIMESLICE_INTERVALS, TimeSliceFailed, check_timeslice_interval

_LINE = re.compile(r"time\s*-?\s*slice", re.IGNORECASE)
_VALUE = re.compile(r"\b(default|short|medium|long|[0-3])\b", re.IGNORECASE)


def parse_timeslice(listing: str) -> int | None:
    """The interval in ``nvidia-smi compute-policy -l`` output (None: no line names it in a way we know)."""
    for line in listing.splitlines():
        found = _LINE.search(line)
        if found is None:
            continue
        value = _VALUE.search(line, found.end())
        if value is None:
            continue
        word = value[1].lower()
        return int(word) if word.isdigit() else [n.lower() for n in TIMESLICE_INTERVALS].index(word)
    return None


class ComputePolicy:
    """``nvidia-smi compute-policy`` as an asyncio subprocess: never on the event loop, never past ``timeout_s``."""

    def __init__(self, command: Sequence[str], timeout_s: float) -> None:
        self.command = tuple(command)
        self.timeout_s = timeout_s

    async def set_timeslice(self, gpu: str, interval: int) -> None:
        """Set the GPU's interval; raises TimeSliceFailed naming the GPU and the command's first line of error."""
        check_timeslice_interval(gpu, interval)
        await self._run(gpu, f"--set-timeslice={interval}")

    async def timeslice(self, gpu: str) -> int | None:
        """The GPU's interval as ``-l`` lists it; None where the listing names none we can read."""
        return parse_timeslice(await self._run(gpu, "-l"))

    async def _run(self, gpu: str, action: str) -> str:
        args = (*self.command, "compute-policy", "-i", gpu, action)
        what = f"GPU {gpu}: {' '.join(args)}"
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise TimeSliceFailed(f"{what}: cannot run it: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await process.communicate()
        except TimeoutError:
            raise TimeSliceFailed(f"{what}: no answer in {self.timeout_s:g} s") from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                # Shielded: a cancelled call must still reap the process it started.
                await asyncio.shield(process.wait())
        if process.returncode != 0:
            lines = [line.strip() for line in (err or out).decode(errors="replace").splitlines() if line.strip()]
            raise TimeSliceFailed(f"{what}: exit status {process.returncode}: {lines[0] if lines else 'no message'}")
        return out.decode(errors="replace")
