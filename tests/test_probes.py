"""The probe server over real HTTP: ``/healthz``, ``/readyz``, ``/metrics``, and the listen address option."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuplugin.core.errors import ConfigError
from gpuplugin.daemon.http import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEAD_BYTES
from gpuplugin.daemon.metrics import Metrics
from gpuplugin.daemon.probes import (
    ListenAddress,
    ProbeServer,
    ProbeServerError,
    ProbeSettings,
)
from gpuplugin.testing.simulator import KubeletSimulator
from tests.fakes import until
from tests.test_metrics import GPU, make_manager, node, plant

LOCAL = ListenAddress("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9090", "127.0.0.1", 9090),
        (":8080", "", 8080),
        ("[::1]:0", "::1", 0),
        ("localhost:65535", "localhost", 65535),
        (" 0.0.0.0:80 ", "0.0.0.0", 80),
    ],
)
def test_address_forms_parse(text: str, host: str, port: int) -> None:
    """HOST:PORT, :PORT and [IPv6]:PORT give the host (empty for every interface) and port."""
    assert ListenAddress.parse(text) == ListenAddress(host, port)


@pytest.mark.parametrize(
    "text", ["8080", "", "host:", "host:http", "host:70000", "host:-1", "::1:80", "[::1]", "[]:80", "[::1:80", "a b:1"]
)
def test_bad_address_names_the_option(text: str) -> None:
    """A malformed address fails with a message naming the option and the value."""
    with pytest.raises(ConfigError, match=r"^--metrics-address: ") as caught:
        ListenAddress.parse(text)
    assert repr(text) in str(caught.value)


def test_address_error_names_a_config_key() -> None:
    """The caller chooses the option name, so a config-file key can be named instead of the flag."""
    with pytest.raises(ConfigError, match=r"^plugin\.metricsAddress: "):
        ListenAddress.parse("nope", option="plugin.metricsAddress")


@pytest.mark.parametrize("text", ["127.0.0.1:9090", ":8080", "[::1]:0"])
def test_address_prints_as_parsed(text: str) -> None:
    """An address prints back in the form it was given."""
    assert str(ListenAddress.parse(text)) == text


async def test_readyz_follows_registration_and_stream(workdir: Path) -> None:
    """/readyz is 503 naming the resource until the kubelet registers it and streams, 200 then, 503 once it goes."""
    async with plant(workdir) as p:
        status, text, _ = await p.get("/readyz")
        assert status == 503
        assert f"{GPU}: not registered with the kubelet" in text
        async with KubeletSimulator(workdir) as kubelet:
            await kubelet.wait_registered(GPU, timeout=5)
            await until(lambda: p.manager.ready)
            assert await p.get("/readyz") == (200, "ready\n", "text/plain; charset=utf-8")
        await until(lambda: not p.manager.ready)
        status, text, _ = await p.get("/readyz")
        assert status == 503
        assert f"{GPU}: no ListAndWatch stream open" in text


async def test_readyz_again_after_kubelet_restart(workdir: Path) -> None:
    """After a kubelet restart /readyz answers 200 again once the plugin has re-registered."""
    async with node(workdir) as (p, kubelet):
        assert (await p.get("/readyz"))[0] == 200
        before = len(kubelet.registrations)
        await kubelet.restart()
        await kubelet.wait_registered(GPU, after=before, timeout=5)
        await until(lambda: p.manager.ready)
        assert (await p.get("/readyz"))[0] == 200


async def test_readyz_without_resources(workdir: Path) -> None:
    """A manager serving no resource is not ready, and says so."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings(address=LOCAL))
    assert probes.readyz() == (503, "not ready:\nno resource served\n")


async def test_healthz_ok_while_the_loop_keeps_time(workdir: Path) -> None:
    """/healthz answers 200 while the event loop runs its timers on time."""
    async with plant(workdir) as p:
        assert await p.get("/healthz") == (200, "ok\n", "text/plain; charset=utf-8")


async def test_healthz_fails_when_the_lag_timer_is_overdue(workdir: Path) -> None:
    """/healthz answers 503 once the lag timer is overdue by more than the limit (a clock that jumps 10 s)."""
    now = [0.0]
    settings = ProbeSettings(address=LOCAL, max_loop_lag_s=5.0, loop_check_interval_s=3600.0)
    async with plant(workdir, settings) as p:
        clocked = ProbeServer(p.manager, Metrics(), settings, clock=lambda: now[0])
        await clocked.start()
        try:
            url = f"http://127.0.0.1:{clocked.port}/healthz"
            async with p.http.get(url) as response:
                assert response.status == 200
            now[0] += 3600.0 + 10.0
            async with p.http.get(url) as response:
                assert response.status == 503
                assert "event loop 10.0 s late (limit 5 s)" in await response.text()
        finally:
            await clocked.aclose()


async def test_healthz_fails_after_the_loop_was_blocked(workdir: Path) -> None:
    """A loop blocked past the limit makes /healthz fail, and the next on-time tick makes it pass again."""
    settings = ProbeSettings(address=LOCAL, max_loop_lag_s=0.25, loop_check_interval_s=0.3)
    async with plant(workdir, settings) as p:
        monitor = p.probes.monitor
        ticks = monitor.ticks
        await until(lambda: monitor.ticks > ticks)
        time.sleep(0.9)  # noqa: ASYNC251 - blocking the event loop is what this test is about
        status, text, _ = await p.get("/healthz")
        assert status == 503, text
        ticks = monitor.ticks
        await until(lambda: monitor.ticks > ticks + 1)
        assert (await p.get("/healthz"))[0] == 200


async def test_metrics_served_as_prometheus_text_or_openmetrics(workdir: Path) -> None:
    """/metrics is Prometheus text by default and OpenMetrics when the scraper asks for it."""
    async with plant(workdir) as p:
        status, text, content_type = await p.get("/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE gpuplugin_devices gauge" in text
        status, text, content_type = await p.get("/metrics", Accept="application/openmetrics-text; version=1.0.0")
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        assert text.endswith("# EOF\n")


async def test_unknown_paths_and_methods_refused(workdir: Path) -> None:
    """Paths other than the three answer 404, and other methods than GET and HEAD on them 405 naming those two."""
    async with plant(workdir) as p:
        for path in ("/", "/debug", "/metrics/x", "/env", "/healthz/", "/HEALTHZ"):
            assert (await p.get(path))[0] == 404
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            for path in ("/healthz", "/readyz", "/metrics"):
                async with p.http.request(method, f"http://127.0.0.1:{p.probes.port}{path}") as response:
                    assert response.status == 405
                    assert response.headers["Allow"] == "GET, HEAD"


async def test_nothing_from_the_environment_is_exposed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No page shows environment values or paths from the backend's options: only resource names and counts."""
    secret = "s3cr3t-token-value"
    monkeypatch.setenv("GPUPLUGIN_TEST_TOKEN", secret)
    async with node(workdir) as (p, _):
        for path in ("/metrics", "/healthz", "/readyz"):
            _, text, _ = await p.get(path)
            assert secret not in text
            assert str(workdir) not in text


async def test_busy_port_fails_with_the_option_named(workdir: Path) -> None:
    """Listening on a port already taken fails with ProbeServerError naming the option, and leaves nothing behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics()
        probes = ProbeServer(
            make_manager(workdir, metrics), metrics, ProbeSettings(address=ListenAddress("127.0.0.1", port))
        )
        with pytest.raises(ProbeServerError, match=re.escape(f"--metrics-address 127.0.0.1:{port}: cannot listen")):
            await probes.start()
        await probes.aclose()


async def test_close_is_idempotent_and_port_forgotten(workdir: Path) -> None:
    """aclose twice is safe, and the port is no longer reported once closed."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings(address=LOCAL))
    await probes.start()
    assert probes.port > 0
    await probes.aclose()
    await probes.aclose()
    with pytest.raises(RuntimeError):
        _ = probes.port


def test_probe_server_needs_an_address(workdir: Path) -> None:
    """A probe server without an address is a programming error, caught at construction."""
    metrics = Metrics()
    with pytest.raises(ValueError, match="address"):
        ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings())


# ---------------------------------------------------------------------------------------------------------------
# The HTTP/1.1 server over raw sockets: framing, keep-alive, and what a misbehaving client gets.


@dataclass
class Answer:
    """One HTTP response as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes


@asynccontextmanager
async def serving(directory: Path, address: ListenAddress = LOCAL, **options: Any) -> AsyncIterator[ProbeServer]:
    """A probe server on a free port, its manager not started (the pages answer all the same)."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(directory, metrics), metrics, ProbeSettings(address=address, **options))
    await probes.start()
    try:
        yield probes
    finally:
        await probes.aclose()


@asynccontextmanager
async def connected(
    port: int, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw TCP connection to the server, closed (or found closed) on the way out."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


def request(path: str, *headers: str, method: str = "GET") -> bytes:
    """An HTTP/1.1 request head with a Host header and the given header lines."""
    return "".join(f"{line}\r\n" for line in (f"{method} {path} HTTP/1.1", "Host: probe", *headers, "")).encode()


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> Answer:
    """Read one response framed by its Content-Length (the server always sends one); ``head``: no body follows."""
    async with asyncio.timeout(5):
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) [^\r\n]*", lines[0])
        assert match, lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:-2]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        body = b"" if head else await reader.readexactly(int(headers["content-length"]))
    return Answer(int(match[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server ends the connection with nothing more sent (a reset counts as ended)."""
    try:
        async with asyncio.timeout(5):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def ask(port: int, data: bytes) -> tuple[Answer, bool]:
    """Send ``data`` on a new connection: the answer, and whether the server then closed the connection."""
    async with connected(port) as (reader, writer):
        writer.write(data)
        answer = await read_answer(reader)
        return answer, await closed_by_server(reader)


@contextmanager
def no_errors_reported() -> Iterator[None]:
    """Fail if anything is logged at error level or reaches the event loop's exception handler."""
    loop = asyncio.get_running_loop()
    reached: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reached.append(context))
    try:
        with structlog.testing.capture_logs() as logs:
            yield
    finally:
        loop.set_exception_handler(previous)
    assert not reached, reached
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs


async def test_answers_carry_length_type_and_date(workdir: Path) -> None:
    """Every answer has Content-Length, Content-Type and Date, and no Connection: close while the client stays."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        writer.write(request("/healthz"))
        answer = await read_answer(reader)
        assert (answer.status, answer.body) == (200, b"ok\n")
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert answer.headers["content-length"] == "3"
        assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", answer.headers["date"])
        assert "connection" not in answer.headers


async def test_head_sends_the_headers_of_get_without_a_body(workdir: Path) -> None:
    """HEAD answers with GET's status and Content-Length and no body: the next answer follows its headers at once."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        for path in ("/healthz", "/readyz", "/metrics", "/nowhere"):
            writer.write(request(path))
            full = await read_answer(reader)
            writer.write(request(path, method="HEAD") + request("/healthz"))
            head = await read_answer(reader, head=True)
            assert head.status == full.status
            assert head.headers["content-type"] == full.headers["content-type"]
            if path == "/metrics":  # the exposition changes between two scrapes (the loop's lag)
                assert int(head.headers["content-length"]) > 0
            else:
                assert int(head.headers["content-length"]) == len(full.body) > 0
            assert (await read_answer(reader)).body == b"ok\n"


async def test_keep_alive_answers_requests_in_turn_and_pipelined(workdir: Path) -> None:
    """One connection carries request after request, and requests sent back to back are answered in order."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
            writer.write(request(path))
            assert (await read_answer(reader)).status in (200, 503)
        writer.write(request("/healthz") + request("/nowhere") + request("/readyz") + request("/metrics"))
        assert [(await read_answer(reader)).status for _ in range(4)] == [200, 404, 503, 200]


@pytest.mark.parametrize(
    "target", ["/healthz?verbose=1", "/healthz?", "http://probe/healthz", "HTTP://probe:9090/healthz?x=1"]
)
async def test_query_and_absolute_form_reach_the_page(workdir: Path, target: str) -> None:
    """The query string is ignored for routing, and an absolute-form target reaches the same page."""
    async with serving(workdir) as probes:
        answer, _ = await ask(probes.port, request(target, "Connection: close"))
        assert (answer.status, answer.body) == (200, b"ok\n")


@pytest.mark.parametrize(
    "data", [request("/healthz", "Connection: close"), b"GET /healthz HTTP/1.0\r\n\r\n"], ids=["close", "http1.0"]
)
async def test_connection_close_and_http_1_0_end_after_the_answer(workdir: Path, data: bytes) -> None:
    """A client that asks to close, or speaks HTTP/1.0, gets its answer with Connection: close, then the end."""
    async with serving(workdir) as probes:
        answer, closed = await ask(probes.port, data)
        assert (answer.status, answer.body) == (200, b"ok\n")
        assert answer.headers["connection"] == "close"
        assert closed


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET  /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (request("/healthz", "no colon here"), 400),
        (request("/healthz", "Host: twice"), 400),
        (request("/healthz", "Content-Length: many"), 400),
        (request("/healthz", "Transfer-Encoding: chunked") + b"zz\r\n\r\n", 400),
        (request("/healthz", "Transfer-Encoding: gzip"), 501),
        (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ],
)
async def test_malformed_request_answered_with_its_status_then_closed(workdir: Path, data: bytes, status: int) -> None:
    """A request h11 cannot read gets the status h11 suggests (400 mostly) with Connection: close, then the end."""
    with no_errors_reported():
        async with serving(workdir) as probes:
            answer, closed = await ask(probes.port, data)
            assert answer.status == status
            assert answer.headers["connection"] == "close"
            assert closed
            assert (await ask(probes.port, request("/healthz", "Connection: close")))[0].status == 200


async def test_malformed_head_request_answered_without_a_body(workdir: Path) -> None:
    """An error answer to a HEAD request has headers only, like any HEAD answer."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        writer.write(request("/healthz", "Transfer-Encoding: chunked", method="HEAD") + b"zz\r\n\r\n")
        answer = await read_answer(reader, head=True)
        assert answer.status == 400
        assert int(answer.headers["content-length"]) > 0
        assert await closed_by_server(reader)


async def test_oversized_head_refused_with_431(workdir: Path) -> None:
    """A request head far past MAX_REQUEST_HEAD_BYTES gets 431 and the end; one well under it is served."""
    async with serving(workdir) as probes:
        answer, closed = await ask(probes.port, request("/healthz", "X-Pad: " + "a" * (2 * MAX_REQUEST_HEAD_BYTES)))
        assert answer.status == 431
        assert closed
        many = [f"X-Pad-{i}: {'b' * 40}" for i in range(4 * MAX_REQUEST_HEAD_BYTES // 50)]
        assert (await ask(probes.port, request("/healthz", *many)))[0].status == 431
        fits = request("/healthz", "Connection: close", "X-Pad: " + "a" * (MAX_REQUEST_HEAD_BYTES // 2))
        assert (await ask(probes.port, fits))[0].status == 200


async def test_request_body_dropped_and_connection_kept(workdir: Path) -> None:
    """A small request body, sized or chunked, is read and dropped, and the connection serves the next request."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        writer.write(request("/readyz", "Content-Length: 5", method="POST") + b"hello")
        answer = await read_answer(reader)
        assert answer.status == 405
        assert "connection" not in answer.headers
        writer.write(request("/healthz", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n")
        assert (await read_answer(reader)).body == b"ok\n"
        writer.write(request("/healthz"))
        assert (await read_answer(reader)).body == b"ok\n"


async def test_body_past_the_bound_answered_then_closed(workdir: Path) -> None:
    """A body longer than MAX_REQUEST_BODY_BYTES is not read to its end: the answer comes with Connection: close."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        length = 10 * MAX_REQUEST_BODY_BYTES
        writer.write(
            request("/metrics", f"Content-Length: {length}", method="PUT") + b"x" * (2 * MAX_REQUEST_BODY_BYTES)
        )
        answer = await read_answer(reader)
        assert answer.status == 405
        assert answer.headers["connection"] == "close"
        assert await closed_by_server(reader)


async def test_expect_continue_answered_without_waiting_for_the_body(workdir: Path) -> None:
    """A client waiting for 100 Continue gets its final answer at once (no page reads a body), then the end."""
    async with serving(workdir) as probes:
        data = request("/healthz", "Content-Length: 100", "Expect: 100-continue", method="POST")
        answer, closed = await ask(probes.port, data)
        assert answer.status == 405
        assert answer.headers["connection"] == "close"
        assert closed


async def test_upgrade_request_answered_as_plain_http(workdir: Path) -> None:
    """A request offering an upgrade (h2c) is answered over HTTP/1.1, and the connection stays usable."""
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        writer.write(request("/healthz", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AA"))
        assert (await read_answer(reader)).body == b"ok\n"
        writer.write(request("/healthz"))
        assert (await read_answer(reader)).body == b"ok\n"


async def test_idle_connection_closed_after_the_timeout(workdir: Path) -> None:
    """A keep-alive connection left idle past http_idle_timeout_s is closed without a word."""
    async with serving(workdir, http_idle_timeout_s=0.2) as probes, connected(probes.port) as (reader, writer):
        writer.write(request("/healthz"))
        assert (await read_answer(reader)).status == 200
        started = time.monotonic()
        assert await closed_by_server(reader)
        assert 0.15 < time.monotonic() - started < 2.0


async def test_stalled_request_answered_408_and_closed(workdir: Path) -> None:
    """A request that stops arriving halfway gets 408 once http_idle_timeout_s has passed, then the end."""
    async with serving(workdir, http_idle_timeout_s=0.2) as probes:
        answer, closed = await ask(probes.port, b"GET /healthz HTTP/1.1\r\nHost: pro")
        assert answer.status == 408
        assert answer.headers["connection"] == "close"
        assert closed


async def test_aclose_ends_open_connections(workdir: Path) -> None:
    """aclose returns promptly with connections open (idle, or halfway through a request) and ends each of them."""
    metrics = Metrics()
    probes = ProbeServer(make_manager(workdir, metrics), metrics, ProbeSettings(address=LOCAL))
    await probes.start()
    async with connected(probes.port) as (idle, idle_writer), connected(probes.port) as (partial, partial_writer):
        for reader, writer in ((idle, idle_writer), (partial, partial_writer)):
            writer.write(request("/healthz"))
            assert (await read_answer(reader)).status == 200
        partial_writer.write(b"GET /metr")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with no_errors_reported():
            await probes.aclose()
        assert time.monotonic() - started < 1.0
        assert await closed_by_server(idle)
        assert await closed_by_server(partial)


async def test_client_reset_reaches_no_one(workdir: Path) -> None:
    """A client that resets its connection, mid-request or while answered, costs nothing but that connection."""
    with no_errors_reported():
        async with serving(workdir) as probes:
            for data in (b"GET /heal", request("/metrics") * 50):
                _, writer = await asyncio.open_connection("127.0.0.1", probes.port)
                writer.write(data)
                await writer.drain()
                # Linger with a zero timeout: closing sends a reset instead of a FIN.
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                await writer.wait_closed()
                assert (await ask(probes.port, request("/healthz", "Connection: close")))[0].status == 200


async def test_failing_page_answers_500_and_the_server_goes_on(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page that raises answers 500 and is logged once; the connection and the other pages keep working."""

    def fail(self: Metrics, accept: str | None = None) -> tuple[bytes, str]:
        raise RuntimeError("collector broke")

    monkeypatch.setattr(Metrics, "render", fail)
    async with serving(workdir) as probes, connected(probes.port) as (reader, writer):
        with structlog.testing.capture_logs() as logs:
            writer.write(request("/metrics"))
            answer = await read_answer(reader)
        assert answer.status == 500
        assert b"collector" not in answer.body
        assert [(e["event"], e["path"]) for e in logs if e["log_level"] == "error"] == [
            ("probe page failed", "/metrics")
        ]
        writer.write(request("/healthz"))
        assert (await read_answer(reader)).body == b"ok\n"


async def test_serves_on_ipv6_loopback(workdir: Path) -> None:
    """An [IPv6]:PORT address is listened on and served."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with serving(workdir, ListenAddress.parse("[::1]:0")) as probes, connected(probes.port, "::1") as (r, w):
        w.write(request("/healthz"))
        assert (await read_answer(r)).body == b"ok\n"


HEADER_LINES = [
    *(b"Host: h\r\n", b"Connection: close\r\n", b"Connection: keep-alive, Upgrade\r\n"),
    *(b"Upgrade: h2c\r\n", b"Expect: 100-continue\r\n", b"Transfer-Encoding: chunked\r\n"),
    *(b"Content-Length: 3\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999\r\n"),
    *(b"Accept: application/openmetrics-text; version=1.0.0\r\n", b"Accept: text/plain\r\n", b"X: \xff\r\n"),
]
BODIES = [b"", b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"0\r\n\r\nGET"]
#: Requests much like real ones: a request line from parts, Host and some header lines (a second Host is an error),
#: and a body or the start of another request.
LIKELY_REQUESTS = st.builds(
    lambda method, target, version, headers, body: (
        b"%s %s %s\r\nHost: p\r\n%s\r\n%s" % (method, target, version, headers, body)
    ),
    st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"get", b"OPTIONS", b"CONNECT"]),
    st.sampled_from([b"/healthz", b"/metrics", b"/metrics", b"/readyz", b"/x?y=1", b"*", b"http://h/metrics"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x"]),
    st.lists(st.sampled_from(HEADER_LINES), max_size=5).map(b"".join),
    st.sampled_from(BODIES),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A likely request with a few bytes replaced, inserted or cut."""
    data = draw(LIKELY_REQUESTS)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=2)) + data[at + draw(st.integers(0, 2)) :]
    return data


#: Mostly near-valid requests: random bytes rarely get past the request line.
RAW_REQUESTS = st.one_of(
    st.binary(max_size=200),
    LIKELY_REQUESTS,
    LIKELY_REQUESTS,
    st.lists(LIKELY_REQUESTS, min_size=2, max_size=3).map(b"".join),
    mutated(),
    mutated(),
)
#: What the fuzzed requests may be answered: pages, refusals, and h11's protocol errors; never 500.
FUZZ_STATUSES = {b"200", b"400", b"404", b"405", b"408", b"431", b"501", b"503", b"505"}


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, end the sending side, and return everything the server sends until it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        with suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


async def test_any_bytes_get_a_valid_answer_or_the_end(workdir: Path) -> None:
    """Any bytes get well-formed answers or the end of the connection, no error report, and the next client served."""
    async with serving(workdir, http_idle_timeout_s=2.0) as probes:
        port = probes.port

        @settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(data=RAW_REQUESTS)
        def fuzz(data: bytes) -> None:
            received = exchange(port, data)
            if received:
                assert re.match(rb"HTTP/1\.1 \d{3} [^\r\n]*\r\n", received), received[:200]
                statuses = set(re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", received))
                assert statuses <= FUZZ_STATUSES, (data, statuses)
            after = exchange(port, request("/healthz", "Connection: close"))
            assert after.startswith(b"HTTP/1.1 200 "), after[:200]

        with no_errors_reported():
            await asyncio.to_thread(fuzz)
