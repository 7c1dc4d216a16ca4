"""The CDI spec of one prepared claim: a file per claim, one CDI device per request of the claim.

Per request, because the kubelet gives a container the CDI devices of the requests it names: a container naming
one request of a claim must not see the GPUs of another. Not per GPU: CDI applies each device's environment in
turn, so ``NVIDIA_VISIBLE_DEVICES`` listing every GPU of a request must come from a single device. Files are
written with the CDI writer's atomic replace and removed on unprepare.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiofiles.os

from gpuplugin.core.model import ContainerSpec, Device, Mount, frozen_mapping, merge_specs
from gpuplugin.devices.cdi import CDI_VERSION, render, write_atomically
from gpuplugin.devices.mps import MEMORY_LIMIT, PIPE_DIRECTORY, THREAD_PERCENTAGE
from gpuplugin.devices.strategies import cdi_device_node
from gpuplugin.dra.driver import CDI_CLASS, DriverSettings
from gpuplugin.dra.sharing import MPS, STRATEGY_ENV, ClaimSharing, MpsShare, time_slicing_env


def spec_path(settings: DriverSettings, claim_uid: str) -> Path:
    """``<vendor>-claim_<uid>.json``: CDI's own naming, one file per claim so unprepare removes exactly it."""
    return settings.cdi_dir / f"{settings.cdi_vendor}-{CDI_CLASS}_{claim_uid}.json"


def cdi_device_name(claim_uid: str, request: str) -> str:
    """``<uid>-<request>``; a subrequest's ``/`` (``gpu/large``) becomes ``_``, which CDI names allow."""
    return f"{claim_uid}-{request.replace('/', '_')}"


def cdi_device_id(settings: DriverSettings, claim_uid: str, request: str) -> str:
    """The fully qualified CDI device name the kubelet passes to the runtime for the devices of one request."""
    return f"{settings.cdi_kind}={cdi_device_name(claim_uid, request)}"


def claim_edits(spec: ContainerSpec, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The containerEdits of a claim's merged container spec: environment (with ``extra_env``), device nodes and
    mounts."""
    edits: dict[str, Any] = {}
    env = {**spec.env, **spec.list_env, **(extra_env or {})}
    if env:
        edits["env"] = [f"{key}={value}" for key, value in sorted(env.items())]
    if spec.device_nodes:
        edits["deviceNodes"] = [cdi_device_node(node) for node in spec.device_nodes]
    if spec.mounts:
        edits["mounts"] = [
            {
                "hostPath": mount.host_path,
                "containerPath": mount.container_path,
                "options": ["ro" if mount.read_only else "rw", "nosuid", "nodev", "bind"],
            }
            for mount in spec.mounts
        ]
    return edits


def gpu_uuid(device: Device) -> str:
    """The UUID of the GPU (or MIG device) ``device`` is: what MPS and ``nvidia-smi`` name it by."""
    return device.attributes.get("uuid") or device.gpu


def mps_client_spec(spec: ContainerSpec, devices: Sequence[Device], share: MpsShare, pipe: Path) -> ContainerSpec:
    """``spec`` plus what a client of the claim's MPS server needs: the pipe directory (mounted at the same path, so
    the variable names it on the node and in the container alike) and the request's share. Memory limits name
    GPUs by their ordinal in the container, the order of the request's devices."""
    env = {**spec.env, STRATEGY_ENV: MPS, PIPE_DIRECTORY: str(pipe)}
    if share.thread_percentage is not None:
        env[THREAD_PERCENTAGE] = str(share.thread_percentage)
    limits = [
        f"{ordinal}={share.pinned_mib[uuid]}M"
        for ordinal, uuid in enumerate(gpu_uuid(device) for device in devices)
        if uuid in share.pinned_mib
    ]
    if limits:
        env[MEMORY_LIMIT] = ",".join(limits)
    mount = Mount(host_path=str(pipe), container_path=str(pipe), read_only=False)
    return dataclasses.replace(spec, env=frozen_mapping(env), mounts=(*spec.mounts, mount))


def claim_spec(
    settings: DriverSettings,
    claim_uid: str,
    requests: Mapping[str, Sequence[Device]],
    sharing: ClaimSharing | None = None,
    mps_pipe: Path | None = None,
) -> dict[str, Any]:
    """The CDI spec of a claim given its devices by request, how its requests are shared, and the pipe directory of
    its MPS server (for MPS requests); raises SpecConflict when the specs of one request's devices disagree."""
    shared = sharing or ClaimSharing()
    devices = []
    for request, of_request in requests.items():
        spec = merge_specs(device.spec for device in of_request)
        share = shared.mps.get(request)
        if share is not None and mps_pipe is not None:
            spec = mps_client_spec(spec, of_request, share, mps_pipe)
        interval = shared.time_slicing.get(request)
        extra = time_slicing_env(interval) if interval is not None else None
        devices.append({"name": cdi_device_name(claim_uid, request), "containerEdits": claim_edits(spec, extra)})
    return {"cdiVersion": CDI_VERSION, "kind": settings.cdi_kind, "devices": devices}


async def write_claim_spec(
    settings: DriverSettings,
    claim_uid: str,
    requests: Mapping[str, Sequence[Device]],
    sharing: ClaimSharing | None = None,
    mps_pipe: Path | None = None,
) -> None:
    """Write the claim's spec atomically; raises OSError or SpecConflict."""
    content = render(claim_spec(settings, claim_uid, requests, sharing, mps_pipe), "json")
    await aiofiles.os.makedirs(settings.cdi_dir, exist_ok=True)
    await write_atomically(spec_path(settings, claim_uid), content)


async def remove_claim_spec(settings: DriverSettings, claim_uid: str) -> None:
    """Remove the claim's spec; a spec already gone is fine (unprepare is idempotent). Raises OSError."""
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(spec_path(settings, claim_uid))
