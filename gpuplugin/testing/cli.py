"""``gpuplugin kubelet``: the kubelet simulator as a command, for trying a plugin's ``serve`` locally.

It serves ``kubelet.sock`` in a directory and prints one line per event: a plugin registering, each ListAndWatch
update, each admission it makes on the plugin (``--admit``), a stream's end, a refused registration. With
``--kubelet-api dra`` it is the kubelet's DRA side instead: it watches the directory as the plugins registry, prints
each DRA plugin's registration and its resource-health updates, and prepares the claim of ``--prepare`` once its
driver registers (unpreparing it on stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import structlog
import yaml

from gpuplugin.core.model import is_extended_resource_name
from gpuplugin.core.tasks import TaskSet
from gpuplugin.dra.claims import ClaimRef
from gpuplugin.kubelet.api import v1alpha1
from gpuplugin.testing.admission import Admission, AdmissionError
from gpuplugin.testing.dra import HEALTH_SERVICE, Deregistered, DraEvent, DraKubelet, RegisteredPlugin, Rejected
from gpuplugin.testing.node import (
    DevicesListed,
    KubeletEvent,
    Misbehaviour,
    Registration,
    Rejection,
    Restart,
    StreamEnd,
)
from gpuplugin.testing.registration_server import RPC_FAILURES
from gpuplugin.testing.simulator import KubeletSimulator

DEFAULT_DIR = Path("/tmp/gpuplugin-kubelet")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Far more than any node has; a larger count is a typo, and the kubelet would refuse it anyway.
MAX_ADMIT_COUNT = 4096
#: Largest claim file read: a ResourceClaim is a few kilobytes; the API server's own limit on an object is 1.5 MiB.
MAX_CLAIM_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Want:
    """One ``--admit``: a pod of one container asking for ``count`` devices of ``resource``."""

    resource: str
    count: int

    def __str__(self) -> str:
        return f"{self.resource}={self.count}"


def parse_wants(_ctx: click.Context, _param: click.Parameter, values: Sequence[str]) -> list[Want]:
    wants = []
    for value in values:
        resource, sep, count = value.partition("=")
        if not sep or not count.isdigit():
            raise click.BadParameter(f"must be RESOURCE=COUNT (nvidia.com/gpu=2), got {value!r}")
        if not is_extended_resource_name(resource):
            raise click.BadParameter(f"{resource!r} is not an extended resource name (vendor.example/name)")
        if not 1 <= int(count) <= MAX_ADMIT_COUNT:
            raise click.BadParameter(f"the count must be 1 to {MAX_ADMIT_COUNT}, got {count}")
        wants.append(Want(resource, int(count)))
    return wants


def parse_every(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    # click's FloatRange lets NaN through (it compares false with every bound).
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of seconds, got {value}")
    return value


def describe(event: KubeletEvent) -> str:
    """One line for an event of the simulated kubelet."""
    match event:
        case Registration():
            options = [
                name
                for name, on in (
                    ("GetPreferredAllocation", event.options.get_preferred_allocation_available),
                    ("PreStartContainer", event.options.pre_start_required),
                )
                if on
            ]
            return f"registered {event.resource} endpoint={event.endpoint} options={','.join(options) or 'none'}"
        case DevicesListed():
            unhealthy = [i for i, d in event.devices if not d.healthy]
            return (
                f"ListAndWatch {event.resource}: {len(event.devices)} devices, {event.healthy} healthy, "
                f"{event.unhealthy} unhealthy" + (f" ({', '.join(unhealthy)})" if unhealthy else "")
            )
        case StreamEnd():
            return f"stream ended {event.resource} endpoint={event.endpoint}: {event.error or 'closed by the plugin'}"
        case Rejection():
            return f"rejected {event.resource} endpoint={event.endpoint}: {event.message}"
        case Restart():
            return "restarted"
        case Misbehaviour():
            return f"plugin misbehaved: {event.message}"


def describe_admission(admission: Admission, want: Want) -> str:
    (container,) = admission.containers
    allocation = container.allocations[want.resource]
    response = allocation.response
    answered = [f"Allocate {allocation.allocate_s * 1000:.1f} ms"]
    if allocation.preferred is not None:
        followed = allocation.preferred == allocation.device_ids
        answered.append("as preferred" if followed else f"preferred {','.join(allocation.preferred)}")
    if response.envs:
        answered.append("env " + " ".join(f"{k}={v}" for k, v in sorted(response.envs.items())))
    if response.devices:
        answered.append(f"{len(response.devices)} device nodes")
    if response.mounts:
        answered.append(f"{len(response.mounts)} mounts")
    if response.cdi_devices:
        answered.append("cdi " + ",".join(d.name for d in response.cdi_devices))
    return f"admitted {admission.pod} {want}: {','.join(allocation.device_ids)}; {'; '.join(answered)}"


class Admissions:
    """Admits each ``--admit`` pod once its resource lists devices after registering, and every ``every`` seconds;
    a want's previous pod is removed first, so its devices are free again."""

    def __init__(
        self, kubelet: KubeletSimulator, wants: Sequence[Want], every: float | None, say: Callable[[str], None]
    ) -> None:
        self._kubelet = kubelet
        self._wants = wants
        self._every = every
        self._say = say
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._fresh: set[str] = set()
        self._pods: dict[int, str] = {}
        self._names = itertools.count(1)

    def heard(self, event: KubeletEvent) -> None:
        """Admit on the first device list after each registration of a wanted resource."""
        if isinstance(event, Registration):
            self._fresh.add(event.resource)
        elif isinstance(event, DevicesListed) and event.resource in self._fresh:
            self._fresh.discard(event.resource)
            if any(w.resource == event.resource for w in self._wants):
                self._queue.put_nowait(event.resource)

    async def run(self) -> None:
        while True:
            resource = await self._queue.get()
            for n, want in enumerate(self._wants):
                if want.resource == resource:
                    await self._admit(n, want)

    async def every(self) -> None:
        if self._every is None:
            return
        while True:
            await asyncio.sleep(self._every)
            for resource in dict.fromkeys(w.resource for w in self._wants):
                if self._kubelet.stream_open(resource):
                    self._queue.put_nowait(resource)

    async def _admit(self, n: int, want: Want) -> None:
        previous = self._pods.pop(n, None)
        if previous is not None:
            await self._kubelet.remove_pod(previous)
        pod = f"pod-{next(self._names)}"
        try:
            admission = await self._kubelet.admit(pod, [{want.resource: want.count}])
        except AdmissionError as exc:
            self._say(f"admission failed {pod} {want}: {exc.message}" + (f" ({exc.status.name})" if exc.status else ""))
            return
        self._pods[n] = pod
        self._say(describe_admission(admission, want))


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[asyncio.Event]:
    """An event SIGINT and SIGTERM set while the block runs, on the running loop; the handlers go with the block."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def run(directory: Path, wants: Sequence[Want], every: float | None, say: Callable[[str], None]) -> None:
    """Serve the simulated kubelet in ``directory`` until SIGINT or SIGTERM."""
    with stopped_by_signals() as stop:
        await _serve(directory, wants, every, say, stop)
    say("kubelet stopped")


async def _serve(
    directory: Path, wants: Sequence[Want], every: float | None, say: Callable[[str], None], stop: asyncio.Event
) -> None:
    admissions: Admissions | None = None

    def heard(event: KubeletEvent) -> None:
        say(describe(event))
        if admissions is not None:
            admissions.heard(event)

    tasks = TaskSet("kubelet-command")
    async with KubeletSimulator(directory, on_event=heard) as kubelet:
        admissions = Admissions(kubelet, wants, every, say)
        tasks.spawn(admissions.run(), "admissions")
        tasks.spawn(admissions.every(), "admit-every", expect_end=True)
        say(f"kubelet serving {kubelet.socket_path}; stop with Ctrl-C")
        try:
            await stop.wait()
        finally:
            await tasks.aclose()


@dataclass(frozen=True, slots=True)
class ClaimFile:
    """A ``--prepare`` claim: how the kubelet names it, and the driver its allocation is for."""

    claim: ClaimRef
    driver: str

    def __str__(self) -> str:
        return f"{self.claim.namespace}/{self.claim.name}"


def parse_claim_file(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> ClaimFile | None:
    """A ResourceClaim (YAML or JSON) with its allocation, as the API server holds it; BadParameter naming the field
    that is missing or wrong."""
    if value is None:
        return None
    try:
        with value.open("rb") as f:
            data = f.read(MAX_CLAIM_FILE_BYTES + 1)
        if len(data) > MAX_CLAIM_FILE_BYTES:
            raise click.BadParameter(f"{value}: larger than {MAX_CLAIM_FILE_BYTES} bytes")
        document = yaml.safe_load(data)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{value}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
    return claim_of(document, str(value))


def claim_of(document: Any, source: str) -> ClaimFile:
    """The claim a ResourceClaim object names, and its driver; BadParameter naming the field."""

    def field(path: str, value: Any) -> Any:
        if not value:
            raise click.BadParameter(f"{source}: {path}: missing")
        return value

    if not isinstance(document, Mapping):
        raise click.BadParameter(f"{source}: a ResourceClaim is a mapping, got {type(document).__name__}")
    if document.get("kind", "ResourceClaim") != "ResourceClaim":
        raise click.BadParameter(f"{source}: kind: must be ResourceClaim, got {document.get('kind')!r}")
    metadata = field("metadata", document.get("metadata"))
    names = {key: metadata.get(key) if isinstance(metadata, Mapping) else None for key in ("name", "uid")}
    namespace = metadata.get("namespace", "default") if isinstance(metadata, Mapping) else None
    for key, value in {**names, "namespace": namespace}.items():
        if not isinstance(field(f"metadata.{key}", value), str):
            raise click.BadParameter(f"{source}: metadata.{key}: must be a string, got {value!r}")
    results = (((document.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results")
    drivers = {r.get("driver") for r in results or () if isinstance(r, Mapping)}
    if len(drivers) != 1 or not isinstance(driver := next(iter(drivers)), str) or not driver:
        found = ", ".join(sorted(map(str, drivers))) or "none"
        raise click.BadParameter(
            f"{source}: status.allocation.devices.results: must name one driver (the claim allocated), found {found}"
        )
    return ClaimFile(ClaimRef(str(namespace), str(names["name"]), str(names["uid"])), driver)


def describe_dra(event: DraEvent) -> str:
    """One line for a registration event of the DRA plugin watcher."""
    match event:
        case RegisteredPlugin():
            return f"registered DRA driver {event.driver} endpoint={event.endpoint} service={event.service}"
        case Deregistered():
            return f"deregistered DRA driver {event.driver}"
        case Rejected():
            return f"rejected DRA plugin {event.socket}: {event.message}"


def describe_health(driver: str, response: v1alpha1.NodeWatchResourcesResponse) -> str:
    healthy_status = v1alpha1.HealthStatus.HEALTHY
    unhealthy = [d.device.device_name for d in response.devices if d.device and d.health != healthy_status]
    healthy = len(response.devices) - len(unhealthy)
    return (
        f"resource health {driver}: {len(response.devices)} devices, {healthy} healthy, {len(unhealthy)} not healthy"
        + (f" ({', '.join(unhealthy)})" if unhealthy else "")
    )


def describe_prepared(claim: ClaimFile, response: Any) -> str:
    entry = response.claims.get(claim.claim.uid)
    if entry is None:
        return f"prepare {claim}: the plugin answered for other claims only"
    if entry.error:
        return f"prepare failed {claim}: {entry.error}"
    devices = "; ".join(
        f"{','.join(d.request_names)} {d.device_name} cdi {','.join(d.cdi_device_ids)}" for d in entry.devices
    )
    return f"prepared {claim}: {devices or 'no devices'}"


class DraSession:
    """What ``--kubelet-api dra`` does on each event: follow the health stream of each registered plugin, and prepare
    the ``--prepare`` claim when its driver registers."""

    def __init__(self, claim: ClaimFile | None, say: Callable[[str], None]) -> None:
        self.claim = claim
        self._say = say
        self._tasks = TaskSet("kubelet-dra")
        self.kubelet: DraKubelet | None = None
        self.prepared = False

    def heard(self, event: DraEvent) -> None:
        self._say(describe_dra(event))
        if not isinstance(event, RegisteredPlugin):
            return
        if HEALTH_SERVICE in event.services:
            self._tasks.spawn(self._follow_health(event.driver), f"health {event.driver}", expect_end=True)
        if self.claim is not None and event.driver == self.claim.driver:
            self._tasks.spawn(self._prepare(self.claim), "prepare", expect_end=True)

    async def _follow_health(self, driver: str) -> None:
        assert self.kubelet is not None
        try:
            async with self.kubelet.health_stream(driver) as stream:
                async for response in _messages(stream):
                    self._say(describe_health(driver, response))
        except (*RPC_FAILURES, LookupError) as exc:
            self._say(f"resource health {driver}: stream ended ({type(exc).__name__}: {exc})")

    async def _prepare(self, claim: ClaimFile) -> None:
        assert self.kubelet is not None
        try:
            response = await self.kubelet.prepare(claim.driver, [claim.claim])
        except (*RPC_FAILURES, KeyError) as exc:
            self._say(f"prepare failed {claim}: {type(exc).__name__}: {exc}")
            return
        self.prepared = True
        self._say(describe_prepared(claim, response))

    async def unprepare(self) -> None:
        """On stop: unprepare the claim prepared (its driver still registered), as the kubelet does once a pod goes."""
        claim = self.claim
        await self._tasks.aclose()
        if claim is None or not self.prepared or self.kubelet is None or claim.driver not in self.kubelet.plugins:
            return
        try:
            response = await self.kubelet.unprepare(claim.driver, [claim.claim])
        except RPC_FAILURES as exc:
            self._say(f"unprepare failed {claim}: {type(exc).__name__}: {exc}")
            return
        entry = response.claims.get(claim.claim.uid)
        error = entry.error if entry is not None else "the plugin did not answer for it"
        self._say(f"unprepare failed {claim}: {error}" if error else f"unprepared {claim}")


async def _messages(stream: Any) -> AsyncIterator[v1alpha1.NodeWatchResourcesResponse]:
    while (message := await stream.recv_message()) is not None:
        yield message


async def run_dra(directory: Path, claim: ClaimFile | None, say: Callable[[str], None]) -> None:
    """Watch ``directory`` as the kubelet's plugins registry until SIGINT or SIGTERM."""
    session = DraSession(claim, say)
    with stopped_by_signals() as stop:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        async with DraKubelet(directory, poll_s=0.1, on_event=session.heard) as kubelet:
            session.kubelet = kubelet
            say(f"kubelet watching DRA plugins in {directory}; stop with Ctrl-C")
            try:
                await stop.wait()
            finally:
                await session.unprepare()
    say("kubelet stopped")


def say(line: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {line}")


@click.command("kubelet")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="The device-plugins directory to serve kubelet.sock in (pass it to serve as --kubelet-dir).",
)
@click.option(
    "--admit",
    "wants",
    multiple=True,
    callback=parse_wants,
    metavar="RESOURCE=COUNT",
    help="Admit a pod asking for COUNT devices of RESOURCE once the plugin lists its devices. Repeatable.",
)
@click.option(
    "--admit-every",
    type=float,
    callback=parse_every,
    metavar="SECONDS",
    help="Admit the --admit pods again every SECONDS, each replacing its previous pod.",
)
@click.option(
    "--kubelet-api",
    type=click.Choice(["device-plugin", "dra"]),
    default="device-plugin",
    show_default=True,
    help="dra: watch --dir as the plugins registry for DRA plugins (serve --kubelet-api dra with that "
    "pluginsRegistryDir) instead of serving kubelet.sock.",
)
@click.option(
    "--prepare",
    "claim",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=parse_claim_file,
    metavar="FILE",
    help="DRA: a ResourceClaim with its allocation (YAML or JSON, as the API server holds it) to prepare once its "
    "driver registers, and unprepare on stop.",
)
def kubelet_cli(
    directory: Path, wants: list[Want], admit_every: float | None, kubelet_api: str, claim: ClaimFile | None
) -> None:
    """Play the kubelet in a directory: print each plugin registration, ListAndWatch update and admission.

    Run `gpuplugin serve --kubelet-dir DIR` against it from another terminal; stop it with Ctrl-C. With
    --kubelet-api dra, run `gpuplugin serve --kubelet-api dra` with DIR as its pluginsRegistryDir instead.
    """
    # Events, a plugin's misbehaviour included, go to stdout, one line each; the simulator's own log only says
    # what fails inside it, on stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    dra = kubelet_api == "dra"
    if dra and (wants or admit_every is not None):
        raise click.BadParameter("pods are admitted through the device plugin API only", param_hint="--admit")
    if claim is not None and not dra:
        raise click.BadParameter("claims are prepared with --kubelet-api dra only", param_hint="--prepare")
    try:
        asyncio.run(run_dra(directory, claim, say) if dra else run(directory, wants, admit_every, say))
    except OSError as exc:
        raise click.BadParameter(f"cannot serve in {directory}: {exc.strerror or exc}", param_hint="--dir") from None
