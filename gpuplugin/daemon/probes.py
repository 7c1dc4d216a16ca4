"""Liveness, readiness and metrics over HTTP: ``/healthz``, ``/readyz`` and ``/metrics`` on ``--metrics-address``.

``/healthz`` answers 200 while the event loop keeps time (a small task measures how late it runs a timer) and no
supervised task keeps failing; ``/readyz`` answers 200 only while every resource is served, registered and watched
by the kubelet (waiting for the kubelet's directory is healthy, but not ready); ``/metrics``
is the Prometheus exposition. Answers name resources and counts only: nothing from the environment or the config.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import structlog

from gpuplugin.core.errors import ConfigError
from gpuplugin.core.tasks import Supervisor, TaskSet

if TYPE_CHECKING:
    from gpuplugin.daemon.manager import Manager
    from gpuplugin.daemon.metrics import Metrics

log = structlog.get_logger("gpuplugin.daemon.probes")

Clock = Callable[[], float]

MAX_REQUEST_HEAD_BYTES = 16 * 1024
"""A request line and headers still incomplete past this size are refused with 431. Scrapers and the kubelet send
a few hundred bytes; the bound keeps one client from growing the agent's memory."""
MAX_REQUEST_BODY_BYTES = 16 * 1024
"""No page reads a body. Up to this much is read and dropped so that the connection can serve the next request;
past it the answer says ``Connection: close`` and the rest is not read."""
_READ_BYTES = 4096
"""One read from a client. h11 checks the head's size between reads, so a head is refused at the latest once it is
this much past MAX_REQUEST_HEAD_BYTES, however much the client has sent."""
_LINGER_S = 2.0
"""After the last answer, how long the client may take to read it and close its side. Closing a socket with unread
request bytes in it makes the kernel send a reset, which can destroy the answer before the client reads it."""
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
        manager: Manager,
        metrics: Metrics,
        settings: ProbeSettings,
        *,
        clock: Clock = time.monotonic,
        supervisor: Supervisor | None = None,
    ) -> None:
        """``supervisor``: whose failing tasks turn ``/healthz`` red; without one, only the event loop's lag does."""
        if settings.address is None:
            raise ValueError("ProbeServer needs settings.address")
        self._address = settings.address
        self._manager = manager
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
        """200 when every resource is served, registered and watched; 503 naming those that are not."""
        reasons = not_ready_reasons(self._manager)
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
        connection = _Connection(reader, writer, self._page, self._settings.http_idle_timeout_s)
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
            return _text(404)
        if method not in (b"GET", b"HEAD"):
            page = _text(405)
            page[1].append((b"allow", _ALLOWED_METHODS))
            return page
        try:
            if path == b"/healthz":
                return _text(*self.healthz())
            if path == b"/readyz":
                return _text(*self.readyz())
            body, content_type = self._metrics.render(accept)
            return 200, [(b"content-type", content_type.encode("latin-1"))], body
        except Exception:
            log.exception("probe page failed", path=path.decode("latin-1"))
            return _text(500)


def _text(status: int, text: str | None = None) -> Page:
    """A plain-text page; by default the status and its reason, as in ``404 Not Found``."""
    if text is None:
        text = f"{status} {_reason(status).decode()}\n"
    return status, [(b"content-type", b"text/plain; charset=utf-8")], text.encode()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class _Connection:
    """One client connection: reads requests, answers each through the page function, closes when either side is
    done. h11 decides what the bytes mean and whether the connection can carry another request."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        page: Callable[[bytes, bytes, str | None], Page],
        timeout_s: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._page = page
        self._timeout_s = timeout_s
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        self._method = b""
        """The method of the request being answered: a HEAD answer has headers only, even an error's."""

    async def serve(self) -> None:
        """Answer requests until the connection should close, then close it; errors end this connection only."""
        graceful = False
        try:
            await self._converse()
            graceful = True
        except OSError:
            pass  # reset by the client, or an answer it did not take in time (TimeoutError is an OSError)
        finally:
            await self._close(graceful=graceful)

    async def _converse(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._timeout_s):
                    request = await self._receive()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint)
                return
            except TimeoutError:
                # An idle keep-alive connection just closes; one that stalled inside a request is told why.
                if self._http.their_state is h11.IDLE and not self._http.trailing_data[0]:
                    return
                await self._refuse(408)
                return
            if request is None:
                return
            if not request.http_version.startswith(b"1."):
                # h11 parses any version; a client speaking HTTP/2 or later over this would misread the answer.
                await self._refuse(505)
                return
            accept = b", ".join(value for name, value in request.headers if name == b"accept")
            await self._send(*self._page(request.method, request.target, accept.decode("latin-1") or None))
            if self._http.our_state is not h11.DONE or self._http.their_state is not h11.DONE:
                return
            self._http.start_next_cycle()
            self._method = b""

    async def _refuse(self, status: int) -> None:
        """Answer a request that cannot be served, where an answer can still be sent; the connection ends after."""
        if self._http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(*_text(status), close=True)

    async def _receive(self) -> h11.Request | None:
        """The next request, its body read and dropped up to the bound; None once the client has closed."""
        request: h11.Request | None = None
        body_bytes = 0
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                # A client waiting for 100 Continue would only send a body no page reads: answer it instead, and
                # close after, as for a body too long to drop.
                if request is not None and (
                    self._http.they_are_waiting_for_100_continue or body_bytes > MAX_REQUEST_BODY_BYTES
                ):
                    return request
                self._http.receive_data(await self._reader.read(_READ_BYTES))
            elif isinstance(event, h11.Request):
                request = event
                self._method = event.method
            elif isinstance(event, h11.Data):
                body_bytes += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request
            else:  # ConnectionClosed; PAUSED cannot come before the request is complete
                return None

    async def _send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False) -> None:
        """Send one answer; ``close`` (or a request not read whole) tells the client the connection ends after it."""
        headers = [*headers, (b"content-length", b"%d" % len(body)), (b"date", formatdate(usegmt=True).encode())]
        if close or self._http.their_state in (h11.IDLE, h11.SEND_BODY, h11.ERROR):
            # A request not read whole (malformed, stalled, or its body left unread) leaves no way to find where the
            # next one starts, so the client must know not to send it here. h11 then moves to MUST_CLOSE.
            headers.append((b"connection", b"close"))
        data = self._http.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if self._method != b"HEAD":
            data += self._http.send(h11.Data(data=body))
        data += self._http.send(h11.EndOfMessage())
        self._writer.write(data)
        async with asyncio.timeout(self._timeout_s):
            await self._writer.drain()

    async def _close(self, *, graceful: bool) -> None:
        """Close after a last answer, letting the client read it; abort at once on an error or cancellation."""
        closed = False
        try:
            if graceful:
                async with asyncio.timeout(_LINGER_S):
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
                    while await self._reader.read(_READ_BYTES):
                        pass  # what the client still sends is not read by anyone; drop it until it closes
                    self._writer.close()
                    await self._writer.wait_closed()
                    closed = True
        except OSError:
            pass
        finally:
            if not closed:
                self._writer.transport.abort()
