"""The mock backend: fake GPUs (an HGX H200 board by default) with faults injected at run time.

Faults go in through a JSON-lines control socket (``gpuplugin.backends.mock.control``) that ``gpuplugin mock``
drives, so a CI script on a kind cluster can make a GPU unhealthy, lose it or unplug it and watch the kubelet react.
"""

from __future__ import annotations

from gpuplugin.backends.mock.backend import Fault, GpuStatus, MockBackend
from gpuplugin.backends.mock.control import (
    ControlRequest,
    ControlRequestError,
    ControlServer,
    ControlUnavailable,
    LoseRequest,
    PlugRequest,
    RecoverRequest,
    StatusRequest,
    UnplugRequest,
    XidRequest,
    control,
    parse_request,
)
from gpuplugin.backends.mock.inventory import Inventory, gpu_uuid
from gpuplugin.backends.mock.settings import (
    DEFAULT_CONTROL_SOCKET,
    MockSettings,
    NVLinkGroup,
    load_settings,
)
from gpuplugin.backends.registry import BackendContext

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "ControlRequest",
    "ControlRequestError",
    "ControlServer",
    "ControlUnavailable",
    "Fault",
    "GpuStatus",
    "Inventory",
    "LoseRequest",
    "MockBackend",
    "MockSettings",
    "NVLinkGroup",
    "PlugRequest",
    "RecoverRequest",
    "StatusRequest",
    "UnplugRequest",
    "XidRequest",
    "control",
    "create",
    "gpu_uuid",
    "load_settings",
    "parse_request",
]


def create(ctx: BackendContext) -> MockBackend:
    """The ``mock`` entry point: settings come from ``ctx.options`` (and its ``config`` file) at ``start()``."""
    return MockBackend(ctx)
