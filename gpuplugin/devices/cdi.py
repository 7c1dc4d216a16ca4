"""The CDI spec writer: a TreeSink that keeps one CDI spec file per CDI kind in step with the served devices.

With a ``cdi-*`` device-list strategy, Allocate names CDI devices instead of passing device nodes; the container
runtime finds what those names mean in the files written here (CDI SPEC.md, version 0.6.0). Files are replaced
atomically, rewritten only when their content changes, and removed when their kind vanishes or the plugin stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import aiofiles
import aiofiles.os
import aiofiles.tempfile
import msgspec
import structlog
from msgspec import Meta

from gpuplugin.core.clock import Backoff
from gpuplugin.core.config import ABSOLUTE, decode
from gpuplugin.core.model import Device, DeviceTree
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.strategies import (
    CDI_DEVICE_NAME,
    CDI_EDITS_ATTRIBUTE,
    CDI_NAME_ATTRIBUTE,
    DEFAULT_CDI_VENDOR,
    VISIBLE_DEVICES,
    DeviceListStrategy,
    cdi_kind,
    container_edits,
)

log = structlog.get_logger("gpuplugin.devices.cdi")

#: 0.6.0 is the first version that allows dots in a class name (``gpu.shared``, ``mig-1g.18gb``).
CDI_VERSION = "0.6.0"
DEFAULT_SPEC_DIR = Path("/var/run/cdi")
SpecFormat = Literal["json", "yaml"]
#: Readable by every runtime component; the file holds no secret.
_FILE_MODE = 0o644


@dataclass(frozen=True, slots=True)
class CdiSettings:
    """Where and how the CDI spec files are written."""

    spec_dir: Path = DEFAULT_SPEC_DIR
    """Directory of the spec files; ``/var/run/cdi`` is where runtimes look for transient, generated specs."""
    format: SpecFormat = "json"
    """File format; runtimes read both, JSON needs no YAML parser to check by hand."""
    retry_first_s: float = 1.0
    """Seconds (above 0), the ceiling of the first wait before writing a failed spec again; doubles, jittered."""
    retry_max_s: float = 30.0
    """Seconds (``retry_first_s`` to 3600), the ceiling of every wait: a directory made writable again is noticed
    within half a minute, and a broken one costs a few syscalls a minute."""

    @classmethod
    def from_mapping(cls, data: Any, path: str = "flags.plugin") -> CdiSettings:
        """Validate ``cdiSpecDir`` and ``cdiSpecFormat`` of a config section (others are left alone).

        Raises ConfigError naming the field.
        """
        section = decode(data, CdiFlags, path)
        return cls(spec_dir=Path(section.cdi_spec_dir), format=section.cdi_spec_format)


class CdiFlags(msgspec.Struct, rename="camel", kw_only=True):
    """The keys of NVIDIA's ``flags.plugin`` read here; the section is shared with other settings, whose keys are
    left alone here (the config file's schema refuses unknown ones)."""

    cdi_spec_dir: Annotated[str, Meta(pattern=ABSOLUTE, description="an absolute directory path")] = str(
        DEFAULT_SPEC_DIR
    )
    cdi_spec_format: SpecFormat = "json"


def spec_writer_for(strategy: DeviceListStrategy, settings: CdiSettings) -> CdiSpecWriter | None:
    """The writer a strategy needs: one when Allocate names CDI devices, else None (nothing to describe)."""
    if not strategy.cdi_enabled:
        return None
    return CdiSpecWriter(settings, vendor=strategy.cdi_vendor)


def spec_file_name(kind: str, spec_format: SpecFormat = "json") -> str:
    """``<vendor>-<class>.<ext>``, the name CDI's own tooling gives a generated spec."""
    vendor, _, cdi_class = kind.partition("/")
    return f"{vendor}-{cdi_class}.{spec_format}"


def build_specs(tree: DeviceTree, vendor: str = DEFAULT_CDI_VENDOR) -> dict[str, dict[str, Any]]:
    """The CDI specs describing ``tree``'s devices, by kind; a kind has one device per runtime ID.

    Replicas of one GPU share its runtime ID and become one CDI device. Devices whose runtime ID is not a valid
    CDI device name are left out (and logged): a runtime would refuse the whole file otherwise.
    """
    devices: dict[str, dict[str, dict[str, Any]]] = {}
    for device in tree.devices:
        kind, name, edits = _describe(device, vendor)
        if name is None or not edits:
            continue
        if not CDI_DEVICE_NAME.match(name):
            log.warning("device left out of the CDI spec: invalid CDI device name", kind=kind, name=name)
            continue
        of_kind = devices.setdefault(kind, {})
        known = of_kind.setdefault(name, edits)
        if known != edits:
            log.warning("devices of one CDI name differ; the first one is described", kind=kind, name=name)
    return {kind: _spec(kind, named) for kind, named in devices.items()}


def render(spec: Mapping[str, Any], spec_format: SpecFormat) -> bytes:
    if spec_format == "yaml":
        import yaml  # here: JSON specs, the default, never load it

        return yaml.safe_dump(dict(spec), sort_keys=False).encode()
    return (json.dumps(spec, indent=2) + "\n").encode()


class CdiSpecWriter:
    """Writes the CDI specs of every published tree; removes what it wrote on close. A TreeSink.

    What failed is kept in ``problem`` (the readiness probe shows it) and retried in the background until a write
    succeeds; ``missing`` tells Allocate which CDI devices have no spec on disk, so it never names one.
    """

    def __init__(self, settings: CdiSettings = CdiSettings(), *, vendor: str = DEFAULT_CDI_VENDOR) -> None:
        self.settings = settings
        self.vendor = vendor
        self._written: dict[Path, bytes] = {}
        """What is on disk, as we last wrote it: a file is rewritten only when its content differs."""
        self._described: dict[Path, frozenset[str]] = {}
        """The CDI device names (``kind=name``) each file on disk describes."""
        self._on_disk: frozenset[str] = frozenset()
        self._problems: dict[Path, str] = {}
        self._tree: DeviceTree | None = None
        self._publishing = asyncio.Lock()
        self._tasks = TaskSet("cdi")
        self._retry: asyncio.Task[None] | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The spec files written and not yet removed."""
        return tuple(self._written)

    @property
    def problem(self) -> str | None:
        """Why the specs on disk differ from the served devices, one line; None when they match."""
        if not self._problems:
            return None
        return "; ".join(f"{path}: {error}" for path, error in sorted(self._problems.items()))

    def missing(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` (CDI device names, ``kind=name``) that no spec file on disk describes."""
        return [name for name in names if name not in self._on_disk]

    async def publish(self, tree: DeviceTree) -> None:
        """Write the specs of ``tree`` that changed and remove those of kinds that vanished.

        Failures are logged and kept in ``problem``, not raised: serving the devices matters more. A background
        retry writes them once it can (and any later tree retries too).
        """
        async with self._publishing:
            self._tree = tree
            await self._publish(tree)
        if self._problems and (self._retry is None or self._retry.done()):
            self._retry = self._tasks.spawn(self._retry_until_written(), "spec retry", expect_end=True)

    async def _publish(self, tree: DeviceTree) -> None:
        specs = build_specs(tree, self.vendor)
        path_of = {kind: self.settings.spec_dir / spec_file_name(kind, self.settings.format) for kind in specs}
        wanted = {path_of[kind]: render(spec, self.settings.format) for kind, spec in specs.items()}
        names = {
            path_of[kind]: frozenset(f"{kind}={d['name']}" for d in spec["devices"]) for kind, spec in specs.items()
        }
        # A kind no longer served is no longer a problem.
        self._problems = {p: error for p, error in self._problems.items() if p in wanted}
        if wanted:
            try:
                await aiofiles.os.makedirs(self.settings.spec_dir, exist_ok=True)
            except OSError as exc:
                error = f"cannot create the directory: {exc.strerror or exc}"
                log.error("cannot create the CDI spec directory", directory=str(self.settings.spec_dir), error=error)
                self._problems = dict.fromkeys(wanted, error)
                self._update_on_disk()
                return
        for path, content in wanted.items():
            if self._written.get(path) != content:
                await self._write(path, content, names[path])
            else:
                self._problems.pop(path, None)
        for path in [p for p in self._written if p not in wanted]:
            await self._remove(path)
        self._update_on_disk()

    def _update_on_disk(self) -> None:
        self._on_disk = frozenset().union(*self._described.values())

    async def _retry_until_written(self) -> None:
        backoff = Backoff(self.settings.retry_first_s, self.settings.retry_max_s)
        while self._problems and self._tree is not None:
            await asyncio.sleep(backoff.next())
            async with self._publishing:
                await self._publish(self._tree)
        log.info("CDI specs in place again", directory=str(self.settings.spec_dir))

    async def aclose(self) -> None:
        """Remove every spec file written: without the plugin, nothing may allocate these devices."""
        await self._tasks.aclose()
        async with self._publishing:
            for path in list(self._written):
                await self._remove(path)
            self._problems.clear()
            self._update_on_disk()

    async def _write(self, path: Path, content: bytes, names: frozenset[str]) -> None:
        try:
            await write_atomically(path, content)
        except OSError as exc:
            log.error("cannot write a CDI spec", file=str(path), error=str(exc))
            self._problems[path] = f"cannot write: {exc.strerror or exc}"
            return
        self._written[path] = content
        self._described[path] = names
        self._problems.pop(path, None)
        log.info("CDI spec written", file=str(path))

    async def _remove(self, path: Path) -> None:
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove a CDI spec", file=str(path), error=str(exc))
            return
        del self._written[path]
        self._described.pop(path, None)
        log.info("CDI spec removed", file=str(path))


async def write_atomically(path: Path, content: bytes, mode: int = _FILE_MODE) -> None:
    """Replace ``path`` with ``content``, so that a reader sees the old file or the new one, never a part.

    Runtimes read spec files at any moment: a temporary file in the same directory is renamed over the target.
    Its name does not end in .json or .yaml, so a runtime scanning the directory ignores it. Raises OSError (the
    temporary file removed).
    """
    temporary: str | None = None
    try:
        async with aiofiles.tempfile.NamedTemporaryFile(
            "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as f:
            temporary = str(f.name)
            await f.write(content)
            await f.flush()
            await aiofiles.os.wrap(os.fsync)(f.fileno())
        await aiofiles.os.wrap(os.chmod)(temporary, mode)
        await aiofiles.os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            await _remove_quietly(temporary)
        raise


def _describe(device: Device, vendor: str) -> tuple[str, str | None, dict[str, Any]]:
    """A device's CDI kind, name and containerEdits: from what a CDI strategy recorded, else from its spec."""
    recorded = device.attributes.get(CDI_NAME_ATTRIBUTE)
    edits_json = device.attributes.get(CDI_EDITS_ATTRIBUTE)
    if recorded is not None and edits_json is not None:
        kind, _, name = recorded.partition("=")
        edits: dict[str, Any] = json.loads(edits_json)
        return kind, name, edits
    runtime_id = device.spec.list_env.get(VISIBLE_DEVICES)
    return cdi_kind(vendor, device.resource), runtime_id, container_edits(device.spec)


def _spec(kind: str, devices: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    common: list[dict[str, Any]] = []
    if len(devices) > 1:
        # Nodes every device needs (/dev/nvidiactl, /dev/nvidia-uvm) are stated once, for any of them.
        first, *others = devices.values()
        common = [
            node
            for node in first.get("deviceNodes", [])
            if all(node in other.get("deviceNodes", []) for other in others)
        ]
    described = []
    for name, edits in devices.items():
        own = dict(edits)
        nodes = [n for n in edits.get("deviceNodes", []) if n not in common]
        if nodes:
            own["deviceNodes"] = nodes
        else:
            own.pop("deviceNodes", None)
        described.append({"name": name, "containerEdits": own})
    spec: dict[str, Any] = {"cdiVersion": CDI_VERSION, "kind": kind, "devices": described}
    if common:
        spec["containerEdits"] = {"deviceNodes": common}
    return spec


async def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        await aiofiles.os.remove(path)
