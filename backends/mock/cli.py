"""``gpuplugin mock``: inject faults into a running mock backend through its control socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gpuplugin.backends.mock.control import ControlUnavailable, control
from gpuplugin.backends.mock.settings import DEFAULT_CONTROL_SOCKET
from gpuplugin.core.backend import TIMESLICE_INTERVALS

F = TypeVar("F", bound=Callable[..., Any])


def _socket_option(f: F) -> F:
    return click.option(
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_CONTROL_SOCKET,
        envvar="GPUPLUGIN_MOCK_SOCKET",
        show_default=True,
        show_envvar=True,
        help="Control socket of the mock backend.",
    )(f)


def _gpu_option(f: F) -> F:
    return click.option("--gpu", type=click.IntRange(min=0), required=True, help="GPU index.")(f)


def _parse_instance(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        gi, ci = (int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"must be GI,CI (two integers), got {value!r}") from None
    if gi < 0 or ci < 0:
        raise click.BadParameter(f"must be non-negative, got {value!r}")
    return [gi, ci]


def _instance_option(f: F) -> F:
    return click.option(
        "--instance",
        callback=_parse_instance,
        metavar="GI,CI",
        help="GPU instance and compute instance of one partition; default the whole GPU.",
    )(f)


def _request(socket_path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request; any failure becomes one line on stderr and exit status 1."""
    try:
        answer = asyncio.run(control(socket_path, request))
    except ControlUnavailable as e:
        raise click.ClickException(str(e)) from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", "the mock backend refused the request")))
    return answer


def _gpu(answer: dict[str, Any]) -> str:
    return f"GPU {answer['gpu']} ({answer['uuid']})"


@click.group(name="mock")
def mock_cli() -> None:
    """Inject faults into a running mock backend (`gpuplugin serve --backend mock`)."""


@mock_cli.command()
@_gpu_option
@click.option("--xid", "xid", type=click.IntRange(min=0), required=True, help="XID number, e.g. 79.")
@_instance_option
@_socket_option
def xid(gpu: int, xid: int, instance: list[int] | None, socket_path: Path) -> None:
    """Raise an XID; the health policy decides whether it is ignored, recovers or is fatal."""
    request: dict[str, Any] = {"op": "xid", "gpu": gpu, "xid": xid}
    if instance is not None:
        request["instance"] = instance
    answer = _request(socket_path, request)
    on = f" on instance {instance[0]},{instance[1]}" if instance is not None else ""
    click.echo(f"{_gpu(answer)}: XID {xid}{on}: {answer['action']}")


@mock_cli.command()
@_gpu_option
@_socket_option
def lose(gpu: int, socket_path: Path) -> None:
    """Make a GPU fall off the bus: Unhealthy until `recover`."""
    click.echo(f"{_gpu(_request(socket_path, {'op': 'lose', 'gpu': gpu}))}: lost")


@mock_cli.command()
@_gpu_option
@_instance_option
@_socket_option
def recover(gpu: int, instance: list[int] | None, socket_path: Path) -> None:
    """Declare a GPU (or one partition) reset: Healthy now."""
    request: dict[str, Any] = {"op": "recover", "gpu": gpu}
    if instance is not None:
        request["instance"] = instance
    click.echo(f"{_gpu(_request(socket_path, request))}: recovered")


@mock_cli.command()
@_gpu_option
@_socket_option
def unplug(gpu: int, socket_path: Path) -> None:
    """Remove a GPU from the inventory."""
    answer = _request(socket_path, {"op": "unplug", "gpu": gpu})
    click.echo(f"{_gpu(answer)}: {'unplugged' if answer['changed'] else 'already unplugged'}")


@mock_cli.command()
@_gpu_option
@_socket_option
def plug(gpu: int, socket_path: Path) -> None:
    """Return an unplugged GPU to the inventory."""
    answer = _request(socket_path, {"op": "plug", "gpu": gpu})
    click.echo(f"{_gpu(answer)}: {'plugged' if answer['changed'] else 'already present'}")


@mock_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_socket_option
def status(as_json: bool, socket_path: Path) -> None:
    """Show every mock GPU: presence, health and faults."""
    gpus: list[dict[str, Any]] = _request(socket_path, {"op": "status"})["gpus"]
    if as_json:
        click.echo(json.dumps(gpus, indent=2))
        return
    click.echo(f"{'INDEX':<6}{'UUID':<42}{'PRESENT':<9}{'LOST':<6}{'HEALTH':<11}FAULTS")
    for gpu in gpus:
        faults = "; ".join(_fault(f) for f in gpu["faults"]) or "-"
        click.echo(
            f"{gpu['index']:<6}{gpu['uuid']:<42}{_yes(gpu['present']):<9}{_yes(gpu['lost']):<6}"
            f"{gpu['health']:<11}{faults}"
        )


@mock_cli.command()
@_socket_option
def timeslices(socket_path: Path) -> None:
    """Show every mock GPU's time-slice interval, as DRA claims set it."""
    answer: dict[str, int] = _request(socket_path, {"op": "timeslices"})["timeslices"]
    for uuid, interval in answer.items():
        click.echo(f"{uuid} {TIMESLICE_INTERVALS[interval]}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _fault(fault: dict[str, Any]) -> str:
    instance = fault.get("instance")
    return f"{fault['reason']} (instance {instance[0]},{instance[1]})" if instance else str(fault["reason"])
