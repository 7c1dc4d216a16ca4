"""Loading NVML: finding ``libnvidia-ml.so.1`` under the driver root, one clear message when that fails, and reading
its strings."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.core.backend import BackendUnavailable

log = structlog.get_logger("gpuplugin.nvml")

LIBRARY_NAME = "libnvidia-ml.so.1"
#: Where drivers install the library, relative to the driver root (as NVIDIA's container toolkit looks).
LIBRARY_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib",
    "lib",
)

LibraryLoader = Callable[[str], None]
"""Makes ``libnvidia-ml.so.1`` loadable from a driver root before ``nvmlInit``; raises BackendUnavailable."""


def as_str(value: str | bytes) -> str:
    """A string NVML returned, as ``str``: older pynvml releases return ``bytes``."""
    return value.decode() if isinstance(value, bytes) else value


def library_candidates(driver_root: str) -> list[Path]:
    return [Path(driver_root, directory, LIBRARY_NAME) for directory in LIBRARY_DIRS]


def preload_library(driver_root: str) -> None:
    """Load the library from under ``driver_root`` so that pynvml's ``CDLL("libnvidia-ml.so.1")`` finds it.

    The dynamic loader matches an already loaded library by its soname, so loading it once by full path is
    enough. With driver root ``/`` the system's loader path is searched as usual and nothing is done here.
    """
    if os.path.normpath(driver_root) == "/":
        return
    for candidate in library_candidates(driver_root):
        if candidate.is_file():
            try:
                ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            except OSError as error:
                cause = f"loading {candidate} failed: {error}"
                raise BackendUnavailable(unavailable_message(driver_root, cause)) from error
            log.info("nvml library loaded", path=str(candidate))
            return
    raise BackendUnavailable(
        unavailable_message(driver_root, f"{LIBRARY_NAME} is in none of {', '.join(LIBRARY_DIRS)} under it")
    )


def unavailable_message(driver_root: str, cause: str) -> str:
    """The one message a failing NVML start produces: what was looked for, what happened, how to fix it."""
    return (
        f"NVML is unavailable: looked for {LIBRARY_NAME} under driver_root {driver_root!r}: {cause}. "
        "To fix: install the NVIDIA driver on the node; if the driver runs in a container (the GPU operator), "
        "set driver_root to where it is mounted, e.g. /run/nvidia/driver; and run this plugin with the nvidia "
        "runtime class (runtimeClassName: nvidia) or the NVIDIA container toolkit, so that the library and "
        "/dev/nvidia* reach the container."
    )


def init_failure_cause(nvml: Any, error: BaseException) -> str:
    """Says in words why ``nvmlInit`` failed, by NVML error class."""
    if isinstance(error, nvml.NVMLError_LibraryNotFound):
        return f"{LIBRARY_NAME} was not found (NVML: {error})"
    if isinstance(error, nvml.NVMLError_DriverNotLoaded):
        return f"the library loaded but the NVIDIA kernel driver is not loaded (NVML: {error})"
    if isinstance(error, nvml.NVMLError_NoPermission):
        return f"no permission to open the GPUs' device nodes (NVML: {error})"
    if isinstance(error, nvml.NVMLError_LibRmVersionMismatch):
        return f"the library and the kernel driver are different versions; reboot or reload the driver (NVML: {error})"
    return f"nvmlInit failed (NVML: {error})"


def initialize(nvml: Any, settings: NvmlSettings, loader: LibraryLoader | None) -> None:
    """Load and initialise NVML; any failure becomes BackendUnavailable with the message above."""
    if loader is not None:
        loader(settings.driver_root)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        raise BackendUnavailable(unavailable_message(settings.driver_root, init_failure_cause(nvml, error))) from error
