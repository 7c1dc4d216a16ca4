"""Liveness, readiness and metrics over HTTP: ``/healthz``, ``/readyz`` and ``/metrics`` on ``--metrics-address``.

``/healthz`` answers 200 while the event loop keeps time (a small task measures how late it runs a timer) and no
supervised task keeps failing; ``/readyz`` answers 200 only while every resource is served, registered and watched
by the kubelet (waiting for the kubelet's directory is healthy, but not ready), or in DRA mode while the plugin is
registered and the node's ResourceSlices are published; ``/metrics`` is the Prometheus exposition. Answers name
resources and counts only: nothing from the environment or the config.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING

import structlog

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.tasks import Supervisor, TaskSet

if TYPE_CHECKING:
    from gpuplugin.daemon.manager import Manager
    from gpuplugin.daemon.metrics import Metrics

log = structlog.get_logger("gpuplugin.daemon.probes")

Clock = Callable[[], float]
NotReady = Callable[[], list[str]]
"""Why the node is not ready, one short line each; empty when it is."""

_ALLOWED_METHODS = b"GET, HEAD"

Page = tuple[int, list[tuple[bytes, bytes]], bytes]
"""An answer: status, headers (without framing and Date, which the connection adds), body."""


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
            raise ConfigError(expected)
        if host.startswith("[") or host.endswith("]"):
            if not (host.startswith("[") and host.endswith("]")) or len(host) == 2:
                raise ConfigError(expected)
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{option}: an IPv6 address needs brackets, as in [::1]:{port_text}; got {text!r}")
        if any(c.isspace() or c in "[]/" for c in host):
            raise ConfigError(expected)
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise ConfigError(f"{option}: the port must be a number from 0 to 65535, got {text!r}")
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
    http_idle_timeout_s: float = 30.0
    """Seconds a client has to send a whole request, counted from connecting or from its previous answer, and to
    take each answer: an idle keep-alive connection, or one that trickles its request in, is closed after this long.
    Scrapers reconnect without fuss, and each open connection holds a task and its buffers."""


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
    # A CDI spec not on disk: Allocate refuses those devices, so the node is not ready whatever else holds.
    reasons = [f"CDI spec not written: {problem}" for problem in manager.sink_problems()]
    if manager.kubelet_dir_missing:
        return [*reasons, f"kubelet directory {manager.settings.server.kubelet_dir} does not exist; waiting for it"]
    lock = manager.instance_lock
    if lock is not None and lock.waiting_for is not None:
        reasons.append(f"another gpuplugin ({lock.waiting_for}) holds {lock.path}; waiting for it to stop")
    if not manager.servers:
        return [*reasons, "no resource served"]
    for name, server in sorted(manager.servers.items()):
        if not server.registered:
            reasons.append(f"{name}: not registered with the kubelet")
        elif server.open_streams == 0:
            reasons.append(f"{name}: no ListAndWatch stream open")
    return reasons or ["not ready"]


class ProbeServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP/1.1 on the event loop.

    h11 keeps each connection's protocol state (framing, keep-alive, HTTP/1.0, malformed input) and asyncio streams
    carry the bytes: aiohttp's server did the same for three GET pages with 10 MB more resident memory in ``serve``.
    """

    def __init__(
        self,
        readiness: Manager | NotReady,
        metrics: Metrics,
        settings: ProbeSettings,
        *,
        clock: Clock = time.monotonic,
        supervisor: Supervisor | None = None,
    ) -> None:
        """``readiness``: the device plugin's manager, or what says why the node is not ready (DRA mode).
        ``supervisor``: whose failing tasks turn ``/healthz`` red; without one, only the event loop's lag does."""
        if settings.address is None:
            raise ValueError("ProbeServer needs settings.address")
        self._address = settings.address
        self._not_ready = readiness if callable(readiness) else partial(not_ready_reasons, readiness)
        self._metrics = metrics
        self._settings = settings
        self._supervisor = supervisor
        self.monitor = LoopLagMonitor(settings.loop_check_interval_s, clock)
        self._tasks = TaskSet("probes")
        self._server: asyncio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the one picked for port 0)."""
        if self._port is None:
            raise RuntimeError("the probe server is not serving")
        return self._port

    def healthz(self) -> tuple[int, str]:
        """200 while the event loop keeps time and no task keeps failing; 503 naming what does not."""
        problems = []
        lag_s, limit_s = self.monitor.lag_s, self._settings.max_loop_lag_s
        if lag_s > limit_s:
            problems.append(f"event loop {lag_s:.1f} s late (limit {limit_s:g} s)\n")
        if self._supervisor is not None:
            problems += [f"task {name} keeps failing: {why}\n" for name, why in self._supervisor.failing().items()]
        if problems:
            return 503, "".join(problems)
        return 200, "ok\n"

    def readyz(self) -> tuple[int, str]:
        """200 when the node is ready (every resource served, registered and watched); 503 naming what is not."""
        reasons = self._not_ready()
        if reasons:
            return 503, "not ready:\n" + "".join(f"{r}\n" for r in reasons)
        return 200, "ready\n"

    async def start(self) -> None:
        """Start measuring the loop and listen; raises ProbeServerError when the address cannot be bound."""
        try:
            server = await asyncio.start_server(self._accept, self._address.host or None, self._address.port)
        except OSError as exc:
            raise ProbeServerError(f"--metrics-address {self._address}: cannot listen: {exc.strerror or exc}") from None
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        self._tasks.supervise(self.monitor.run, "event-loop lag")
        self._metrics.watch_loop(lambda: self.monitor.lag_s)
        log.info("serving probes and metrics", address=str(self._address), port=self._port)

    async def aclose(self) -> None:
        """Stop listening and measuring, and drop every open connection; safe to call twice."""
        self._metrics.watch_loop(None)
        server, self._server, self._port = self._server, None, None
        if server is not None:
            # Stop accepting first, so that no connection starts while the open ones are being cancelled.
            server.close()
        await self._tasks.aclose()
        if server is not None:
            await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Through the task set rather than start_server's own task: aclose must be able to cancel and await every
        # connection, and a failure must be logged by us rather than reach the loop's exception handler.
        # Here, not at the top: h11 and the HTTP framing load only where probes are served.
        from gpuplugin.daemon.http import Connection

        connection = Connection(reader, writer, self._page, self._settings.http_idle_timeout_s)
        try:
            self._tasks.spawn(connection.serve(), "http connection", expect_end=True)
        except RuntimeError:  # accepted while closing
            writer.transport.abort()

    def _page(self, method: bytes, target: bytes, accept: str | None) -> Page:
        """The answer to one request. No access log: the kubelet probes every few seconds, and a line each time
        would drown the plugin's own."""
        # The query is ignored; the absolute form (``http://host/path``) is what a client talking to a proxy sends.
        path = target.partition(b"?")[0]
        scheme, sep, rest = path.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            path = b"/" + rest.partition(b"/")[2]
        if path not in (b"/healthz", b"/readyz", b"/metrics"):
            return text_page(404)
        if method not in (b"GET", b"HEAD"):
            page = text_page(405)
            page[1].append((b"allow", _ALLOWED_METHODS))
            return page
        try:
            if path == b"/healthz":
                return text_page(*self.healthz())
            if path == b"/readyz":
                return text_page(*self.readyz())
            body, content_type = self._metrics.render(accept)
            return 200, [(b"content-type", content_type.encode("latin-1"))], body
        except Exception:
            log.exception("probe page failed", path=path.decode("latin-1"))
            return text_page(500)


def text_page(status: int, text: str | None = None) -> Page:
    """A plain-text page; by default the status and its reason, as in ``404 Not Found``."""
    if text is None:
        text = f"{status} {reason(status).decode()}\n"
    return status, [(b"content-type", b"text/plain; charset=utf-8")], text.encode()


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
