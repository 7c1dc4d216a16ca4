"""Who the DRA driver is on a node: its name, its pool, and where it keeps its sockets, state and CDI specs."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

#: The driver name ResourceSlices, DeviceClasses and allocation results carry (a DNS subdomain).
DEFAULT_DRIVER_NAME = "gpu.gpuplugin.dev"
#: The CDI vendor of the per-claim specs: the class is ``claim`` and each device is one claim's UID.
DEFAULT_CDI_VENDOR = "k8s.gpu.gpuplugin.dev"
CDI_CLASS = "claim"
DEFAULT_PLUGINS_DIR = Path("/var/lib/kubelet/plugins")
DEFAULT_PLUGINS_REGISTRY_DIR = Path("/var/lib/kubelet/plugins_registry")
DEFAULT_CDI_DIR = Path("/var/run/cdi")


_Choice = TypeVar("_Choice", bound=enum.StrEnum)


class GateMode(enum.StrEnum):
    """Whether to publish a shape that needs a cluster feature gate (alpha in 1.34, off by default)."""

    AUTO = "auto"
    """Ask the API server (a dry run, once): where the gate is off it drops the fields, and the fallback is used."""
    ON = "on"
    OFF = "off"


class TaintEffect(enum.StrEnum):
    """What a taint on an unhealthy device does: NoSchedule keeps new claims off it; NoExecute also evicts the pods
    using it (the device taint eviction controller of kube-controller-manager)."""

    NO_SCHEDULE = "NoSchedule"
    NO_EXECUTE = "NoExecute"


def choice(kind: type[_Choice], field: str, value: object) -> _Choice:
    """``value`` as one of ``kind``'s members; raises ValueError, one line naming ``field`` and the choices."""
    try:
        return kind(str(value))
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise ValueError(f"{field}: must be one of {allowed}, got {str(value)[:64]!r}") from None


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
    partitionable_devices: GateMode = GateMode.AUTO
    """Partitions of a GPU as devices sharing its counters, with the whole GPU beside them (gate
    DRAPartitionableDevices); off: partitions alone, as devices of their own."""
    device_taints: GateMode = GateMode.AUTO
    """An unhealthy device stays in the slice with a taint (gate DRADeviceTaints); off: it leaves the slice."""
    taint_effect: TaintEffect = TaintEffect.NO_SCHEDULE

    def __post_init__(self) -> None:
        # Coerced here, as the values come from flags and environment variables as text.
        object.__setattr__(
            self, "partitionable_devices", choice(GateMode, "dra.partitionableDevices", self.partitionable_devices)
        )
        object.__setattr__(self, "device_taints", choice(GateMode, "dra.deviceTaints", self.device_taints))
        object.__setattr__(self, "taint_effect", choice(TaintEffect, "dra.taintEffect", self.taint_effect))
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

    @property
    def taint_key(self) -> str:
        """The key of the taint an unhealthy device carries: the driver's domain, ``unhealthy``."""
        return f"{self.driver_name}/unhealthy"
