"""A fake ``pynvml`` for tests, CI and demos: the same calls, constants and error classes, with scripted GPUs.

Inject it where the module goes (``NvmlBackend(settings, policy, nvml=FakeNvml([...]))``). The error classes are
pynvml's own (``FakeNvml.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost``), so code catches the same classes
whichever module it was given; importing pynvml loads no library. Every call is thread-safe, as NVML's are, and
calls before ``nvmlInit`` raise Uninitialized, as NVML does. What can be scripted:

- GPUs (``FakeGpu``): UUID, minor number, PCI bus id, name, memory, compute capability, MIG mode (or
  NotSupported), supported event types, NVLink links (remote bus id per link, or NotSupported), and failures:
  ``lost`` (every call on it raises GPU_IS_LOST) or ``errors`` (call name → NVML error code).
- MIG: each GPU's GPU-instance profiles (``instance_profiles``, an H200's by default; answered whatever the MIG
  mode, as on a real H200) and its MIG devices (``mig_devices``: UUID, GPU and compute instance, slices, memory,
  the GPU instance's placement), whose handles answer UUID, instance IDs and attributes; the parent's GPU
  instances answer their placement (``nvmlDeviceGetGpuInstanceById``, ``nvmlGpuInstanceGetInfo``).
  ``write_mig_capabilities`` writes the driver's ``/proc/driver/nvidia/capabilities`` files for them under a
  temporary driver root.
- Topology: the common-ancestor level of each pair of UUIDs (``NVML_TOPOLOGY_SYSTEM`` where not given).
- The library: ``init_error`` makes ``nvmlInit`` raise that code (LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, …);
  ``errors`` makes any other call that is not about one GPU raise (``nvmlDeviceGetCount``, ``nvmlEventSetCreate``).
- Events: ``emit_xid``, ``emit_ecc``, ``emit_mig_change`` queue an event on every live event set where that GPU
  registered that type (like NVML, nothing is queued otherwise); ``fail_waits`` makes waits raise a code (a number
  of times or until ``clear_wait_failures``); ``break_waits`` makes them raise an exception that is not NVML's (a
  bug, a MemoryError), which ends the health thread; a wait on a set holding a lost GPU raises GPU_IS_LOST.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

_WHOLE_GPU = 0xFFFFFFFF
_MIB = 1024 * 1024
#: In ``FakeGpu.nvlinks``: a link to an NVSwitch (as on HGX boards) rather than to another GPU.
NVSWITCH = "nvswitch"
#: The PCI bus id a link to an NVSwitch reports as its remote end.
NVSWITCH_BUS_ID = "00000000:C0:00.0"


@dataclass(frozen=True, slots=True)
class FakeGpuInstanceProfile:
    """Shaped like ``pynvml.c_nvmlGpuInstanceProfileInfo_v2_t`` (the fields the backend reads)."""

    # NVML's field names.
    id: int
    sliceCount: int
    instanceCount: int
    memorySizeMB: int
    isP2pSupported: int = 0


#: What ``nvmlDeviceGetGpuInstanceProfileInfo`` answered on the field reference's H200 (MIG disabled).
H200_INSTANCE_PROFILES: Mapping[int, FakeGpuInstanceProfile] = {
    p.id: p
    for p in (
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1, 7, 16384),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2, 3, 33280),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 2, 71424),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4, 1, 71424),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7, 1, 143360),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 1, 16384),
        FakeGpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 1, 4, 33280),
    )
}


@dataclass(frozen=True, slots=True)
class FakeMigDevice:
    """One MIG device of a MIG-enabled fake GPU; its slot is its position in ``FakeGpu.mig_devices``."""

    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    gpu_instance_slices: int
    memory_mib: int
    compute_instance_slices: int | None = None
    """None: the compute instance spans the whole GPU instance."""
    placement: tuple[int, int] | None = None
    """Its GPU instance's first memory slice and how many it covers, as ``nvmlGpuInstanceGetInfo`` answers; None
    makes that call raise NOT_SUPPORTED."""


@dataclass(frozen=True, slots=True)
class FakeDeviceAttributes:
    """Shaped like ``pynvml.c_nvmlDeviceAttributes`` (the fields the backend reads)."""

    # NVML's field names.
    gpuInstanceSliceCount: int
    computeInstanceSliceCount: int
    memorySizeMB: int
    multiprocessorCount: int = 0


@dataclass(frozen=True, slots=True)
class FakeGpuInstancePlacement:
    """Shaped like ``pynvml.c_nvmlGpuInstancePlacement_t``."""

    start: int
    size: int


@dataclass(frozen=True, slots=True)
class FakeGpuInstanceInfo:
    """Shaped like ``pynvml.c_nvmlGpuInstanceInfo_t`` (the fields the backend reads)."""

    id: int
    placement: FakeGpuInstancePlacement


#: The MIG slots an H100/H200 has.
MAX_MIG_DEVICES = 7


@dataclass
class FakeGpu:
    """One scripted GPU; change its fields (under ``FakeNvml.lock``) to change what NVML answers."""

    uuid: str
    minor: int
    bus_id: str
    """As NVML spells it: ``00000000:00:06.0``."""
    name: str = "NVIDIA H200"
    memory_mib: int = 143771
    compute_capability: tuple[int, int] = (9, 0)
    mig_mode: int | None = pynvml.NVML_DEVICE_MIG_DISABLE
    """Current MIG mode; None raises NotSupported (GPUs without MIG)."""
    supported_events: int = 0xFF9F
    """What ``nvmlDeviceGetSupportedEventTypes`` answers (an H200's value)."""
    nvlinks: tuple[str | None, ...] | None = None
    """Per link: the remote GPU's PCI bus id (or ``NVSWITCH``) if the link is active, None if inactive; None for
    no NVLink at all (NotSupported)."""
    lost: bool = False
    """Every call on this GPU raises GPU_IS_LOST."""
    errors: dict[str, int] = field(default_factory=dict)
    """Call name → NVML error code that call raises for this GPU."""
    instance_profiles: dict[int, FakeGpuInstanceProfile] = field(default_factory=lambda: dict(H200_INSTANCE_PROFILES))
    """Profile ID → what ``nvmlDeviceGetGpuInstanceProfileInfo`` answers; others (and all without MIG) NotSupported."""
    mig_devices: list[FakeMigDevice] = field(default_factory=list)
    """MIG devices by slot; answered only while MIG is enabled."""


@dataclass(frozen=True, slots=True)
class FakeHandle:
    uuid: str


@dataclass(frozen=True, slots=True)
class FakeMigHandle:
    parent: str
    """The parent GPU's UUID."""
    uuid: str


@dataclass(frozen=True, slots=True)
class FakeGpuInstanceHandle:
    parent: str
    """The parent GPU's UUID."""
    id: int


@dataclass(frozen=True, slots=True)
class FakeEventData:
    """Shaped like ``pynvml.c_nvmlEventData_t``."""

    device: FakeHandle
    # NVML's field names.
    eventType: int
    eventData: int = 0
    gpuInstanceId: int = _WHOLE_GPU
    computeInstanceId: int = _WHOLE_GPU


@dataclass(frozen=True, slots=True)
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass(frozen=True, slots=True)
class FakePciInfo:
    # NVML's field names.
    busId: str
    busIdLegacy: str
    domain: int
    bus: int
    device: int


@dataclass(eq=False)
class FakeEventSet:
    registered: dict[str, int] = field(default_factory=dict)
    pending: deque[FakeEventData] = field(default_factory=deque)
    freed: bool = False


def _pci_info(bus_id: str) -> FakePciInfo:
    domain, bus, rest = bus_id.split(":")
    return FakePciInfo(
        busId=bus_id, busIdLegacy=bus_id[-12:], domain=int(domain, 16), bus=int(bus, 16), device=int(rest[:2], 16)
    )


class FakeNvml:
    """A module-like stand-in for ``pynvml``; see the module docstring for what it scripts."""

    NVMLError = pynvml.NVMLError
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_LibRmVersionMismatch = pynvml.NVMLError_LibRmVersionMismatch
    NVMLError_Unknown = pynvml.NVMLError_Unknown

    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN

    nvmlEventTypeSingleBitEccError = pynvml.nvmlEventTypeSingleBitEccError
    nvmlEventTypeDoubleBitEccError = pynvml.nvmlEventTypeDoubleBitEccError
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError
    nvmlEventMigConfigChange = pynvml.nvmlEventMigConfigChange
    nvmlEventTypeNone = pynvml.nvmlEventTypeNone
    nvmlEventTypeAll = pynvml.nvmlEventTypeAll

    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS
    NVML_NVLINK_DEVICE_TYPE_GPU = pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
    NVML_NVLINK_DEVICE_TYPE_SWITCH = pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
    NVML_FEATURE_DISABLED = pynvml.NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_TOPOLOGY_INTERNAL = pynvml.NVML_TOPOLOGY_INTERNAL
    NVML_TOPOLOGY_SINGLE = pynvml.NVML_TOPOLOGY_SINGLE
    NVML_TOPOLOGY_MULTIPLE = pynvml.NVML_TOPOLOGY_MULTIPLE
    NVML_TOPOLOGY_HOSTBRIDGE = pynvml.NVML_TOPOLOGY_HOSTBRIDGE
    NVML_TOPOLOGY_NODE = pynvml.NVML_TOPOLOGY_NODE
    NVML_TOPOLOGY_SYSTEM = pynvml.NVML_TOPOLOGY_SYSTEM

    def __init__(
        self,
        gpus: Sequence[FakeGpu] = (),
        *,
        topology: Mapping[frozenset[str], int] | None = None,
        init_error: int | None = None,
        driver_version: str = "580.159.04",
        cuda_driver_version: int = 13000,
    ) -> None:
        self.lock = threading.Condition()
        """Guards every field; changing GPUs while calls run must happen under it."""
        self.gpus = list(gpus)
        self.topology = dict(topology or {})
        self.init_error = init_error
        self.errors: dict[str, int] = {}
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        """As NVML gives it: 1000 x major + 10 x minor (13000 is CUDA 13.0)."""
        self.calls: Counter[str] = Counter()
        """How often each call was made, successful or not."""
        self.event_sets: list[FakeEventSet] = []
        self._init_count = 0
        self._wait_errors: deque[int] = deque()
        self._wait_error: int | None = None
        self._wait_breaks: deque[Exception] = deque()
        self._wait_break: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        # Constants and error classes this class does not spell out still come from pynvml; functions do not,
        # so a call the fake does not implement fails loudly instead of reaching for a library.
        if name.startswith(("NVML_", "NVMLError", "nvmlEventType", "nvmlEventMig")) and hasattr(pynvml, name):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvml has no {name}; add it to backends/nvml/fake.py")

    # Scripting

    @property
    def initialized(self) -> bool:
        with self.lock:
            return self._init_count > 0

    def gpu(self, uuid: str) -> FakeGpu:
        with self.lock:
            for gpu in self.gpus:
                if gpu.uuid == uuid:
                    return gpu
        raise KeyError(uuid)

    def lose(self, uuid: str, lost: bool = True) -> None:
        """The GPU falls off the bus (or, with ``lost=False``, answers again)."""
        with self.lock:
            self.gpu(uuid).lost = lost
            self.lock.notify_all()

    def set_mig_mode(self, uuid: str, mode: int | None) -> None:
        with self.lock:
            self.gpu(uuid).mig_mode = mode

    def emit(self, uuid: str, event_type: int, data: int = 0, instance: tuple[int, int] | None = None) -> int:
        """Queue an event on every live set where the GPU registered its type; returns on how many sets."""
        gi, ci = instance if instance is not None else (_WHOLE_GPU, _WHOLE_GPU)
        event = FakeEventData(FakeHandle(uuid), event_type, data, gi, ci)
        with self.lock:
            delivered = 0
            for event_set in self.event_sets:
                if not event_set.freed and event_set.registered.get(uuid, 0) & event_type:
                    event_set.pending.append(event)
                    delivered += 1
            self.lock.notify_all()
            return delivered

    def emit_xid(self, uuid: str, xid: int, instance: tuple[int, int] | None = None) -> int:
        return self.emit(uuid, self.nvmlEventTypeXidCriticalError, xid, instance)

    def emit_ecc(self, uuid: str, *, double_bit: bool) -> int:
        kind = self.nvmlEventTypeDoubleBitEccError if double_bit else self.nvmlEventTypeSingleBitEccError
        return self.emit(uuid, kind)

    def emit_mig_change(self, uuid: str) -> int:
        return self.emit(uuid, self.nvmlEventMigConfigChange)

    def registered(self, uuid: str) -> int:
        """The event types the GPU has registered on live sets."""
        with self.lock:
            mask = 0
            for event_set in self.event_sets:
                if not event_set.freed:
                    mask |= event_set.registered.get(uuid, 0)
            return mask

    def live_event_sets(self) -> int:
        with self.lock:
            return sum(not s.freed for s in self.event_sets)

    def fail_waits(self, code: int, times: int | None = None) -> None:
        """Waits raise ``code``: the next ``times`` ones, or every one until ``clear_wait_failures``."""
        with self.lock:
            if times is None:
                self._wait_error = code
            else:
                self._wait_errors.extend([code] * times)
            self.lock.notify_all()

    def break_waits(self, error: Exception, times: int | None = 1) -> None:
        """Waits raise ``error``, not an NVML error: the next ``times`` ones, or every one until
        ``clear_wait_failures``."""
        with self.lock:
            if times is None:
                self._wait_break = error
            else:
                self._wait_breaks.extend([error] * times)
            self.lock.notify_all()

    def clear_wait_failures(self) -> None:
        with self.lock:
            self._wait_error = None
            self._wait_errors.clear()
            self._wait_break = None
            self._wait_breaks.clear()

    # Internals

    def _enter(self, call: str) -> None:
        """Count a call, check NVML is initialised and apply a library-wide scripted error (lock held)."""
        self.calls[call] += 1
        if self._init_count == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if call in self.errors:
            raise pynvml.NVMLError(self.errors[call])

    def _device(self, call: str, handle: FakeHandle) -> FakeGpu:
        self._enter(call)
        if not isinstance(handle, FakeHandle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for gpu in self.gpus:
            if gpu.uuid == handle.uuid:
                return self._check(call, gpu)
        # A handle whose GPU has gone from the bus.
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def _mig(self, call: str, handle: FakeMigHandle) -> FakeMigDevice:
        """The MIG device a handle names; like NVML, a handle outlives neither its parent nor a MIG change."""
        for mig in self._live_migs(call, handle, FakeMigHandle):
            if mig.uuid == handle.uuid:
                return mig
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _live_migs(
        self, call: str, handle: FakeMigHandle | FakeGpuInstanceHandle, kind: type[object]
    ) -> list[FakeMigDevice]:
        """The MIG devices of the GPU a MIG-device or GPU-instance handle of ``kind`` hangs from (lock held)."""
        self._enter(call)
        if not isinstance(handle, kind):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for gpu in self.gpus:
            if gpu.uuid == handle.parent:
                self._check(call, gpu)
                return gpu.mig_devices if gpu.mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE else []
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    @staticmethod
    def _check(call: str, gpu: FakeGpu) -> FakeGpu:
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in gpu.errors:
            raise pynvml.NVMLError(gpu.errors[call])
        return gpu

    # The NVML calls

    def nvmlInit(self) -> None:
        with self.lock:
            self.calls["nvmlInit"] += 1
            if self.init_error is not None:
                raise pynvml.NVMLError(self.init_error)
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        with self.lock:
            self._enter("nvmlShutdown")
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        with self.lock:
            self._enter("nvmlSystemGetDriverVersion")
            return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        with self.lock:
            self._enter("nvmlSystemGetCudaDriverVersion")
            return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        with self.lock:
            self._enter("nvmlDeviceGetCount")
            return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        with self.lock:
            self._enter("nvmlDeviceGetHandleByIndex")
            if not 0 <= index < len(self.gpus):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return FakeHandle(self._check("nvmlDeviceGetHandleByIndex", self.gpus[index]).uuid)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        with self.lock:
            self._enter("nvmlDeviceGetHandleByUUID")
            for gpu in self.gpus:
                if gpu.uuid == text:
                    return FakeHandle(self._check("nvmlDeviceGetHandleByUUID", gpu).uuid)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeHandle | FakeMigHandle) -> str:
        with self.lock:
            if isinstance(handle, FakeMigHandle):
                return self._mig("nvmlDeviceGetUUID", handle).uuid
            return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: FakeHandle, profile: int) -> FakeGpuInstanceProfile:
        with self.lock:
            gpu = self._device("nvmlDeviceGetGpuInstanceProfileInfo", device)
            if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if gpu.mig_mode is None or profile not in gpu.instance_profiles:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return gpu.instance_profiles[profile]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeHandle) -> int:
        with self.lock:
            gpu = self._device("nvmlDeviceGetMaxMigDeviceCount", device)
            if gpu.mig_mode is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return max(MAX_MIG_DEVICES, len(gpu.mig_devices))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeHandle, index: int) -> FakeMigHandle:
        with self.lock:
            gpu = self._device("nvmlDeviceGetMigDeviceHandleByIndex", device)
            if gpu.mig_mode is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if not 0 <= index < max(MAX_MIG_DEVICES, len(gpu.mig_devices)):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE or index >= len(gpu.mig_devices):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return FakeMigHandle(gpu.uuid, gpu.mig_devices[index].uuid)

    def nvmlDeviceGetGpuInstanceId(self, device: FakeMigHandle) -> int:
        with self.lock:
            return self._mig("nvmlDeviceGetGpuInstanceId", device).gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, device: FakeMigHandle) -> int:
        with self.lock:
            return self._mig("nvmlDeviceGetComputeInstanceId", device).compute_instance_id

    def nvmlDeviceGetGpuInstanceById(self, device: FakeHandle, gpuInstanceId: int) -> FakeGpuInstanceHandle:
        with self.lock:
            gpu = self._device("nvmlDeviceGetGpuInstanceById", device)
            if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if all(mig.gpu_instance_id != gpuInstanceId for mig in gpu.mig_devices):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return FakeGpuInstanceHandle(gpu.uuid, gpuInstanceId)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: FakeGpuInstanceHandle) -> FakeGpuInstanceInfo:
        with self.lock:
            migs = self._live_migs("nvmlGpuInstanceGetInfo", gpuInstance, FakeGpuInstanceHandle)
            # Like NVML, a GPU-instance handle does not outlive its instance (a MIG change).
            mig = next((m for m in migs if m.gpu_instance_id == gpuInstance.id), None)
            if mig is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if mig.placement is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return FakeGpuInstanceInfo(mig.gpu_instance_id, FakeGpuInstancePlacement(*mig.placement))

    def nvmlDeviceGetAttributes(self, device: FakeMigHandle) -> FakeDeviceAttributes:
        with self.lock:
            mig = self._mig("nvmlDeviceGetAttributes", device)
            ci_slices = mig.compute_instance_slices
            return FakeDeviceAttributes(
                gpuInstanceSliceCount=mig.gpu_instance_slices,
                computeInstanceSliceCount=mig.gpu_instance_slices if ci_slices is None else ci_slices,
                memorySizeMB=mig.memory_mib,
            )

    def nvmlDeviceGetMinorNumber(self, handle: FakeHandle) -> int:
        with self.lock:
            return self._device("nvmlDeviceGetMinorNumber", handle).minor

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> FakePciInfo:
        with self.lock:
            return _pci_info(self._device("nvmlDeviceGetPciInfo", handle).bus_id)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        with self.lock:
            return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> FakeMemory:
        with self.lock:
            total = self._device("nvmlDeviceGetMemoryInfo", handle).memory_mib * _MIB
            return FakeMemory(total=total, free=total, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeHandle) -> tuple[int, int]:
        with self.lock:
            return self._device("nvmlDeviceGetCudaComputeCapability", handle).compute_capability

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        with self.lock:
            mode = self._device("nvmlDeviceGetMigMode", handle).mig_mode
            if mode is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return [mode, mode]

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: FakeHandle, device2: FakeHandle) -> int:
        with self.lock:
            a = self._device("nvmlDeviceGetTopologyCommonAncestor", device1)
            b = self._device("nvmlDeviceGetTopologyCommonAncestor", device2)
            level: int = self.topology.get(frozenset((a.uuid, b.uuid)), pynvml.NVML_TOPOLOGY_SYSTEM)
            return level

    def _link(self, call: str, handle: FakeHandle, link: int) -> str | None:
        gpu = self._device(call, handle)
        if gpu.nvlinks is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(gpu.nvlinks):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkState(self, device: FakeHandle, link: int) -> int:
        with self.lock:
            remote = self._link("nvmlDeviceGetNvLinkState", device, link)
            state: int = pynvml.NVML_FEATURE_ENABLED if remote is not None else pynvml.NVML_FEATURE_DISABLED
            return state

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: FakeHandle, link: int) -> FakePciInfo:
        with self.lock:
            remote = self._link("nvmlDeviceGetNvLinkRemotePciInfo", device, link)
            if remote is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return _pci_info(NVSWITCH_BUS_ID if remote == NVSWITCH else remote)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: FakeHandle, link: int) -> int:
        with self.lock:
            remote = self._link("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
            if remote is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            kind: int = (
                pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH if remote == NVSWITCH else pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
            )
            return kind

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        with self.lock:
            return self._device("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        with self.lock:
            self._enter("nvmlEventSetCreate")
            event_set = FakeEventSet()
            self.event_sets.append(event_set)
            return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:
        with self.lock:
            gpu = self._device("nvmlDeviceRegisterEvents", handle)
            self._live(eventSet)
            if eventTypes & ~gpu.supported_events:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            eventSet.registered[gpu.uuid] = eventSet.registered.get(gpu.uuid, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: FakeEventSet, timeoutms: int) -> FakeEventData:
        deadline = time.monotonic() + timeoutms / 1000
        with self.lock:
            self._enter("nvmlEventSetWait_v2")
            while True:
                self._live(eventSet)
                if self._wait_breaks:
                    raise self._wait_breaks.popleft()
                if self._wait_break is not None:
                    raise self._wait_break
                if self._wait_errors:
                    raise pynvml.NVMLError(self._wait_errors.popleft())
                if self._wait_error is not None:
                    raise pynvml.NVMLError(self._wait_error)
                if any(gpu.lost and gpu.uuid in eventSet.registered for gpu in self.gpus):
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
                if eventSet.pending:
                    return eventSet.pending.popleft()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
                self.lock.wait(remaining)

    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        with self.lock:
            self._enter("nvmlEventSetFree")
            self._live(eventSet)
            eventSet.freed = True

    @staticmethod
    def _live(event_set: FakeEventSet) -> None:
        if not isinstance(event_set, FakeEventSet) or event_set.freed:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)


def h200_node(count: int = 2, *, nvlinks_per_pair: int = 18) -> FakeNvml:
    """GPUs as the field reference's H200 node showed them: NV18 between each pair, common ancestor HOSTBRIDGE."""
    if nvlinks_per_pair * (count - 1) > pynvml.NVML_NVLINK_MAX_LINKS:
        raise ValueError(f"{count} GPUs with {nvlinks_per_pair} links a pair exceed NVML_NVLINK_MAX_LINKS")
    bus_ids = [f"00000000:00:{6 + i:02X}.0" for i in range(count)]
    gpus = [
        FakeGpu(
            uuid=f"GPU-{i:08x}-0000-4000-8000-{i:012x}",
            minor=i,
            bus_id=bus_ids[i],
            nvlinks=tuple(bus_ids[j] for j in range(count) if j != i for _ in range(nvlinks_per_pair)) or None,
        )
        for i in range(count)
    ]
    topology = {frozenset((a.uuid, b.uuid)): pynvml.NVML_TOPOLOGY_HOSTBRIDGE for a in gpus for b in gpus if a != b}
    return FakeNvml(gpus, topology=topology)


def mig_cap_minors(gpu_minor: int, gpu_instance: int, compute_instance: int) -> tuple[int, int]:
    """The capability minors the driver's ``mig-minors`` table gives a GPU instance and its compute instance:
    1 and 2 are config and monitor, then per GPU 15 GPU instances of 1 + 8 compute-instance minors each."""
    gi_minor = 3 + gpu_minor * 15 * 9 + gpu_instance * 9
    return gi_minor, gi_minor + 1 + compute_instance


def write_mig_capabilities(driver_root: Path, gpu: FakeGpu) -> dict[str, tuple[int, int]]:
    """Write the driver's capability files of ``gpu``'s MIG devices under ``driver_root``; MIG UUID → minors."""
    written = {}
    for mig in gpu.mig_devices:
        gi_minor, ci_minor = mig_cap_minors(gpu.minor, mig.gpu_instance_id, mig.compute_instance_id)
        gi_dir = (
            driver_root / "proc/driver/nvidia/capabilities" / f"gpu{gpu.minor}" / "mig" / f"gi{mig.gpu_instance_id}"
        )
        ci_dir = gi_dir / f"ci{mig.compute_instance_id}"
        ci_dir.mkdir(parents=True, exist_ok=True)
        for directory, minor in ((gi_dir, gi_minor), (ci_dir, ci_minor)):
            (directory / "access").write_text(f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
        written[mig.uuid] = (gi_minor, ci_minor)
    return written
