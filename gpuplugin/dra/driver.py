"""Who the DRA driver is on a node: its name, its pool, and where it keeps its sockets, state and CDI specs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: The driver name ResourceSlices, DeviceClasses and allocation results carry (a DNS subdomain).
DEFAULT_DRIVER_NAME = "gpu.gpuplugin.dev"
#: The CDI vendor of the per-claim specs: the class is ``claim`` and each device is one claim's UID.
DEFAULT_CDI_VENDOR = "k8s.gpu.gpuplugin.dev"
CDI_CLASS = "claim"
DEFAULT_PLUGINS_DIR = Path("/var/lib/kubelet/plugins")
DEFAULT_PLUGINS_REGISTRY_DIR = Path("/var/lib/kubelet/plugins_registry")
DEFAULT_CDI_DIR = Path("/var/run/cdi")

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_dns_subdomain(name: str) -> bool:
    """Whether ``name`` is a DNS-1123 subdomain of at most 253 characters (a driver name, a node name)."""
    return 0 < len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name) is not None


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """The DRA driver of one node."""

    node_name: str
    """The node the ResourceSlices are for; also the name of the one pool this driver publishes."""
    driver_name: str = DEFAULT_DRIVER_NAME
    plugins_dir: Path = DEFAULT_PLUGINS_DIR
    """The kubelet's plugins directory: the DRA socket and the checkpoint live in ``<plugins_dir>/<driver>``."""
    plugins_registry_dir: Path = DEFAULT_PLUGINS_REGISTRY_DIR
    """Where the kubelet's plugin watcher looks for registration sockets."""
    cdi_dir: Path = DEFAULT_CDI_DIR
    cdi_vendor: str = DEFAULT_CDI_VENDOR

    def __post_init__(self) -> None:
        for field, value in (("nodeName", self.node_name), ("driverName", self.driver_name)):
            if not is_dns_subdomain(value):
                raise ValueError(f"dra.{field}: must be a lowercase DNS subdomain (a-z, 0-9, '-', '.'), got {value!r}")
        if not is_dns_subdomain(self.cdi_vendor):
            raise ValueError(f"dra.cdiVendor: must be a lowercase DNS subdomain, got {self.cdi_vendor!r}")

    @property
    def pool(self) -> str:
        """The one resource pool of the node: named after it, as the kubelet-local drivers do."""
        return self.node_name

    @property
    def state_dir(self) -> Path:
        return self.plugins_dir / self.driver_name

    @property
    def socket_path(self) -> Path:
        """The DRA service's socket, the ``endpoint`` the registration names."""
        return self.state_dir / "dra.sock"

    @property
    def registration_path(self) -> Path:
        return self.plugins_registry_dir / f"{self.driver_name}-reg.sock"

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.json"

    @property
    def cdi_kind(self) -> str:
        return f"{self.cdi_vendor}/{CDI_CLASS}"
