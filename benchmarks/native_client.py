"""The kubelet's own client stack as the load generator: runs ``gokubelet`` (Go, grpc-go) and reads its samples back.

The Python client costs about as much per call as the plugin does, so its figures hide the plugin's latency; the
reference figures were taken with the kubelet's Go client. ``benchmarks/gokubelet/build.sh`` builds the binary
(Go from Debian's packages, offline); where it is absent, ``native_client()`` says so and callers fall back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.measure import Clock, Latencies
from gpuplugin.kubelet.codec import encode_varint

#: Environment variable naming another gokubelet binary (one built elsewhere, copied to this machine).
GOKUBELET_ENV = "GPUPLUGIN_GOKUBELET"
#: The binary build.sh makes, unless GPUPLUGIN_GOKUBELET names another.
_DEFAULT = Path(__file__).resolve().parent / "gokubelet" / "bin" / "gokubelet"

MODES = ("allocate", "preferred", "admission")


def native_client() -> Path | None:
    """The gokubelet binary if it is built and executable (GPUPLUGIN_GOKUBELET read now), else None."""
    path = Path(os.environ.get(GOKUBELET_ENV) or _DEFAULT)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def delimited(messages: Iterable[bytes]) -> bytes:
    """Serialized messages, each prefixed with its length as a protobuf varint (the "delimited" format)."""
    return b"".join(encode_varint(len(message)) + message for message in messages)


def _write_inputs(
    directory: Path, requests: Sequence[bytes], devices: Sequence[str], *, mode: str, checkpoint_dir: Path | None
) -> list[str]:
    """Write the input files into ``directory``; the arguments naming them."""
    if mode == "admission":
        if not devices or checkpoint_dir is None:
            raise ValueError("admission needs devices and a checkpoint_dir")
        (directory / "devices.txt").write_text("".join(f"{d}\n" for d in devices))
        return ["--devices", str(directory / "devices.txt"), "--checkpoint", str(checkpoint_dir)]
    if not requests:
        raise ValueError(f"{mode} needs requests")
    (directory / "requests.bin").write_bytes(delimited(requests))
    return ["--requests", str(directory / "requests.bin")]


async def run_native(
    binary: Path,
    mode: str,
    targets: Mapping[str, Path],
    clock: Clock,
    *,
    calls: int,
    callers: int = 1,
    block_calls: int,
    warmup_calls: int,
    requests: Sequence[bytes] = (),
    devices: Sequence[str] = (),
    sizes: Sequence[int] = (),
    checkpoint_dir: Path | None = None,
    resource: str = "",
) -> tuple[dict[str, Latencies], dict[str, str]]:
    """Run gokubelet in ``mode`` on ``targets`` (name to plugin socket); each target's Latencies and the versions.

    The calls interleave as in ``benchmarks.callers.interleaved``: ``warmup_calls`` unrecorded per target, then
    blocks of ``block_calls`` on each target in turn, the order rotating, until ``calls`` are recorded per target.
    ``requests`` are serialized AllocateRequest (allocate) or PreferredAllocationRequest (preferred) messages, call
    n sending request n modulo their number. An admission (GetPreferredAllocation over ``devices`` for
    ``sizes[n % len(sizes)]`` devices, Allocate, checkpoint written in ``checkpoint_dir``) is timed whole.

    Failed calls are counted in each Latencies' ``errors`` ("CODE: message"); the versions are ``go`` and ``grpc``
    (grpc-go's). Raises RuntimeError, with the binary's stderr, when gokubelet exits non-zero.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not targets:
        raise ValueError("no targets")
    directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="gokubelet-"))
    try:
        argv = [str(binary), mode]
        argv += await asyncio.to_thread(
            _write_inputs, directory, requests, devices, mode=mode, checkpoint_dir=checkpoint_dir
        )
        for name, socket in targets.items():
            argv += ["--target", f"{name}={socket}"]
        argv += ["--calls", str(calls), "--callers", str(callers)]
        argv += ["--block", str(block_calls), "--warmup", str(warmup_calls)]
        if sizes:
            argv += ["--sizes", ",".join(str(size) for size in sizes)]
        if resource:
            argv += ["--resource", resource]
        stdout, stderr, returncode, spawned_s = await _run(argv)
    finally:
        await asyncio.to_thread(shutil.rmtree, directory, True)
    if returncode != 0:
        raise RuntimeError(f"gokubelet {mode} exited {returncode}: {stderr.decode(errors='replace').strip()}")
    report: dict[str, Any] = json.loads(stdout)
    measures: dict[str, Latencies] = {}
    for name in targets:
        result = report["targets"][name]
        latencies = clock.latencies(name)
        # The binary times calls from its own start; perf_counter at the spawn puts them on the run's clock
        # (a millisecond or so early: the Go runtime starts after exec returns).
        for started_s, elapsed_s in zip(result["started_s"], result["elapsed_s"], strict=True):
            latencies.record(spawned_s + started_s, elapsed_s)
        latencies.errors.update({str(message): int(count) for message, count in result["errors"].items()})
        latencies.wall_s = float(result["wall_s"])
        measures[name] = latencies
    return measures, {"go": str(report["go"]), "grpc": str(report["grpc"])}


async def _run(argv: list[str]) -> tuple[bytes, bytes, int, float]:
    """Run ``argv`` to its end: stdout, stderr, exit status and perf_counter when it was spawned.

    Cancelled, it kills the process and waits for it, so no gokubelet outlives the run.
    """
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    spawned_s = time.perf_counter()
    try:
        stdout, stderr = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return stdout, stderr, process.returncode, spawned_s
