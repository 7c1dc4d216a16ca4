"""Registering a resource with the kubelet, retried with backoff while the kubelet is absent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpclib import GRPCError
from grpclib.client import Channel

from gpuplugin.core.clock import REAL_CLOCK, Backoff, Clock, wait_at_most
from gpuplugin.core.instance import SocketIdentity
from gpuplugin.kubelet.api import v1beta1 as api

API_VERSION = "v1beta1"
DEPRECATION_FILE = "DEPRECATION"
"""In the device-plugins directory: the kubelet wants plugin-watcher registration instead of ``Register``."""


def plugin_watcher_wanted(kubelet_dir: Path) -> bool:
    """Whether the kubelet asks for plugin-watcher registration (as upstream's stub checks before ``Register``)."""
    return (kubelet_dir / DEPRECATION_FILE).exists()


@dataclass(frozen=True, slots=True)
class RegistrationSettings:
    """How hard we try to reach the kubelet."""

    first_retry_s: float = 0.01
    """The kubelet creates its socket a moment before it listens: retry fast at first (seconds, 0.001 to 60,
    doubling, jittered down by up to half)."""
    max_retry_s: float = 5.0
    """Backoff ceiling in seconds (``first_retry_s`` to 3600) while the kubelet is away (restarting, or not started
    yet)."""
    call_timeout_s: float = 15.0
    """Seconds (above 0, at most 3600): the kubelet dials us (for up to about 10 s) before it answers Register."""

    def __post_init__(self) -> None:
        checks = (
            ("first_retry_s", self.first_retry_s, 0.001 <= self.first_retry_s <= 60.0, "from 0.001 to 60"),
            ("max_retry_s", self.max_retry_s, self.first_retry_s <= self.max_retry_s <= 3600.0, "from first to 3600"),
            ("call_timeout_s", self.call_timeout_s, 0.0 < self.call_timeout_s <= 3600.0, "above 0, at most 3600"),
        )
        for name, value, ok, bounds in checks:
            if not ok:
                raise ValueError(f"registration.{name}: must be {bounds} seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class Registered:
    """A Register call the kubelet accepted."""

    attempts: int
    kubelet: SocketIdentity | None
    """``kubelet.sock`` as it was just before the accepted attempt: the kubelet registered with, or (if it restarted
    in between) an older one, never a newer one. A later ``kubelet.sock`` with this identity needs no new Register."""


class RegistrationRejected(Exception):
    """The kubelet answered Register with an error (bad version or resource name); retrying does not help."""


async def register_until_done(
    kubelet_socket: Path,
    *,
    endpoint: str,
    resource: str,
    options: api.DevicePluginOptions,
    settings: RegistrationSettings,
    wake: asyncio.Event,
    on_unreachable: Callable[[str], None],
    clock: Clock = REAL_CLOCK,
) -> Registered:
    """Register ``resource`` served at ``endpoint``; returns how many attempts it took and with which kubelet.

    ``on_unreachable`` hears of the first failed attempt, not of every retry. Setting ``wake`` cuts a backoff
    wait short (the kubelet socket just appeared); ``clock`` is what that wait runs on.
    """
    request = api.RegisterRequest(version=API_VERSION, endpoint=endpoint, resource_name=resource, options=options)
    backoff = Backoff(settings.first_retry_s, settings.max_retry_s)
    while True:
        attempts = backoff.attempts + 1
        kubelet = await asyncio.to_thread(SocketIdentity.of, kubelet_socket)
        try:
            await _register_once(kubelet_socket, request, settings.call_timeout_s)
            return Registered(attempts, kubelet)
        except GRPCError as exc:
            raise RegistrationRejected(f"kubelet refused {resource}: {exc.status.name}: {exc.message}") from None
        except (TimeoutError, OSError, ConnectionError) as exc:
            if attempts == 1:
                on_unreachable(str(exc) or type(exc).__name__)
        await wait_at_most(clock, wake, backoff.next())
        wake.clear()


async def _register_once(kubelet_socket: Path, request: api.RegisterRequest, timeout_s: float) -> None:
    channel = Channel(path=str(kubelet_socket))
    try:
        await api.RegistrationStub(channel).register(request, timeout=timeout_s)
    finally:
        channel.close()
