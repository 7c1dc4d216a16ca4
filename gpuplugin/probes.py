"""Liveness, readiness and metrics over HTTP: ``/healthz``, ``/readyz`` and ``/metrics`` on ``--metrics-address``.

``/healthz`` answers 200 while the event loop keeps time (a small task measures how late it runs a timer);
``/readyz`` answers 200 only while every resource is served, registered and watched by the kubelet; ``/metrics``
is the Prometheus exposition. Answers name resources and counts only: nothing from the environment or the config.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from gpuplugin.tasks import TaskSet

if TYPE_CHECKING:
    from aiohttp import web

    from gpuplugin.manager import Manager
    from gpuplugin.metrics import Metrics

log = structlog.get_logger("gpuplugin.probes")

Clock = Callable[[], float]


class AddressError(ValueError):
    """A listen address could not be read; the message names the option. Retrying does not help."""


class ProbeServerError(Exception):
    """The probe server cannot listen (port taken, address not local); retrying helps once the port is free."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where an HTTP server listens."""

    host: str
    """An IP address or name; empty for every interface (IPv4 and IPv6)."""
    port: int
    """0 picks a free port (tests); the server's ``port`` says which."""

    @classmethod
    def parse(cls, text: str, option: str = "--metrics-address") -> ListenAddress:
        """Read ``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT``; errors name ``option``."""
        expected = f"{option}: expected HOST:PORT, :PORT or [IPv6]:PORT, got {text!r}"
        host, colon, port_text = text.strip().rpartition(":")
        if not colon:
            raise AddressError(expected)
        if host.startswith("[") or host.endswith("]"):
            if not (host.startswith("[") and host.endswith("]")) or len(host) == 2:
                raise AddressError(expected)
            host = host[1:-1]
        elif ":" in host:
            raise AddressError(f"{option}: an IPv6 address needs brackets, as in [::1]:{port_text}; got {text!r}")
        if any(c.isspace() or c in "[]/" for c in host):
            raise AddressError(expected)
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise AddressError(f"{option}: the port must be a number from 0 to 65535, got {text!r}")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    """Where the probes are served and when the process counts as alive."""

    address: ListenAddress | None = None
    """``--metrics-address``: where ``/metrics``, ``/healthz`` and ``/readyz`` are served; None serves none."""
    max_loop_lag_s: float = 5.0
    """``/healthz`` fails once the event loop runs a timer this many seconds late: a loop that late misses the
    kubelet's RPC deadlines and ListAndWatch updates, and only a restart brings it back."""
    loop_check_interval_s: float = 1.0
    """Seconds between two event-loop lag measurements; one timer a second costs nothing measurable."""


class LoopLagMonitor:
    """Measures how late the event loop runs a timer: once per interval, and for the timer now pending."""

    def __init__(self, interval_s: float, clock: Clock = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._due = math.inf
        self._last_lag_s = 0.0
        self.ticks = 0

    @property
    def lag_s(self) -> float:
        """The larger of the last measured lag and how overdue the pending timer is (a loop blocked right now)."""
        return max(self._last_lag_s, self._clock() - self._due, 0.0)

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            self._due = self._clock() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self._last_lag_s = max(self._clock() - self._due, 0.0)
            self.ticks += 1


def not_ready_reasons(manager: Manager) -> list[str]:
    """Why the manager is not ready, one short line per resource; empty when it is."""
    if manager.ready:
        return []
    if not manager.servers:
        return ["no resource served"]
    reasons = []
    for name, server in sorted(manager.servers.items()):
        if not server.registered:
            reasons.append(f"{name}: not registered with the kubelet")
        elif server.open_streams == 0:
            reasons.append(f"{name}: no ListAndWatch stream open")
    return reasons or ["not ready"]


class ProbeServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP on the event loop."""

    def __init__(
        self, manager: Manager, metrics: Metrics, settings: ProbeSettings, *, clock: Clock = time.monotonic
    ) -> None:
        if settings.address is None:
            raise ValueError("ProbeServer needs settings.address")
        self._address = settings.address
        self._manager = manager
        self._metrics = metrics
        self._settings = settings
        self.monitor = LoopLagMonitor(settings.loop_check_interval_s, clock)
        self._tasks = TaskSet("probes")
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the one picked for port 0)."""
        if self._port is None:
            raise RuntimeError("the probe server is not serving")
        return self._port

    def healthz(self) -> tuple[int, str]:
        """200 while the event loop keeps time; 503 with the lag once it is later than ``max_loop_lag_s``."""
        lag_s, limit_s = self.monitor.lag_s, self._settings.max_loop_lag_s
        if lag_s > limit_s:
            return 503, f"event loop {lag_s:.1f} s late (limit {limit_s:g} s)\n"
        return 200, "ok\n"

    def readyz(self) -> tuple[int, str]:
        """200 when every resource is served, registered and watched; 503 naming those that are not."""
        reasons = not_ready_reasons(self._manager)
        if reasons:
            return 503, "not ready:\n" + "".join(f"{r}\n" for r in reasons)
        return 200, "ready\n"

    async def start(self) -> None:
        """Start measuring the loop and listen; raises ProbeServerError when the address cannot be bound."""
        # Imported here: the CLI imports this module for its settings, and aiohttp costs a quarter of a second.
        from aiohttp import web

        def plain(answer: Callable[[], tuple[int, str]]) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def handle(request: web.Request) -> web.Response:
                status, text = answer()
                return web.Response(status=status, text=text)

            return handle

        async def metrics_page(request: web.Request) -> web.Response:
            body, content_type = self._metrics.render(request.headers.get("Accept"))
            return web.Response(body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/healthz", plain(self.healthz))
        app.router.add_get("/readyz", plain(self.readyz))
        app.router.add_get("/metrics", metrics_page)
        # No access log: the kubelet probes every few seconds, and a line each time would drown the plugin's own.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._address.host or None, self._address.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ProbeServerError(f"--metrics-address {self._address}: cannot listen: {exc.strerror or exc}") from None
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._tasks.spawn(self.monitor.run(), "event-loop lag")
        self._metrics.watch_loop(lambda: self.monitor.lag_s)
        log.info("serving probes and metrics", address=str(self._address), port=self._port)

    async def aclose(self) -> None:
        """Stop listening and measuring; safe to call twice."""
        self._metrics.watch_loop(None)
        await self._tasks.aclose()
        runner, self._runner, self._port = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
