"""NVIDIA's own device plugin, measured in the same run as ours: where its binary is, and how it is started.

``benchmarks/nvidia/build.sh`` builds it (``cmd/nvidia-device-plugin`` of github.com/NVIDIA/k8s-device-plugin, a
pinned release, from Go modules); ``GPUPLUGIN_NVIDIA_PLUGIN`` names a binary built elsewhere. It serves NVML's GPUs
only, so it runs where the plugin's backend is nvml and the machine has a GPU; elsewhere :func:`unavailable` says why.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: Environment variable naming another build of NVIDIA's plugin (one copied to a GPU machine).
NVIDIA_PLUGIN_ENV = "GPUPLUGIN_NVIDIA_PLUGIN"
_BUILT = Path(__file__).resolve().parent / "nvidia" / "bin" / "nvidia-device-plugin"
#: Where NVIDIA's plugin puts its own socket (``pluginapi.DevicePluginPath``, compiled in): the simulated kubelet
#: serves ``kubelet.sock`` there too, so that the endpoint it registers is found beside it.
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
#: The prefix of NVIDIA's measures in a run's results: "nvidia Allocate (Go client)".
PREFIX = "nvidia "
_KLOG_PROBLEM = re.compile(r"^[WEF]\d{4} ")
_KLOG_LINE = re.compile(r"^[IWEF]\d{4} ")


def binary() -> Path | None:
    """The built binary (GPUPLUGIN_NVIDIA_PLUGIN read now), or None where there is none."""
    path = Path(os.environ.get(NVIDIA_PLUGIN_ENV) or _BUILT)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def version(path: Path) -> str:
    """The release build.sh recorded beside the binary, or ``unknown``."""
    stamp = path.parent / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def unavailable(backend: str, gpus: object) -> str | None:
    """Why NVIDIA's plugin cannot be measured in this run, or None where it can.

    ``gpus`` is the machine's GPU list as ``report.nvidia_gpus`` reads it (``"none"`` without NVML).
    """
    if backend != "nvml":
        return "it serves NVML's GPUs only, and this run's backend is the mock"
    if not isinstance(gpus, list) or not gpus:
        return "the machine has no GPU that NVML reads, and NVIDIA's plugin serves nothing without one"
    if binary() is None:
        return f"it is not built (benchmarks/nvidia/build.sh, or {NVIDIA_PLUGIN_ENV} naming a build)"
    existing = next(p for p in (DEVICE_PLUGIN_DIR, *DEVICE_PLUGIN_DIR.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        return f"its socket directory {DEVICE_PLUGIN_DIR} (compiled in) cannot be made or written here"
    return None


def argv(path: Path, kubelet_dir: Path) -> list[str]:
    """NVIDIA's plugin with its defaults (device list in the environment variable, UUIDs, no MIG strategy) and the
    simulated kubelet's socket."""
    return [str(path), "--kubelet-socket", str(kubelet_dir / "kubelet.sock")]


def log_problems(text: str) -> list[str]:
    """Warning, error and fatal lines of a klog log."""
    return [line[:300] for line in text.splitlines() if _KLOG_PROBLEM.match(line)][:50]


def is_klog(text: str) -> bool:
    """Whether a log is klog's (NVIDIA's plugin), by its first line."""
    return bool(_KLOG_LINE.match(text.lstrip()[:6]))
