"""MIG through NVML: a GPU's GPU-instance profiles, and the MIG devices of a MIG-enabled GPU with their device nodes.

Read-only: nothing here creates, destroys or reconfigures instances, and MIG mode is never changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from gpuplugin.backends.nvml.library import as_str
from gpuplugin.backends.nvml.settings import NvmlSettings
from gpuplugin.backends.nvml.spec import host_path
from gpuplugin.core.model import ContainerSpec, DeviceNode, frozen_mapping
from gpuplugin.devices.strategies import VISIBLE_DEVICES

log = structlog.get_logger("gpuplugin.nvml")

#: NVIDIA's name suffixes of GPU-instance profile variants, by the NVML profile constant's name.
_VARIANTS: Mapping[str, str] = MappingProxyType(
    {
        "NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1": "+me",
        "NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1": "+me",
        "NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX": "+gfx",
        "NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX": "+gfx",
        "NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX": "+gfx",
        "NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX": "+gfx",
        "NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME": "-me",
        "NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME": "-me",
        "NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME": "+me.all",
        "NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME": "+me.all",
    }
)
#: Where the driver publishes the device-node minor of each MIG capability, under the driver root.
CAPABILITIES_DIR = "proc/driver/nvidia/capabilities"
CAPS_NODE = "/dev/nvidia-caps/nvidia-cap{minor}"


@dataclass(frozen=True, slots=True)
class GpuInstanceProfile:
    """One GPU-instance profile a GPU offers (``nvmlDeviceGetGpuInstanceProfileInfo``), MIG enabled or not."""

    profile_id: int
    """NVML's profile constant (``NVML_GPU_INSTANCE_PROFILE_1_SLICE`` = 0, …)."""
    slice_count: int
    """Compute slices (the ``1`` of ``1g.18gb``)."""
    memory_mib: int
    instance_count: int
    """How many instances of this profile the GPU holds at most."""
    variant: str = ""
    """NVIDIA's suffix of the profile's name: ``+me`` (media extensions), ``+gfx``, ``-me``, ``+me.all`` or none."""


@dataclass(frozen=True, slots=True)
class MigPlacement:
    """Where a MIG device's GPU instance sits on its GPU (``nvmlGpuInstanceGetInfo``), in memory slices."""

    start: int
    """Its first memory slice."""
    memory_slices: int


@dataclass(frozen=True, slots=True)
class MigDeviceRecord:
    """What NVML and the driver's capability files said about one MIG device; ``error`` set: served Unhealthy."""

    index: int
    """Its slot on the parent (``nvmlDeviceGetMigDeviceHandleByIndex``)."""
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    gpu_instance_slices: int
    compute_instance_slices: int
    memory_mib: int
    gi_cap_minor: int | None = None
    ci_cap_minor: int | None = None
    placement: MigPlacement | None = None
    """None where the GPU's MIG devices are published without counters (``with_placements`` says when)."""
    error: str | None = None


def read_instance_profiles(nvml: Any, handle: Any) -> tuple[GpuInstanceProfile, ...]:
    """Every GPU-instance profile the GPU offers; works with MIG disabled, and is empty on GPUs without MIG."""
    variants = {getattr(nvml, name): suffix for name, suffix in _VARIANTS.items() if hasattr(nvml, name)}
    profiles = []
    for profile_id in range(int(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT)):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile_id)
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
            # Profiles this GPU (or this driver) does not have; a GPU without MIG answers NotSupported to all.
            continue
        if int(info.instanceCount) == 0:
            continue
        profiles.append(
            GpuInstanceProfile(
                profile_id=profile_id,
                slice_count=int(info.sliceCount),
                memory_mib=int(info.memorySizeMB),
                instance_count=int(info.instanceCount),
                variant=variants.get(profile_id, ""),
            )
        )
    return tuple(profiles)


def read_cap_minor(path: Path) -> int:
    """The ``DeviceFileMinor`` of one capability file; raises OSError or ValueError when it has none."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "DeviceFileMinor":
            return int(value.strip())
    raise ValueError(f"{path} has no DeviceFileMinor line")


def capability_paths(driver_root: str, minor: int, gi: int, ci: int) -> tuple[Path, Path]:
    """The access files of a GPU instance and of its compute instance, for the GPU with device minor ``minor``."""
    gi_dir = Path(driver_root, CAPABILITIES_DIR, f"gpu{minor}", "mig", f"gi{gi}")
    return gi_dir / "access", gi_dir / f"ci{ci}" / "access"


def read_mig_devices(nvml: Any, settings: NvmlSettings, handle: Any, minor: int) -> tuple[MigDeviceRecord, ...]:
    """The MIG devices of a MIG-enabled GPU, in slot order. Blocking (NVML and /proc); raises NVMLError only when
    the parent cannot be asked at all."""
    records = []
    for index in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except nvml.NVMLError_NotFound:
            continue  # An empty slot.
        records.append(_read_mig_device(nvml, settings, mig, index, minor))
    return with_placements(nvml, handle, records)


def read_placement(nvml: Any, handle: Any, gpu_instance_id: int) -> MigPlacement:
    """Where GPU instance ``gpu_instance_id`` of the GPU ``handle`` sits. Blocking; raises NVMLError."""
    info = nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceGetGpuInstanceById(handle, gpu_instance_id))
    return MigPlacement(start=int(info.placement.start), memory_slices=int(info.placement.size))


def with_placements(nvml: Any, handle: Any, records: Sequence[MigDeviceRecord]) -> tuple[MigDeviceRecord, ...]:
    """``records`` with their GPU instances' placements, so that DRA gives them their GPU's counters; all of the
    GPU's without one where any cannot be read or a GPU instance holds several compute instances (they share its
    memory slices, which counters would hand out to one of them only). All or none: the whole GPU published beside
    placed MIG devices consumes only the slices they cover, so an unplaced sibling could be allocated with it.
    Never raises: an NVML error leaves the GPU's MIG devices published flat, as they are without counters."""
    shared = sorted(gi for gi, count in Counter(r.gpu_instance_id for r in records).items() if count > 1)
    if shared:
        log.debug("gpu instances split into compute instances; mig devices published without counters", gis=shared)
        return tuple(records)
    placed = []
    for record in records:
        try:
            placement = read_placement(nvml, handle, record.gpu_instance_id)
        except nvml.NVMLError as error:
            log.debug(
                "mig placement unreadable; mig devices published without counters",
                uuid=record.uuid,
                gi=record.gpu_instance_id,
                error=str(error),
            )
            return tuple(records)
        placed.append(replace(record, placement=placement))
    return tuple(placed)


def _read_mig_device(nvml: Any, settings: NvmlSettings, mig: Any, index: int, minor: int) -> MigDeviceRecord:
    uuid = as_str(nvml.nvmlDeviceGetUUID(mig))
    gi = int(nvml.nvmlDeviceGetGpuInstanceId(mig))
    ci = int(nvml.nvmlDeviceGetComputeInstanceId(mig))
    attributes = nvml.nvmlDeviceGetAttributes(mig)
    record = MigDeviceRecord(
        index=index,
        uuid=uuid,
        gpu_instance_id=gi,
        compute_instance_id=ci,
        gpu_instance_slices=int(attributes.gpuInstanceSliceCount),
        compute_instance_slices=int(attributes.computeInstanceSliceCount),
        memory_mib=int(attributes.memorySizeMB),
    )
    gi_path, ci_path = capability_paths(settings.driver_root, minor, gi, ci)
    try:
        gi_minor, ci_minor = read_cap_minor(gi_path), read_cap_minor(ci_path)
    except (OSError, ValueError) as error:
        # Without its capability nodes no container can open the MIG device: serve it, but Unhealthy.
        log.warning("mig capability unreadable; serving it unhealthy", uuid=uuid, gi=gi, ci=ci, error=str(error))
        return replace(record, error=f"MIG capability unreadable: {error}")
    return replace(record, gi_cap_minor=gi_minor, ci_cap_minor=ci_minor)


def mig_spec(
    settings: NvmlSettings, device_id: str, minor: int, record: MigDeviceRecord, control: tuple[DeviceNode, ...]
) -> ContainerSpec:
    """The parent's ``/dev/nvidiaN`` and the two capability nodes always (no container opens a MIG device
    without them), the control nodes as for whole GPUs."""
    paths = [f"/dev/nvidia{minor}"]
    paths += [CAPS_NODE.format(minor=m) for m in (record.gi_cap_minor, record.ci_cap_minor) if m is not None]
    nodes = tuple(DeviceNode(host_path=host_path(settings.device_root, p), container_path=p) for p in paths)
    return ContainerSpec(list_env=frozen_mapping({VISIBLE_DEVICES: device_id}), device_nodes=(*nodes, *control))
