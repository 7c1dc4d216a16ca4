"""``gpuplugin kubelet``: the kubelet simulator as a command, for trying a plugin's ``serve`` locally.

It serves ``kubelet.sock`` in a directory and prints one line per event: a plugin registering, each ListAndWatch
update, each admission it makes on the plugin (``--admit``), a stream's end, a refused registration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import structlog

from gpuplugin.core.model import is_extended_resource_name
from gpuplugin.core.tasks import TaskSet
from gpuplugin.testing.admission import Admission, AdmissionError
from gpuplugin.testing.node import (
    DevicesListed,
    KubeletEvent,
    Misbehaviour,
    Registration,
    Rejection,
    Restart,
    StreamEnd,
)
from gpuplugin.testing.simulator import KubeletSimulator

DEFAULT_DIR = Path("/tmp/gpuplugin-kubelet")
#: Far more than any node has; a larger count is a typo, and the kubelet would refuse it anyway.
MAX_ADMIT_COUNT = 4096


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


async def run(directory: Path, wants: Sequence[Want], every: float | None, say: Callable[[str], None]) -> None:
    """Serve the simulated kubelet in ``directory`` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    admissions: Admissions | None = None

    def heard(event: KubeletEvent) -> None:
        say(describe(event))
        if admissions is not None:
            admissions.heard(event)

    tasks = TaskSet("kubelet-command")
    try:
        async with KubeletSimulator(directory, on_event=heard) as kubelet:
            admissions = Admissions(kubelet, wants, every, say)
            tasks.spawn(admissions.run(), "admissions")
            tasks.spawn(admissions.every(), "admit-every", expect_end=True)
            say(f"kubelet serving {kubelet.socket_path}; stop with Ctrl-C")
            try:
                await stop.wait()
            finally:
                await tasks.aclose()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
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
def kubelet_cli(directory: Path, wants: list[Want], admit_every: float | None) -> None:
    """Play the kubelet in a directory: print each plugin registration, ListAndWatch update and admission.

    Run `gpuplugin serve --kubelet-dir DIR` against it from another terminal; stop it with Ctrl-C.
    """
    # Events, a plugin's misbehaviour included, go to stdout, one line each; the simulator's own log only says
    # what fails inside it, on stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    try:
        asyncio.run(run(directory, wants, admit_every, say))
    except OSError as exc:
        raise click.BadParameter(f"cannot serve in {directory}: {exc.strerror or exc}", param_hint="--dir") from None
