"""The control protocol of the mock backend: JSON lines over a unix socket, one request and one answer a line.

Requests (``gpu`` is a GPU index, ``instance`` an optional ``[gpu_instance, compute_instance]`` pair)::

    {"op": "xid", "gpu": 0, "xid": 79, "instance": [1, 0]}
    {"op": "lose", "gpu": 0, "reason": "fell off the bus"}     reason optional
    {"op": "recover", "gpu": 0, "instance": [1, 0]}             instance optional
    {"op": "unplug", "gpu": 0}
    {"op": "plug", "gpu": 0}
    {"op": "status"}
    {"op": "timeslices"}                                         each GPU's time-slice interval (0 Default … 3 Long)

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; a bad request never closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles.os
import structlog

from gpuplugin.core.instance import SocketIdentity, listened_on, remove_if_ours
from gpuplugin.core.tasks import TaskSet
from gpuplugin.devices.health import MAX_XID

log = structlog.get_logger("gpuplugin.mock")

#: Longest request line; a longer one is answered with an error and the connection closed.
MAX_LINE_BYTES = 64 * 1024
#: Seconds between two looks at the control socket's file: a deleted socket is served again within about this.
CHECK_INTERVAL_S = 1.0
#: What a lost GPU reports unless the request says otherwise (XID 79's words).
DEFAULT_LOST_REASON = "GPU has fallen off the bus"


class ControlRequestError(ValueError):
    """A control request is malformed or names something that does not exist; resending it does not help."""


class ControlSocketBusy(OSError):
    """Another mock backend listens on the control socket's path; its socket is not taken over."""


class ControlUnavailable(ConnectionError):
    """No mock backend answers on the control socket; retrying helps once ``gpuplugin serve`` runs."""


@dataclass(frozen=True, slots=True)
class XidRequest:
    """Raise an XID on a GPU, or on one partition of it."""

    gpu: int
    xid: int
    instance: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class LoseRequest:
    """The GPU falls off the bus: Unhealthy, and its probe fails, until it is recovered."""

    gpu: int
    reason: str = DEFAULT_LOST_REASON


@dataclass(frozen=True, slots=True)
class RecoverRequest:
    """An operator reset the GPU (or one partition): Healthy now, and no longer lost."""

    gpu: int
    instance: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class UnplugRequest:
    """Take the GPU out of the inventory."""

    gpu: int


@dataclass(frozen=True, slots=True)
class PlugRequest:
    """Put an unplugged GPU back into the inventory."""

    gpu: int


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Report every GPU: index, UUID, health, faults, lost, present."""


@dataclass(frozen=True, slots=True)
class TimeslicesRequest:
    """Report every GPU's time-slice interval, as DRA claims set it (0 Default, 1 Short, 2 Medium, 3 Long)."""


ControlRequest = (
    XidRequest | LoseRequest | RecoverRequest | UnplugRequest | PlugRequest | StatusRequest | TimeslicesRequest
)
ControlHandler = Callable[[ControlRequest], dict[str, Any]]
"""Applies a request and returns the answer's fields; raises ControlRequestError for a request it cannot apply."""

_FIELDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required fields, optional fields)
    "xid": (frozenset({"gpu", "xid"}), frozenset({"instance"})),
    "lose": (frozenset({"gpu"}), frozenset({"reason"})),
    "recover": (frozenset({"gpu"}), frozenset({"instance"})),
    "unplug": (frozenset({"gpu"}), frozenset()),
    "plug": (frozenset({"gpu"}), frozenset()),
    "status": (frozenset(), frozenset()),
    "timeslices": (frozenset(), frozenset()),
}
OPS = tuple(_FIELDS)


def parse_request(message: object) -> ControlRequest:
    """Check one decoded request line; the error names the field that is wrong."""
    if not isinstance(message, dict):
        raise ControlRequestError(f"a request is a JSON object, got {type(message).__name__}")
    op = message.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise ControlRequestError(f"op: must be one of {', '.join(OPS)}, got {op!r}")
    required, optional = _FIELDS[op]
    given = set(message) - {"op"}
    if missing := sorted(required - given):
        raise ControlRequestError(f"{op}: missing field {', '.join(missing)}")
    if unknown := sorted(given - required - optional):
        raise ControlRequestError(f"{op}: unknown field {', '.join(unknown)}")
    match op:
        case "xid":
            return XidRequest(_index(message, "gpu"), _xid(message), _instance(message))
        case "lose":
            reason = message.get("reason", DEFAULT_LOST_REASON)
            if not isinstance(reason, str) or not reason:
                raise ControlRequestError(f"reason: must be a non-empty string, got {reason!r}")
            return LoseRequest(_index(message, "gpu"), reason)
        case "recover":
            return RecoverRequest(_index(message, "gpu"), _instance(message))
        case "unplug":
            return UnplugRequest(_index(message, "gpu"))
        case "plug":
            return PlugRequest(_index(message, "gpu"))
        case "timeslices":
            return TimeslicesRequest()
        case _:
            return StatusRequest()


def _index(message: Mapping[str, object], name: str) -> int:
    value = message[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ControlRequestError(f"{name}: must be a non-negative integer, got {value!r}")
    return value


def _xid(message: Mapping[str, object]) -> int:
    """An XID the driver could report: NVIDIA's catalogue ends below 200; the health policy's range leaves room."""
    value = message["xid"]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_XID:
        raise ControlRequestError(f"xid: must be an XID number from 0 to {MAX_XID}, got {value!r}")
    return value


def _instance(message: Mapping[str, object]) -> tuple[int, int] | None:
    value = message.get("instance")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ControlRequestError(f"instance: must be [gpu_instance, compute_instance], got {value!r}")
    return (value[0], value[1])


def _answer(payload: Mapping[str, Any]) -> bytes:
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode()


class ControlServer:
    """Serves the control protocol on a unix socket, handing each parsed request to ``handler``.

    A supervised task looks at the socket's file every ``check_interval_s``: deleted (someone cleaned ``/run``) or
    replaced by a file nobody listens on, it is served again at the same path; a socket another live mock backend
    serves there is never taken over.
    """

    def __init__(self, path: Path, handler: ControlHandler, *, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.path = path
        self._handler = handler
        self._check_interval_s = check_interval_s
        self._server: asyncio.Server | None = None
        self._replaced: list[asyncio.Server] = []
        """Servers whose socket file was deleted: closed, their open connections still served until ``aclose``."""
        self._tasks = TaskSet("mock")
        self._other: SocketIdentity | None = None
        """The socket another live mock backend serves at our path, once we found it there (warned of once)."""
        self._connections = TaskSet("mock-control")
        self._writers: set[asyncio.StreamWriter] = set()
        self._identity: SocketIdentity | None = None
        """The socket file we created; another backend's file at the same path is never removed."""

    async def start(self) -> None:
        """Listen on ``path``. Raises ControlSocketBusy when another mock backend listens there (its socket is
        left alone; asyncio would replace it), OSError when the socket cannot be made."""
        await self._listen()
        self._tasks.supervise(self._keep_serving, "control socket")
        log.info("mock control listening", socket=str(self.path))

    async def _listen(self) -> None:
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        if await asyncio.to_thread(listened_on, str(self.path)):
            raise ControlSocketBusy(f"another mock backend listens on {self.path}")
        # A plain callback, not a coroutine: connections then run in our TaskSet, which cancels them on close.
        server = await asyncio.start_unix_server(self._accept, path=self.path, limit=MAX_LINE_BYTES)
        try:
            # Whoever can connect can mark GPUs unhealthy.
            await asyncio.to_thread(os.chmod, self.path, 0o600)
            # After the chmod, which changes the file's ctime.
            identity = await asyncio.to_thread(SocketIdentity.of, self.path)
        except BaseException:
            server.close()
            raise
        self._server, self._identity = server, identity

    async def _keep_serving(self) -> None:
        """Serve again at ``path`` whenever our socket file is gone; runs until cancelled (supervised: an error
        serving again is retried with backoff, and reported once it keeps failing)."""
        while True:
            await asyncio.sleep(self._check_interval_s)
            found = await asyncio.to_thread(SocketIdentity.of, self.path)
            if found == self._identity:
                continue
            old = self._server
            try:
                await self._listen()
            except ControlSocketBusy:
                # Looked at again each time (a connect): once nobody listens there, the file is stale and ours.
                if found == self._other:
                    continue
                self._other = found
                log.warning("mock control socket now served by another mock backend; leaving it", socket=str(self.path))
                continue
            self._other = None
            if old is not None:
                # Its file is gone: nobody can connect to it any more; its open connections go on until aclose.
                old.close()
                self._replaced.append(old)
            log.warning("mock control socket gone; serving it again", socket=str(self.path))

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self._connections.spawn(self._serve(reader, writer), "connection", expect_end=True)
        except RuntimeError:
            # Closing: no new connections.
            writer.close()
            return
        self._writers.add(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    # Over the limit: the rest of that line may still be coming, so we cannot find the next one.
                    writer.write(_answer({"ok": False, "error": f"request longer than {MAX_LINE_BYTES} bytes"}))
                    await writer.drain()
                    return
                if not line:
                    return
                if line.strip():
                    writer.write(_answer(self._handle(line)))
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(json.loads(line))
            return {"ok": True, **self._handler(request)}
        except ControlRequestError as e:
            return {"ok": False, "error": str(e)}
        except ValueError as e:
            # Not JSON, or not UTF-8.
            return {"ok": False, "error": f"not a JSON request: {e}"}
        except Exception as e:
            log.exception("mock control request failed", request=line[:200].decode(errors="replace"))
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    async def aclose(self) -> None:
        """Stop listening, end every connection and remove the socket file; safe to call twice."""
        if self._server is not None:
            # First, so that the checker replaces no server from here on.
            await self._tasks.aclose()
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await self._connections.aclose()
            # A connection cancelled before its task first ran never reached its own finally.
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            for replaced in (*self._replaced, server):
                await replaced.wait_closed()
            self._replaced.clear()
            await asyncio.to_thread(remove_if_ours, self.path, self._identity)


async def control(
    socket_path: str | os.PathLike[str], request: Mapping[str, Any], *, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Send one request to a mock backend and return its answer (``ok`` false included).

    Raises ControlUnavailable if nothing listens on ``socket_path`` or it does not answer within ``timeout_s``.
    """
    path = os.fspath(socket_path)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
            try:
                writer.write(_answer(request))
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlUnavailable(
            f"no mock backend listening on {path}: is `gpuplugin serve --backend mock` running?"
        ) from None
    except TimeoutError:
        raise ControlUnavailable(f"the mock backend on {path} did not answer within {timeout_s:g} s") from None
    except OSError as e:
        raise ControlUnavailable(f"cannot talk to the mock backend on {path}: {e}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlUnavailable(f"the mock backend on {path} closed the connection without a valid answer")
    return answer
