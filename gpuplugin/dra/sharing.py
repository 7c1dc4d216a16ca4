"""Sharing through a claim: time-slicing set in the claim's opaque config, in the shape of NVIDIA's DRA driver's
``GpuConfig`` (``sharing.strategy: TimeSlicing``, ``sharing.timeSlicingConfig.interval``).

A claim is shared when several containers (or pods) name it; the scheduler hands its devices out once, so sharing
is the claim's own business. The config reaches the plugin in the allocation result
(``status.allocation.devices.config[]``, class configs first, then the claim's): the last entry naming a request
(or naming none: all of them) wins for it. A config that does not decode fails its claim with one line naming the
field; entries for other drivers never reach this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from gpuplugin.core.config import Section, decode
from gpuplugin.dra.claims import OpaqueConfig

#: The ``apiVersion`` and ``kind`` of our opaque parameters.
API_VERSION = "gpu.gpuplugin.dev/v1alpha1"
KIND = "GpuConfig"
Interval = Literal["Default", "Short", "Medium", "Long"]
INTERVALS: tuple[str, ...] = get_args(Interval)
#: What the prepared CDI device tells the container: the GPU stays the GPU (as a device-plugin replica keeps its
#: GPU's spec), and the workload can see that it shares it and at which interval.
STRATEGY_ENV = "GPUPLUGIN_SHARING_STRATEGY"
INTERVAL_ENV = "GPUPLUGIN_TIMESLICE_INTERVAL"
TIME_SLICING = "TimeSlicing"


class TimeSlicingConfigSection(Section):
    """``sharing.timeSlicingConfig``: the time slice each process gets before the next one runs."""

    interval: Interval = "Default"


class SharingSection(Section):
    """``sharing``: only time-slicing in DRA mode (MPS through a claim is not done yet)."""

    strategy: Literal["TimeSlicing"]
    time_slicing_config: TimeSlicingConfigSection | None = None


class GpuConfigSection(Section):
    """The opaque parameters of a claim's config for our driver."""

    api_version: Literal["gpu.gpuplugin.dev/v1alpha1"]
    kind: Literal["GpuConfig"]
    sharing: SharingSection | None = None


def interval_of(config: OpaqueConfig) -> str | None:
    """The time-slice interval ``config`` sets (None: no sharing); raises ConfigError naming the field."""
    section = decode(config.parameters, GpuConfigSection, f"config[{config.index}].opaque.parameters")
    if section.sharing is None:
        return None
    return (section.sharing.time_slicing_config or TimeSlicingConfigSection()).interval


def time_slicing(configs: Sequence[OpaqueConfig], requests: Sequence[str]) -> dict[str, str]:
    """The interval of each of ``requests`` that is time-sliced; every config is decoded, so a bad one fails the
    claim even where it names no request of ours. Raises ConfigError."""
    intervals = [(config, interval_of(config)) for config in configs]
    sliced: dict[str, str] = {}
    for request in requests:
        for config, interval in intervals:
            if _names(config, request):
                # Later entries win: the claim's own configs come after its class's.
                if interval is None:
                    sliced.pop(request, None)
                else:
                    sliced[request] = interval
    return sliced


def sharing_env(interval: str) -> dict[str, str]:
    """The environment of a time-sliced request's CDI device, besides its GPUs' own."""
    return {STRATEGY_ENV: TIME_SLICING, INTERVAL_ENV: interval}


def check_intervals(sliced: Mapping[str, object]) -> dict[str, str]:
    """``sliced`` as read back from a checkpoint: request names to known intervals; raises ValueError."""
    if not isinstance(sliced, Mapping):
        raise ValueError(f"time-slicing is a {type(sliced).__name__}, not a mapping")
    checked: dict[str, str] = {}
    for request, interval in sliced.items():
        if not isinstance(request, str) or interval not in INTERVALS:
            raise ValueError(f"time-slicing of {request!r} is {interval!r}, not one of {', '.join(INTERVALS)}")
        checked[request] = str(interval)
    return checked


def _names(config: OpaqueConfig, request: str) -> bool:
    """A config naming no request applies to all; one naming ``gpu`` applies to its subrequests (``gpu/large``)."""
    if not config.requests:
        return True
    return any(request == name or request.startswith(f"{name}/") for name in config.requests)
