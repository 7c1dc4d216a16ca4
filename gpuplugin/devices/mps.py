"""MPS: GPUs shared with enforced limits, through NVIDIA's Multi-Process Service, and the control daemons behind it.

Each MPS device (a replica of ``sharing.mps`` or a partition of the partitioned backend on a GPU without MIG)
names its whole GPU to the runtime and tells the CUDA client its share: ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (device
memory, enforced by the MPS server: an allocation beyond it fails) and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (the
share of the GPU's SMs its kernels may use). Clients reach their GPU's control daemon through its pipe directory,
mounted into the container.

One control daemon per GPU, started and supervised here: partitions of different profiles on one GPU are
different resources but must share one MPS server, and a daemon that fails takes down the clients of one GPU only.
Until a daemon answers, every MPS device on its GPU is served Unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import msgspec
import structlog
from msgspec import Meta

from gpuplugin.core.backend import AllocationPolicyKind, Backend, BackendEvent, InventoryChanged, PreferredAllocation
from gpuplugin.core.clock import Backoff
from gpuplugin.core.config import AbsolutePath, Section, Text, decode
from gpuplugin.core.errors import ConfigError, DevicesRefuseConfig
from gpuplugin.core.model import ContainerSpec, Device, DeviceTree, Health, Mount, ResourceRules, frozen_mapping
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.sharing import REPLICA_ATTRIBUTE, ResourceSection, TimeSlicing, TimeSlicingSection

log = structlog.get_logger("gpuplugin.devices.mps")

PIPE_DIRECTORY = "CUDA_MPS_PIPE_DIRECTORY"
LOG_DIRECTORY = "CUDA_MPS_LOG_DIRECTORY"
MEMORY_LIMIT = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
#: The attribute an MPS device carries its GPU's UUID in; its control daemon is that GPU's.
MPS_GPU_ATTRIBUTE = "mps_gpu"
DEFAULT_ROOT = Path("/run/nvidia/mps")
#: Longest probe interval and answer timeout (s): an hour without noticing a dead daemon is a daemon unwatched.
MAX_DAEMON_SECONDS = 3600.0
#: Largest explicit memory limit (MiB): 1 TiB, above any GPU's memory.
MAX_MEMORY_LIMIT_MIB = 1 << 20
#: What the control program prints when no daemon listens on its pipe directory.
_NOT_RUNNING = "Cannot find MPS control daemon"


@dataclass(frozen=True, slots=True)
class MpsShare:
    """One MPS client's share of its GPU."""

    memory_mib: int | None
    """Pinned device memory limit (MiB, ≥ 1); None: no limit (the GPU's memory is unknown)."""
    thread_percentage: int
    """Active thread percentage (1 to 100): the share of the GPU's SMs its kernels may occupy."""


@dataclass(frozen=True, slots=True)
class ControlDaemonSettings:
    """Where the per-GPU MPS control daemons keep their pipes and logs, how they are run and watched."""

    root: Path = DEFAULT_ROOT
    """Host directory (absolute) holding ``<gpu uuid>/pipe`` and ``<gpu uuid>/log``; NVIDIA's ``mpsRoot``."""
    command: tuple[str, ...] = ("nvidia-cuda-mps-control",)
    """The control program with any prefix (``chroot /driver-root nvidia-cuda-mps-control`` in a container)."""
    probe_interval_s: float = 5.0
    """Seconds (above 0, at most 3,600) between liveness queries of a running daemon: how late a dead daemon is
    noticed, at the cost of one short-lived process per GPU per interval."""
    answer_timeout_s: float = 10.0
    """Seconds (above 0, at most 3,600) a started daemon has to answer, and a query to return, before it counts
    as not answering."""
    first_restart_delay_s: float = 1.0
    """Seconds (above 0, at most ``max_restart_delay_s``) before restarting a daemon that did not start."""
    max_restart_delay_s: float = 30.0
    """Seconds (≥ ``first_restart_delay_s``) between restarts of a daemon that keeps failing; the delay doubles from
    ``first_restart_delay_s`` up to this, jittered (``Backoff``) so that the daemons of GPUs failing together do not
    restart in step."""

    def pipe_dir(self, uuid: str) -> Path:
        return self.root / uuid / "pipe"

    def log_dir(self, uuid: str) -> Path:
        return self.root / uuid / "log"

    @classmethod
    def from_mapping(cls, data: Any, path: str) -> ControlDaemonSettings:
        """Read a ``daemon`` section, with camelCase keys (``probeIntervalSeconds``, as ``sharing.mps``) or the
        settings' own names (``probe_interval_s``, as the partitioned backend's section); raises ConfigError."""
        snake = isinstance(data, dict) and any(key in _SNAKE_NAMES for key in data)
        schema: Any = (DaemonOptions if snake else DaemonSection) | None
        section: msgspec.Struct | None = decode(data, schema, path)
        if section is None:
            return cls()
        values = {key: value for key, value in msgspec.structs.asdict(section).items() if value is not None}
        if "root" in values:
            values["root"] = Path(values["root"])
        if "command" in values:
            command = values["command"]
            values["command"] = tuple(command.split() if isinstance(command, str) else command)
        settings = cls(**values)
        if settings.first_restart_delay_s > settings.max_restart_delay_s:
            first, longest = (
                name if snake else _daemon_key(name) for name in ("first_restart_delay_s", "max_restart_delay_s")
            )
            raise ConfigError.at(
                f"{path}.{first}",
                f"must be at most {longest} ({settings.max_restart_delay_s:g}), got {settings.first_restart_delay_s:g}",
            )
        return settings


def _daemon_key(name: str) -> str:
    """``probe_interval_s``: ``probeIntervalSeconds``, as NVIDIA names seconds in its files."""
    words = name.removesuffix("_s").split("_") + (["seconds"] if name.endswith("_s") else [])
    return words[0] + "".join(w.title() for w in words[1:])


DaemonSeconds = Annotated[float, Meta(gt=0, le=MAX_DAEMON_SECONDS, description="seconds")]
#: The control program with any prefix: a string of words, or a list of them.
Command = Text | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]


class DaemonSection(Section, rename=_daemon_key):
    """The ``daemon`` settings of ``sharing.mps``: ControlDaemonSettings' fields, each above 0 and at most an hour:
    longer without noticing a dead daemon is a daemon unwatched."""

    root: AbsolutePath | None = None
    command: Command | None = None
    probe_interval_s: DaemonSeconds | None = None
    answer_timeout_s: DaemonSeconds | None = None
    first_restart_delay_s: DaemonSeconds | None = None
    max_restart_delay_s: DaemonSeconds | None = None


#: The same settings under their own names (``probe_interval_s``), as the partitioned backend's section spells keys.
DaemonOptions = msgspec.defstruct(
    "DaemonOptions",
    [(f.name, f.type, f.default) for f in msgspec.structs.fields(DaemonSection)],
    forbid_unknown_fields=True,
    kw_only=True,
)
_SNAKE_NAMES = frozenset(f.name for f in msgspec.structs.fields(DaemonSection) if f.name != f.encode_name)


def thread_percentage(compute_slices: int, of_slices: int) -> int:
    """A partition's share of the SMs, rounded down so that the shares of a full GPU never sum past 100."""
    return max(1, compute_slices * 100 // of_slices)


def mps_spec(parent: ContainerSpec, uuid: str, share: MpsShare, daemons: ControlDaemonSettings) -> ContainerSpec:
    """The whole GPU's spec plus what an MPS client needs: its limits, the daemon's pipe directory and its mount."""
    pipe = str(daemons.pipe_dir(uuid))
    env = {
        **parent.env,
        PIPE_DIRECTORY: pipe,
        LOG_DIRECTORY: str(daemons.log_dir(uuid)),
        THREAD_PERCENTAGE: str(share.thread_percentage),
    }
    if share.memory_mib is not None:
        # Ordinal 0: the container sees its one GPU, and the daemon's server exposes only that GPU.
        env[MEMORY_LIMIT] = f"0={share.memory_mib}M"
    # Same path inside: the variable then names the mount on the node and in the container alike.
    mount = Mount(host_path=pipe, container_path=pipe, read_only=False)
    return dataclasses.replace(parent, env=frozen_mapping(env), mounts=(*parent.mounts, mount))


@dataclass(frozen=True, slots=True)
class MpsLimits:
    """Explicit limits of one ``sharing.mps`` resource; None: the equal split of the GPU."""

    memory_mib: int | None = None
    """Pinned device memory per replica (MiB, 1 to ``MAX_MEMORY_LIMIT_MIB``)."""
    thread_percentage: int | None = None
    """Active thread percentage per replica (1 to 100)."""
    where: str = field(default="sharing.mps", compare=False)
    """The config entry they come from, for errors found once the GPUs are known."""


class MpsResourceSection(ResourceSection):
    """One entry of ``sharing.mps.resources``: time-slicing's keys and explicit limits of each replica."""

    memory_limit_mib: Annotated[int, Meta(ge=1, le=MAX_MEMORY_LIMIT_MIB, description="MiB")] | None = msgspec.field(
        default=None, name="memoryLimitMiB"
    )
    active_thread_percentage: Annotated[int, Meta(ge=1, le=100, description="percent of the GPU's SMs")] | None = None


class MpsSection(TimeSlicingSection[MpsResourceSection]):
    """NVIDIA's ``sharing.mps``: time-slicing's keys, explicit limits, and the control daemons' settings."""

    daemon: dict[str, Any] | None = None
    """Read by ControlDaemonSettings, which also takes the partitioned backend's spelling of its keys."""


@dataclass(frozen=True, slots=True)
class MpsSharing:
    """NVIDIA's ``sharing.mps``: each GPU of a resource served as N MPS clients with enforced shares; per-GPU
    counts, renames and explicit limits beyond NVIDIA. A TreeTransform (``apply``) of the served tree."""

    replicas: TimeSlicing = field(default_factory=TimeSlicing)
    """Which GPUs become how many replicas, under which names: the same keys as ``sharing.timeSlicing``."""
    limits: Mapping[str, MpsLimits] = field(default_factory=lambda: MappingProxyType({}))
    """Per shared resource name, explicit limits; a resource without one splits its GPU equally."""
    daemons: ControlDaemonSettings = field(default_factory=ControlDaemonSettings)

    @classmethod
    def from_mapping(cls, data: Any, path: str = "sharing.mps", *, root: Path | None = None) -> MpsSharing:
        """Validate the ``mps`` mapping of a config file (``root``: ``flags.mpsRoot``); raises ConfigError."""
        section = decode(data, MpsSection, path)
        daemons = ControlDaemonSettings.from_mapping(section.daemon, f"{path}.daemon")
        if root is not None:
            daemons = dataclasses.replace(daemons, root=root)
        replicas = TimeSlicing.from_section(section, path)
        limits = {
            # Limits are looked up by the name the replicas are served as.
            replicas.served_name(shared): MpsLimits(entry.memory_limit_mib, entry.active_thread_percentage, where)
            for i, (entry, shared) in enumerate(zip(section.resources or (), replicas.resources, strict=True))
            if entry.memory_limit_mib is not None or entry.active_thread_percentage is not None
            for where in [f"{path}.resources[{i}]"]
        }
        return cls(replicas=replicas, limits=MappingProxyType(limits), daemons=daemons)

    def apply(self, tree: DeviceTree) -> DeviceTree:
        """Replace each shared GPU by its MPS replicas; one replica per container, as one client has one share.

        Raises DevicesRefuseConfig when explicit limits of a GPU's replicas add up to more than the GPU has.
        """
        replicated = self.replicas.apply(tree)
        if replicated is tree:
            return tree
        shared = {self.replicas.served_name(r) for r in self.replicas.resources}
        counts: dict[tuple[str, str], int] = {}
        for device in replicated.devices:
            if device.resource in shared and REPLICA_ATTRIBUTE in device.attributes:
                key = (device.resource, device.gpu)
                counts[key] = counts.get(key, 0) + 1
        devices = []
        for device in replicated.devices:
            count = counts.get((device.resource, device.gpu))
            if count is None or REPLICA_ATTRIBUTE not in device.attributes:
                devices.append(device)
                continue
            share = self._share(device, count)
            # The device's own UUID: a whole GPU's, or a MIG device's (MPS then runs inside that MIG device).
            uuid = device.attributes.get("uuid") or device.gpu
            devices.append(
                dataclasses.replace(
                    device,
                    spec=mps_spec(device.spec, uuid, share, self.daemons),
                    attributes=frozen_mapping({**device.attributes, MPS_GPU_ATTRIBUTE: uuid}),
                )
            )
        rules = dict(replicated.rules)
        for name in shared & set(replicated.resources):
            rules[name] = dataclasses.replace(rules.get(name, ResourceRules()), max_devices_per_container=1)
        return dataclasses.replace(replicated, devices=tuple(devices), rules=MappingProxyType(rules))

    def _share(self, device: Device, count: int) -> MpsShare:
        limits = self.limits.get(device.resource, MpsLimits())
        memory_text = device.attributes.get("memory_mib", "")
        total = int(memory_text) if memory_text.isdecimal() else None
        memory = limits.memory_mib
        if memory is None and total is not None:
            memory = total // count
        if memory is not None and total is not None and memory * count > total:
            raise DevicesRefuseConfig(
                f"{limits.where}.memoryLimitMiB: {count} replicas of {memory} MiB need {memory * count} MiB, "
                f"GPU {device.gpu} has {total} MiB"
            )
        threads = limits.thread_percentage or max(1, 100 // count)
        return MpsShare(memory_mib=memory, thread_percentage=threads)


# The control daemons.


@dataclass(slots=True)
class DaemonState:
    """What an operator and the figures want to know about one GPU's control daemon."""

    uuid: str
    answering: bool = False
    starts: int = 0
    """Launches so far, the first included."""
    last_start_s: float | None = None
    """Seconds from launching the daemon to its first answer, at its last successful start."""
    last_error: str | None = None


class ControlDaemon:
    """One GPU's ``nvidia-cuda-mps-control -d``: launched, queried, restarted, and quit on its own pipe directory.

    ``uuid`` names its directories; ``gpus``, when given, are the GPUs it serves instead of that one (a DRA claim's
    daemon: its directories are the claim's, its GPUs the claim's)."""

    def __init__(
        self, uuid: str, settings: ControlDaemonSettings, on_change: Callable[[], None], gpus: Sequence[str] = ()
    ) -> None:
        self.uuid = uuid
        self.gpus = tuple(gpus) or (uuid,)
        self.settings = settings
        self.state = DaemonState(uuid)
        self._on_change = on_change

    def environment(self) -> dict[str, str]:
        """The daemon's environment: its GPUs alone, its own pipe and log directories."""
        return {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
            PIPE_DIRECTORY: str(self.settings.pipe_dir(self.uuid)),
            LOG_DIRECTORY: str(self.settings.log_dir(self.uuid)),
        }

    async def query(self, command: str) -> str | None:
        """Send one command to the daemon; its answer, or None when no daemon answers in time."""
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.environment(),
            )
        except OSError as error:
            self.state.last_error = str(error)
            return None
        try:
            async with asyncio.timeout(self.settings.answer_timeout_s):
                out, _ = await process.communicate(f"{command}\n".encode())
        except TimeoutError:
            self.state.last_error = f"{command!r} got no answer in {self.settings.answer_timeout_s:g} s"
            return None
        finally:
            # Timed out or cancelled (the plugin stopping): the program must not outlive the query, and its pipes
            # must close, or a read of them waits for good.
            await _end(process)
        text = out.decode(errors="replace").strip()
        if process.returncode != 0 or _NOT_RUNNING in text:
            self.state.last_error = text or f"exit status {process.returncode}"
            return None
        return text

    async def launch(self) -> bool:
        """Start the daemon (it forks into the background) and wait until it answers; True once it does."""
        self.state.starts += 1
        started = time.perf_counter()
        await asyncio.to_thread(_make_dirs, self.settings.pipe_dir(self.uuid), self.settings.log_dir(self.uuid))
        try:
            # Its output goes to its log directory; a pipe here would be held open by the forked daemon.
            process = await asyncio.create_subprocess_exec(
                *self.settings.command,
                "-d",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
            )
            try:
                async with asyncio.timeout(self.settings.answer_timeout_s):
                    await process.wait()
            finally:
                await _end(process)
        except (OSError, TimeoutError) as error:
            self.state.last_error = str(error) or type(error).__name__
            return False
        # An exit status of 1 may mean "already running" (after a missed probe): an answer settles it.
        deadline = started + self.settings.answer_timeout_s
        while True:
            if await self.query("get_server_list") is not None:
                self.state.last_start_s = time.perf_counter() - started
                self.state.last_error = None
                return True
            if time.perf_counter() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def supervise(self) -> None:
        """Keep the daemon answering: launch it, query it every probe interval, restart it when it stops."""
        backoff = Backoff(self.settings.first_restart_delay_s, self.settings.max_restart_delay_s)
        while True:
            if not self.state.answering:
                if await self.launch():
                    start_s = round(self.state.last_start_s or 0, 3)
                    log.info("mps control daemon answering", gpu=self.uuid, start_s=start_s)
                    self._set(answering=True)
                    backoff.reset()
                    continue
                delay_s = backoff.next()
                error = self.state.last_error
                log.error("mps control daemon did not start", gpu=self.uuid, error=error, retry_in_s=round(delay_s, 3))
                await asyncio.sleep(delay_s)
                continue
            await asyncio.sleep(self.settings.probe_interval_s)
            if await self.query("get_server_list") is None:
                error = self.state.last_error
                log.error("mps control daemon stopped answering; restarting", gpu=self.uuid, error=error)
                self._set(answering=False)

    def _set(self, *, answering: bool) -> None:
        self.state.answering = answering
        self._on_change()

    async def quit(self) -> None:
        """Ask the daemon to quit (``echo quit | nvidia-cuda-mps-control``); wait until it no longer answers and
        the MPS servers it had listed have exited."""
        listed = await self.query("get_server_list")
        if listed is None:
            return
        servers = [int(word) for word in listed.split() if word.isdecimal()]
        if await self.query("quit") is None:
            return
        deadline = time.perf_counter() + self.settings.answer_timeout_s
        running = servers
        # Nothing announces the daemon's exit but its silence, nor a server's but its PID's.
        while time.perf_counter() < deadline:
            running = await asyncio.to_thread(_running, servers)
            if not running and await self.query("get_server_list") is None:
                return
            await asyncio.sleep(0.05)
        log.warning("mps control daemon or its servers still running after quit", gpu=self.uuid, servers=running)


async def _end(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs and reap it; shielded, so that a cancellation cannot leave it running."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await asyncio.shield(process.wait())


def _running(pids: list[int]) -> list[int]:
    """The processes of ``pids`` still running (a zombie has exited)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"]):
            alive.append(pid)
    return alive


def _make_dirs(*paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


class ControlDaemons:
    """The control daemons of the GPUs that have MPS devices; marks those devices Unhealthy while theirs is down."""

    def __init__(self, settings: ControlDaemonSettings, owner: str) -> None:
        self.settings = settings
        self.daemons: dict[str, ControlDaemon] = {}
        self._tasks = TaskSet(f"mps:{owner}")
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()

    def states(self) -> Mapping[str, DaemonState]:
        return {uuid: daemon.state for uuid, daemon in self.daemons.items()}

    async def ensure(self, tree: DeviceTree) -> None:
        """Run a daemon for each GPU with MPS devices in ``tree``, quit the others; new ones get one launch first."""
        wanted = {d.attributes[MPS_GPU_ATTRIBUTE] for d in tree.devices if MPS_GPU_ATTRIBUTE in d.attributes}
        for uuid in [u for u in self.daemons if u not in wanted]:
            supervisor = self._supervisors.pop(uuid)
            supervisor.cancel()
            # Its loop ended first: a launch still under way could otherwise start the daemon after the quit.
            await asyncio.wait([supervisor])
            await self.daemons.pop(uuid).quit()
        new = [ControlDaemon(uuid, self.settings, self._changed.set) for uuid in sorted(wanted - set(self.daemons))]
        if not new:
            return
        # The first launch here, so that the first tree served already shows which daemons answer.
        answered = await asyncio.gather(*(daemon.launch() for daemon in new))
        for daemon, ok in zip(new, answered, strict=True):
            daemon.state.answering = ok
            self.daemons[daemon.uuid] = daemon
            log.info(
                "mps control daemon started" if ok else "mps control daemon did not start",
                gpu=daemon.uuid,
                start_s=None if daemon.state.last_start_s is None else round(daemon.state.last_start_s, 3),
                pipe_dir=str(self.settings.pipe_dir(daemon.uuid)),
                error=daemon.state.last_error,
            )
            # Supervised: a loop that raises (its directories not made, say) is started again, not left dead.
            self._supervisors[daemon.uuid] = self._tasks.supervise(daemon.supervise, f"daemon {daemon.uuid}")

    def fold(self, tree: DeviceTree) -> DeviceTree:
        """``tree`` with every MPS device whose GPU's daemon does not answer marked Unhealthy."""
        down = {uuid for uuid, daemon in self.daemons.items() if not daemon.state.answering}
        if not down:
            return tree
        return dataclasses.replace(
            tree,
            devices=tuple(
                dataclasses.replace(d, health=Health.UNHEALTHY) if d.attributes.get(MPS_GPU_ATTRIBUTE) in down else d
                for d in tree.devices
            ),
        )

    async def changed(self) -> None:
        """Wait until some daemon starts or stops answering."""
        await self._changed.wait()
        self._changed.clear()

    async def aclose(self) -> None:
        """Stop supervising and quit every daemon."""
        await self._tasks.aclose()
        self._supervisors.clear()
        daemons = list(self.daemons.values())
        self.daemons.clear()
        await asyncio.gather(*(daemon.quit() for daemon in daemons))


async def with_daemon_health(
    events: AsyncIterator[BackendEvent], daemons: ControlDaemons, current: Callable[[], DeviceTree]
) -> AsyncGenerator[BackendEvent, None]:
    """``events`` as they come, and a new tree (``current()``) each time a daemon starts or stops answering."""
    queue: asyncio.Queue[BackendEvent | BaseException | None] = asyncio.Queue()
    tasks = TaskSet("mps events")

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
            queue.put_nowait(None)
        except Exception as error:
            queue.put_nowait(error)

    async def watch() -> None:
        while True:
            await daemons.changed()
            queue.put_nowait(InventoryChanged(current()))

    tasks.spawn(pump(), "backend events", expect_end=True)
    tasks.spawn(watch(), "daemon health")
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await tasks.aclose()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


class MpsBackend:
    """A backend whose GPUs are shared by ``sharing.mps``: its replicas, and the control daemons they need.

    Over the mock (kind clusters, no GPU) the replicas carry their MPS environment but no daemon is started.
    """

    def __init__(self, inner: Backend, sharing: MpsSharing, *, supervise: bool | None = None) -> None:
        """``supervise``: run the control daemons; None: unless the inner backend is the mock."""
        self.inner = inner
        self.sharing = sharing
        self.name = inner.name
        self.supervise = inner.name != "mock" if supervise is None else supervise
        self.daemons = ControlDaemons(sharing.daemons, inner.name)
        self._tree = DeviceTree()

    def allocation_policy(self, resource: str) -> AllocationPolicyKind:
        """Replicas: the sharing policy; the inner backend's whole GPUs: its own choice."""
        rule = self._tree.rules_of(resource).allocation_policy
        if rule is not None:
            return rule
        if isinstance(self.inner, PreferredAllocation):
            return self.inner.allocation_policy(resource)
        return AllocationPolicyKind.TOPOLOGY

    async def start(self) -> None:
        await self.inner.start()
        try:
            await self._shared(await self.inner.discover())
        except BaseException:
            await self.aclose()
            raise

    async def _shared(self, tree: DeviceTree) -> DeviceTree:
        self._tree = self.sharing.apply(tree)
        if self.supervise:
            await self.daemons.ensure(self._tree)
        return self.daemons.fold(self._tree)

    async def discover(self) -> DeviceTree:
        return await self._shared(await self.inner.discover())

    def events(self) -> AsyncIterator[BackendEvent]:
        return with_daemon_health(self._inner_events(), self.daemons, lambda: self.daemons.fold(self._tree))

    async def _inner_events(self) -> AsyncGenerator[BackendEvent, None]:
        stream = self.inner.events()
        try:
            async for event in stream:
                yield InventoryChanged(await self._shared(event.tree)) if isinstance(event, InventoryChanged) else event
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        """Quit the daemons, then close the inner backend."""
        await self.daemons.aclose()
        await self.inner.aclose()
