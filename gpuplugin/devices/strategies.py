"""Device-list strategies: how Allocate tells the container runtime which GPUs to expose, NVIDIA's four ways.

The backend's spec names a GPU in ``NVIDIA_VISIBLE_DEVICES`` (its runtime ID, after the uuid|index device-id
strategy). ``envvar`` keeps that; ``volume-mounts`` turns it into one mount per GPU; ``cdi-annotations`` and
``cdi-cri`` name CDI devices ``<vendor>/<class>=<runtime id>`` instead, whose CDI spec ``gpuplugin.devices.cdi`` writes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gpuplugin.core.config import Text, decode
from gpuplugin.core.model import ContainerSpec, Device, DeviceNode, DeviceTree, Mount, frozen_mapping

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
#: NVIDIA's volume-mounts root: the runtime hook lists this directory to learn the GPUs.
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
#: Mounted at ``<root>/<id>``; only the name matters, and /dev/null exists on every host.
VOLUME_MOUNTS_HOST_PATH = "/dev/null"
DEFAULT_CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
DEFAULT_CDI_VENDOR = "k8s.device-plugin.nvidia.com"
#: The plugin part of our CDI annotation keys (``cdi.k8s.io/gpuplugin_<resource>``), like NVIDIA's
#: ``nvidia-device-plugin``.
CDI_ANNOTATION_PLUGIN = "gpuplugin"
#: The attribute holding a device's fully qualified CDI name, for operators and the CDI spec writer.
CDI_NAME_ATTRIBUTE = "cdi.name"
#: The attribute holding, as JSON, the CDI containerEdits of a device: what the backend's spec passed before a
#: CDI strategy removed it from Allocate, so that the spec writer can still put it in the CDI spec.
CDI_EDITS_ATTRIBUTE = "cdi.containerEdits"

#: CDI's vendor rule (SPEC.md, "Kind"): a DNS subdomain. Its class rule, a name starting with a letter (the
#: reference parser's rule), is met by construction: see cdi_class.
CDI_VENDOR = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: CDI's device name rule (SPEC.md, "CDI Devices"); the reference parser also admits ':', the spec text does not.
CDI_DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_ANNOTATION_NAME_MAX = 63
_NOT_ANNOTATION_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DeviceListStrategyKind(enum.StrEnum):
    """NVIDIA's ``deviceListStrategy`` values."""

    ENVVAR = "envvar"
    """``NVIDIA_VISIBLE_DEVICES=<ids>``: the NVIDIA container runtime reads it."""
    VOLUME_MOUNTS = "volume-mounts"
    """One mount per GPU under ``/var/run/nvidia-container-devices``: unprivileged pods cannot fake it by env."""
    CDI_ANNOTATIONS = "cdi-annotations"
    """CDI device names in a ``cdi.k8s.io/`` annotation: CDI-enabled runtimes before Kubernetes 1.31."""
    CDI_CRI = "cdi-cri"
    """CDI device names in the response's ``cdi_devices`` field (stable since Kubernetes 1.31)."""


CDI_STRATEGIES = frozenset({DeviceListStrategyKind.CDI_ANNOTATIONS, DeviceListStrategyKind.CDI_CRI})


def cdi_class(resource: str) -> str:
    """The CDI class of a resource: its name part (``nvidia.com/gpu`` → ``gpu``), made to start with a letter."""
    name = resource.partition("/")[2] or resource
    # Extended resource names may start with a digit; CDI classes may not.
    return name if name[:1].isalpha() else f"r{name}"


def cdi_kind(vendor: str, resource: str) -> str:
    """The CDI kind (``vendor/class``) a resource's devices are named under."""
    return f"{vendor}/{cdi_class(resource)}"


CdiVendor = Annotated[str, Meta(pattern=CDI_VENDOR.pattern, max_length=253, description="a DNS subdomain (CDI vendor)")]
AnnotationPrefix = Annotated[
    str,
    Meta(pattern=CDI_VENDOR.pattern[:-1] + "/$", max_length=254, description="a DNS subdomain followed by '/'"),
]


class DeviceListFlags(msgspec.Struct, rename="camel", kw_only=True):
    """The keys of NVIDIA's ``flags.plugin`` read here; the section is shared with other settings, whose keys are
    left alone here (the config file's schema refuses unknown ones)."""

    device_list_strategy: (
        Text | Annotated[list[DeviceListStrategyKind], Meta(min_length=1, description="one, or a list of them")] | None
    ) = None
    """A name, names separated by commas (as NVIDIA's flag), or a list; None: ``envvar``."""
    cdi_annotation_prefix: AnnotationPrefix = DEFAULT_CDI_ANNOTATION_PREFIX
    cdi_vendor: CdiVendor = DEFAULT_CDI_VENDOR


@dataclass(frozen=True, slots=True)
class DeviceListStrategy:
    """NVIDIA's ``deviceListStrategy`` with ``cdiAnnotationPrefix`` and our ``cdiVendor``; a TreeTransform."""

    strategies: tuple[DeviceListStrategyKind, ...] = (DeviceListStrategyKind.ENVVAR,)
    """One or several, combined as NVIDIA combines them; the default leaves the backend's specs as they are."""
    cdi_annotation_prefix: str = DEFAULT_CDI_ANNOTATION_PREFIX
    """Prefix of the CDI annotation key; runtimes act on ``cdi.k8s.io/`` (NVIDIA's default and ours)."""
    cdi_vendor: str = DEFAULT_CDI_VENDOR
    """Vendor part of the CDI kind; NVIDIA's, so existing runtime configs and specs keep matching."""

    @classmethod
    def from_mapping(cls, data: Any, path: str = "flags.plugin") -> DeviceListStrategy:
        """Validate ``deviceListStrategy``, ``cdiAnnotationPrefix`` and ``cdiVendor`` of a config section.

        The section is NVIDIA's ``flags.plugin``, shared with other settings, so other keys are left alone.
        Raises ConfigError naming the field.
        """
        section = decode(data, DeviceListFlags, path)
        value = section.device_list_strategy or DeviceListStrategyKind.ENVVAR.value
        where = f"{path}.deviceListStrategy"
        # NVIDIA's flag and variable take a comma-separated string, its config file a list.
        kinds = (
            [decode(n.strip(), DeviceListStrategyKind, where) for n in value.split(",")]
            if isinstance(value, str)
            else value
        )
        return cls(
            strategies=tuple(dict.fromkeys(kinds)),
            cdi_annotation_prefix=section.cdi_annotation_prefix,
            cdi_vendor=section.cdi_vendor,
        )

    @property
    def cdi_enabled(self) -> bool:
        """Whether Allocate names CDI devices, so that a CDI spec must describe them."""
        return not CDI_STRATEGIES.isdisjoint(self.strategies)

    @property
    def only_cdi(self) -> bool:
        """Every strategy is a CDI one: the CDI spec alone carries the device nodes (NVIDIA's AllCDIEnabled)."""
        return CDI_STRATEGIES.issuperset(self.strategies)

    def cdi_name(self, resource: str, runtime_id: str) -> str:
        """The fully qualified CDI device name of a GPU of ``resource``."""
        return f"{cdi_kind(self.cdi_vendor, resource)}={runtime_id}"

    def annotation_key(self, resource: str) -> str:
        """The CDI annotation key of ``resource``: one per resource, so every device of a container joins it."""
        name = f"{CDI_ANNOTATION_PLUGIN}_{_NOT_ANNOTATION_SAFE.sub('_', resource)}"
        if len(name) > _ANNOTATION_NAME_MAX:
            # Keep keys of distinct long resource names distinct.
            digest = hashlib.sha256(resource.encode()).hexdigest()[:8]
            name = f"{name[: _ANNOTATION_NAME_MAX - 9]}-{digest}"
        return self.cdi_annotation_prefix + name

    def apply(self, tree: DeviceTree) -> DeviceTree:
        """Rewrite every device's spec for the chosen strategies."""
        if self.strategies == (DeviceListStrategyKind.ENVVAR,):
            return tree
        return dataclasses.replace(tree, devices=tuple(self._rewrite(d) for d in tree.devices))

    def _rewrite(self, device: Device) -> Device:
        spec = device.spec
        runtime_id = spec.list_env.get(VISIBLE_DEVICES)
        if runtime_id is None:
            # Nothing names a GPU in this spec: not ours to rewrite.
            return device
        chosen = set(self.strategies)
        list_env = dict(spec.list_env)
        env = dict(spec.env)
        mounts = list(spec.mounts)
        nodes = spec.device_nodes
        list_annotations = dict(spec.list_annotations)
        cdi_devices = list(spec.cdi_devices)
        attributes = dict(device.attributes)
        if DeviceListStrategyKind.VOLUME_MOUNTS in chosen:
            # NVIDIA sets the variable to the directory, overriding envvar's list when both are on.
            del list_env[VISIBLE_DEVICES]
            env[VISIBLE_DEVICES] = VOLUME_MOUNTS_ROOT
            mounts.append(
                Mount(
                    host_path=VOLUME_MOUNTS_HOST_PATH,
                    container_path=posixpath.join(VOLUME_MOUNTS_ROOT, runtime_id),
                    read_only=False,
                )
            )
        elif DeviceListStrategyKind.ENVVAR not in chosen:
            del list_env[VISIBLE_DEVICES]
        if self.cdi_enabled:
            name = self.cdi_name(device.resource, runtime_id)
            if DeviceListStrategyKind.CDI_ANNOTATIONS in chosen:
                list_annotations[self.annotation_key(device.resource)] = name
            if DeviceListStrategyKind.CDI_CRI in chosen:
                cdi_devices.append(name)
            attributes[CDI_NAME_ATTRIBUTE] = name
            attributes[CDI_EDITS_ATTRIBUTE] = json.dumps(container_edits(spec), separators=(",", ":"))
            if self.only_cdi:
                nodes = ()
        return dataclasses.replace(
            device,
            spec=ContainerSpec(
                env=frozen_mapping(env),
                list_env=frozen_mapping(list_env),
                device_nodes=nodes,
                mounts=tuple(mounts),
                annotations=spec.annotations,
                list_annotations=frozen_mapping(list_annotations),
                cdi_devices=tuple(dict.fromkeys(cdi_devices)),
            ),
            attributes=frozen_mapping(attributes),
        )


def container_edits(spec: ContainerSpec) -> dict[str, Any]:
    """The CDI containerEdits of one device, from the spec its backend made (before any strategy).

    No environment: CDI applies each device's env in turn, so with several GPUs the last one's value would win.
    """
    edits: dict[str, Any] = {}
    if spec.device_nodes:
        edits["deviceNodes"] = [cdi_device_node(n) for n in spec.device_nodes]
    return edits


def cdi_device_node(node: DeviceNode) -> dict[str, str]:
    return {"path": node.container_path, "hostPath": node.host_path, "permissions": node.permissions}
