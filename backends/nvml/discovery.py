"""Finding whole GPUs through NVML and sysfs: blocking calls, run in a worker thread at start and on rediscovery."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import structlog

from gpuplugin.backends.nvml.library import as_str
from gpuplugin.backends.nvml.mig import (
    GpuInstanceProfile,
    MigDeviceRecord,
    mig_spec,
    read_instance_profiles,
    read_mig_devices,
)
from gpuplugin.backends.nvml.settings import DeviceIdStrategy, NvmlSettings
from gpuplugin.backends.nvml.spec import gpu_spec, present_control_nodes
from gpuplugin.core.model import (
    Device,
    DeviceNode,
    DeviceTree,
    Health,
    Link,
    PCIeLevel,
    frozen_mapping,
    links_from_pairs,
)

log = structlog.get_logger("gpuplugin.nvml")

_MIB = 1024 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GpuRecord:
    """What NVML and sysfs said about one GPU; ``error`` set means it did not answer and is served Unhealthy."""

    index: int
    handle: Any = None
    uuid: str | None = None
    minor: int | None = None
    bus_id: str | None = None
    """As NVML spells it: ``00000000:00:06.0``."""
    name: str | None = None
    memory_mib: int | None = None
    compute_capability: str | None = None
    mig_enabled: bool = False
    mig_capable: bool = False
    """The GPU answers MIG queries (MIG mode is not NotSupported), enabled or not."""
    numa_node: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Inventory:
    """One discovery's result: the tree to serve and what the health thread and the probe need to find GPUs."""

    tree: DeviceTree = field(default_factory=DeviceTree)
    gpu_by_uuid: Mapping[str, str] = field(default_factory=frozen_mapping)
    """NVML UUID → the ``gpu`` ID events carry (the UUID itself, or the index under the index strategy)."""
    uuid_by_gpu: Mapping[str, str] = field(default_factory=frozen_mapping)
    watched: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """UUID → handle of every GPU served Healthy: all health events are registered on them."""
    mig_watched: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """UUID → handle of MIG-enabled GPUs that are skipped: only their MIG configuration changes are watched."""
    instance_profiles: Mapping[str, tuple[GpuInstanceProfile, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """``gpu`` ID → the GPU-instance profiles it offers; read only with ``report_mig_devices``."""
    incomplete: bool = False
    """Some GPU failed discovery; rediscovering later may bring it back."""


def sysfs_bus_id(bus_id: str) -> str:
    """NVML's ``00000000:00:06.0`` as sysfs names the device: ``0000:00:06.0``, lower case."""
    domain, sep, rest = bus_id.strip().partition(":")
    try:
        return f"{int(domain, 16):04x}{sep}{rest.lower()}"
    except ValueError:
        return bus_id.strip().lower()


def read_numa_node(sysfs_root: str, bus_id: str) -> int | None:
    """The NUMA node sysfs gives a PCI device; None where it has none (``-1``) or the file is missing."""
    path = Path(sysfs_root, "bus", "pci", "devices", sysfs_bus_id(bus_id), "numa_node")
    try:
        node = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _optional(nvml: Any, call: Callable[[], _T]) -> _T | None:
    """A query some GPUs do not support: NotSupported reads as None, any other error is raised."""
    try:
        return call()
    except nvml.NVMLError_NotSupported:
        return None


def read_gpu(nvml: Any, settings: NvmlSettings, index: int) -> GpuRecord:
    """Everything about GPU ``index``; an NVML error ends the reading with what was learnt so far and the error."""
    handle: Any = None
    uuid = bus_id = None
    minor = None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = as_str(nvml.nvmlDeviceGetUUID(handle))
        minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
        bus_id = as_str(nvml.nvmlDeviceGetPciInfo(handle).busId)
        name = _optional(nvml, lambda: as_str(nvml.nvmlDeviceGetName(handle)))
        memory = _optional(nvml, lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // _MIB)
        capability = _optional(nvml, lambda: "{}.{}".format(*nvml.nvmlDeviceGetCudaComputeCapability(handle)))
        mig_mode = _optional(nvml, lambda: nvml.nvmlDeviceGetMigMode(handle)[0])
    except nvml.NVMLError as error:
        log.warning("gpu did not answer discovery; serving it unhealthy", index=index, uuid=uuid, error=str(error))
        return GpuRecord(index=index, handle=handle, uuid=uuid, minor=minor, bus_id=bus_id, error=str(error))
    return GpuRecord(
        index=index,
        handle=handle,
        uuid=uuid,
        minor=minor,
        bus_id=bus_id,
        name=name,
        memory_mib=memory,
        compute_capability=capability,
        mig_enabled=mig_mode == nvml.NVML_DEVICE_MIG_ENABLE,
        mig_capable=mig_mode is not None,
        numa_node=read_numa_node(settings.sysfs_root, bus_id),
    )


#: The key under which ``nvlink_peers`` counts links to an NVSwitch rather than to one GPU.
NVSWITCH = "nvswitch"


def nvlink_peers(nvml: Any, handle: Any) -> Counter[str]:
    """Active NVLink links of one GPU, counted by the sysfs bus id of the GPU at their other end, or as NVSWITCH."""
    peers: Counter[str] = Counter()
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            active = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except nvml.NVMLError_NotSupported:
            if link == 0:
                return peers  # No NVLink on this GPU at all.
            continue
        except nvml.NVMLError_InvalidArgument:
            continue  # Past this GPU's number of links.
        if active != nvml.NVML_FEATURE_ENABLED:
            continue
        try:
            kind = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
            kind = None  # Older drivers: the remote bus id alone tells a GPU.
        if kind == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
            peers[NVSWITCH] += 1
            continue
        remote = as_str(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        peers[sysfs_bus_id(remote)] += 1
    return peers


def pcie_level(nvml: Any, a: Any, b: Any) -> PCIeLevel:
    try:
        level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(a, b))
    except nvml.NVMLError_NotSupported:
        return PCIeLevel.SYSTEM
    try:
        return PCIeLevel(level)
    except ValueError:
        return PCIeLevel.SYSTEM


def read_links(nvml: Any, gpus: Mapping[str, GpuRecord]) -> list[tuple[str, str, Link]]:
    """The link between every pair of GPUs (keyed by their ``gpu`` IDs); an NVML error leaves a pair unknown."""
    peers: dict[str, Counter[str]] = {}
    for gpu, record in gpus.items():
        try:
            peers[gpu] = nvlink_peers(nvml, record.handle)
        except nvml.NVMLError as error:
            log.warning("nvlink state unreadable; assuming none", gpu=gpu, error=str(error))
            peers[gpu] = Counter()
    links = []
    for (a, ra), (b, rb) in itertools.combinations(gpus.items(), 2):
        assert ra.bus_id is not None
        assert rb.bus_id is not None
        # Count direct links from both ends (either GPU's report joins them); GPUs on NVSwitches (HGX boards)
        # reach each other over as many links as the less connected one has, as nvidia-smi's NV18 shows.
        direct = max(peers[a][sysfs_bus_id(rb.bus_id)], peers[b][sysfs_bus_id(ra.bus_id)])
        nvlinks = direct + min(peers[a][NVSWITCH], peers[b][NVSWITCH])
        try:
            pcie = pcie_level(nvml, ra.handle, rb.handle)
        except nvml.NVMLError as error:
            log.warning("pcie topology unreadable; assuming across CPUs", gpus=(a, b), error=str(error))
            pcie = PCIeLevel.SYSTEM
        links.append((a, b, Link(nvlinks=nvlinks, pcie=pcie)))
    return links


def device_id(settings: NvmlSettings, record: GpuRecord) -> str:
    if settings.device_id_strategy is DeviceIdStrategy.UUID and record.uuid is not None:
        return record.uuid
    # Under the UUID strategy too when the UUID could not be read: the index still names the right GPU.
    return str(record.index)


def _attributes(record: GpuRecord) -> Mapping[str, str]:
    values = {
        "index": record.index,
        "uuid": record.uuid,
        "minor": record.minor,
        "pci_bus_id": record.bus_id,
        "model": record.name,
        "memory_mib": record.memory_mib,
        "compute_capability": record.compute_capability,
        "error": record.error,
    }
    return frozen_mapping((key, str(value)) for key, value in values.items() if value is not None)


def build_device(settings: NvmlSettings, record: GpuRecord, control: tuple[DeviceNode, ...]) -> Device:
    gpu = device_id(settings, record)
    return Device(
        id=gpu,
        resource=settings.resource,
        gpu=gpu,
        spec=gpu_spec(settings, gpu, record.minor, control),
        numa_node=record.numa_node,
        health=Health.UNHEALTHY if record.error is not None else Health.HEALTHY,
        attributes=_attributes(record),
    )


def build_mig_device(
    settings: NvmlSettings, parent: GpuRecord, mig: MigDeviceRecord, control: tuple[DeviceNode, ...]
) -> Device:
    """One MIG device of a MIG-enabled GPU, under the GPU's resource; ``gpu`` is the parent's ID."""
    assert parent.minor is not None
    gpu = device_id(settings, parent)
    mig_id = mig.uuid if settings.device_id_strategy is DeviceIdStrategy.UUID else f"{parent.index}:{mig.index}"
    placed = mig.placement
    values = {
        "uuid": mig.uuid,
        "mig_index": mig.index,
        "parent_uuid": parent.uuid,
        "parent_index": parent.index,
        "parent_minor": parent.minor,
        "parent_memory_mib": parent.memory_mib,
        "pci_bus_id": parent.bus_id,
        "model": parent.name,
        "gpu_instance_id": mig.gpu_instance_id,
        "compute_instance_id": mig.compute_instance_id,
        "gpu_instance_slices": mig.gpu_instance_slices,
        "compute_instance_slices": mig.compute_instance_slices,
        "memory_mib": mig.memory_mib,
        # Where it sits and what it takes of its GPU, in the partitioned backend's terms: DRA's counters.
        "start_slice": None if placed is None else placed.start,
        "memory_slices": None if placed is None else placed.memory_slices,
        "compute_slices": None if placed is None else mig.compute_instance_slices,
        "error": mig.error,
    }
    return Device(
        id=mig_id,
        resource=settings.resource,
        gpu=gpu,
        spec=mig_spec(settings, mig_id, parent.minor, mig, control),
        numa_node=parent.numa_node,
        health=Health.UNHEALTHY if mig.error is not None else Health.HEALTHY,
        instance=(mig.gpu_instance_id, mig.compute_instance_id),
        attributes=frozen_mapping((key, str(value)) for key, value in values.items() if value is not None),
    )


def _mig_devices(
    nvml: Any, settings: NvmlSettings, record: GpuRecord, control: tuple[DeviceNode, ...]
) -> list[Device] | None:
    """The MIG devices of a MIG-enabled GPU; None when they could not be read (rediscovery retries)."""
    assert record.minor is not None
    try:
        migs = read_mig_devices(nvml, settings, record.handle, record.minor)
    except nvml.NVMLError as error:
        log.warning("mig devices unreadable; gpu not served", index=record.index, uuid=record.uuid, error=str(error))
        return None
    log.info("mig enabled; serving its mig devices", index=record.index, uuid=record.uuid, mig_devices=len(migs))
    return [build_mig_device(settings, record, mig, control) for mig in migs]


def _instance_profiles(nvml: Any, record: GpuRecord) -> tuple[GpuInstanceProfile, ...]:
    try:
        return read_instance_profiles(nvml, record.handle)
    except nvml.NVMLError as error:
        log.warning("gpu-instance profiles unreadable", index=record.index, uuid=record.uuid, error=str(error))
        return ()


def read_versions(nvml: Any) -> Mapping[str, str]:
    """The driver's version and the CUDA version it supports (``580.159.04``, ``13.0``), as attributes every device
    of the node carries; one that cannot be read is left out (they describe the node, they serve nothing)."""
    versions: dict[str, str] = {}
    try:
        versions["driver_version"] = as_str(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError as error:
        log.warning("driver version unreadable", error=str(error))
    try:
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        # NVML's encoding: 1000 x major + 10 x minor.
        versions["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
    except nvml.NVMLError as error:
        log.warning("cuda version unreadable", error=str(error))
    return frozen_mapping(versions)


def discover(nvml: Any, settings: NvmlSettings) -> Inventory:
    """Read every GPU; one that fails is served Unhealthy, a MIG-enabled one is skipped (or, with
    ``report_mig_devices``, served as its MIG devices). Raises NVMLError only when the GPUs cannot be counted."""
    count = int(nvml.nvmlDeviceGetCount())
    control = present_control_nodes(settings)
    devices: list[Device] = []
    healthy: dict[str, GpuRecord] = {}
    gpu_by_uuid: dict[str, str] = {}
    watched: dict[str, Any] = {}
    mig_watched: dict[str, Any] = {}
    profiles: dict[str, tuple[GpuInstanceProfile, ...]] = {}
    incomplete = False
    for index in range(count):
        record = read_gpu(nvml, settings, index)
        if settings.report_mig_devices and record.mig_capable and record.error is None:
            profiles[device_id(settings, record)] = _instance_profiles(nvml, record)
        if record.mig_enabled and record.uuid is not None:
            if not settings.report_mig_devices:
                # Serving the whole GPU under MIG would not work; the partitioned backend serves its MIG devices.
                log.info("mig enabled; gpu skipped", index=index, uuid=record.uuid)
                mig_watched[record.uuid] = record.handle
                continue
            migs = _mig_devices(nvml, settings, record, control)
            gpu_by_uuid[record.uuid] = device_id(settings, record)
            if migs is None:
                incomplete = True
                continue
            devices += migs
            incomplete = incomplete or any(d.health is Health.UNHEALTHY for d in migs)
            # XIDs of MIG devices arrive on the parent's handle, naming the instance: watch it whole.
            healthy[device_id(settings, record)] = record
            watched[record.uuid] = record.handle
            continue
        device = build_device(settings, record, control)
        devices.append(device)
        if record.uuid is not None:
            gpu_by_uuid[record.uuid] = device.gpu
        if record.error is not None:
            incomplete = True
            continue
        assert record.uuid is not None
        healthy[device.gpu] = record
        watched[record.uuid] = record.handle
    versions = read_versions(nvml)
    devices = [replace(d, attributes=frozen_mapping({**d.attributes, **versions})) for d in devices]
    tree = DeviceTree(devices=tuple(devices), links=links_from_pairs(read_links(nvml, healthy)))
    log.info(
        "gpus discovered",
        count=count,
        served=len(devices),
        unhealthy=sum(d.health is Health.UNHEALTHY for d in devices),
        mig_skipped=len(mig_watched),
    )
    return Inventory(
        tree=tree,
        gpu_by_uuid=frozen_mapping(gpu_by_uuid),
        uuid_by_gpu=frozen_mapping((gpu, uuid) for uuid, gpu in gpu_by_uuid.items()),
        watched=MappingProxyType(watched),
        mig_watched=MappingProxyType(mig_watched),
        instance_profiles=MappingProxyType(profiles),
        incomplete=incomplete,
    )
