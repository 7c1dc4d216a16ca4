"""The NVML backend: whole NVIDIA GPUs through NVIDIA's management library (``pynvml``).

Registered under the ``gpuplugin.backends`` entry point as ``nvml = "gpuplugin.backends.nvml:create"``.
"""

from __future__ import annotations

from gpuplugin.backends.nvml.backend import NvmlBackend
from gpuplugin.backends.nvml.mig import GpuInstanceProfile
from gpuplugin.backends.nvml.settings import DeviceIdStrategy, NvmlSettings
from gpuplugin.backends.registry import BackendContext

__all__ = ["DeviceIdStrategy", "GpuInstanceProfile", "NvmlBackend", "NvmlSettings", "create"]


def create(ctx: BackendContext) -> NvmlBackend:
    """The entry point's factory: settings from ``ctx.options`` (raises ConfigError), the real pynvml."""
    return NvmlBackend(NvmlSettings.from_options(ctx.options), ctx.health_policy)
