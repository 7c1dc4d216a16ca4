"""HTTP/1.1 for the probe server: one client connection, framed by h11, answered page by page."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from email.utils import formatdate

import h11

from gpuplugin.daemon.probes import Page, reason, text_page

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


class Connection:
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
            await self._send(*text_page(status), close=True)

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
        data = self._http.send(h11.Response(status_code=status, headers=headers, reason=reason(status)))
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
