"""What a container needs to use one whole GPU: the visible-devices variable and, optionally, its device nodes."""

from __future__ import annotations

import os

from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.core.model import ContainerSpec, DeviceNode, frozen_mapping
from gpuplugin.devices.strategies import VISIBLE_DEVICES

#: Nodes every GPU container needs besides its own ``/dev/nvidiaN``; each is passed only where the host has it.
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def host_path(device_root: str, container_path: str) -> str:
    """Where a ``/dev`` path lives on the host, given the root under which the host's ``/dev`` is found."""
    return os.path.join(device_root, container_path.lstrip("/"))


def present_control_nodes(settings: NvmlSettings) -> tuple[DeviceNode, ...]:
    """The control nodes present under ``device_root``; blocking, so called at discovery, never on Allocate."""
    if not settings.pass_device_specs:
        return ()
    nodes = []
    for path in CONTROL_NODES:
        host = host_path(settings.device_root, path)
        if os.path.exists(host):
            nodes.append(DeviceNode(host_path=host, container_path=path, permissions="rw"))
    return tuple(nodes)


def gpu_spec(
    settings: NvmlSettings, device_id: str, minor: int | None, control: tuple[DeviceNode, ...]
) -> ContainerSpec:
    """The spec of one whole GPU named ``device_id`` whose device node is ``/dev/nvidia<minor>``.

    Without a minor number (a GPU that failed discovery, served Unhealthy) no device nodes are passed.
    """
    nodes: tuple[DeviceNode, ...] = ()
    if settings.pass_device_specs and minor is not None:
        path = f"/dev/nvidia{minor}"
        nodes = (DeviceNode(host_path=host_path(settings.device_root, path), container_path=path), *control)
    return ContainerSpec(list_env=frozen_mapping({VISIBLE_DEVICES: device_id}), device_nodes=nodes)
