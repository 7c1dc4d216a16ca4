"""Noticing kubelet restarts: ``kubelet.sock`` created again, or one of our sockets deleted.

inotify tells us at once; where it is unavailable (not Linux, or out of watches) a poll of the directory does,
within ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("gpuplugin.watcher")

KUBELET_SOCKET = "kubelet.sock"


@dataclass(frozen=True, slots=True)
class WatcherSettings:
    poll_interval_s: float = 0.2
    """Only when inotify is unavailable; well inside the one second we allow for noticing a restart."""
    use_inotify: bool = True


async def inotify_or_polling(
    inotify: Callable[[], Awaitable[None]], polling: Callable[[], Awaitable[None]], *, use_inotify: bool, what: str
) -> None:
    """Run ``inotify`` (until cancelled); where inotify is unavailable (not Linux, out of watches) run ``polling``."""
    if use_inotify:
        try:
            await inotify()
            return
        except (ImportError, OSError) as exc:
            log.warning("inotify unavailable; polling instead", watched=what, error=str(exc))
    await polling()


class SocketWatcher:
    """Calls ``on_kubelet_socket`` when ``kubelet.sock`` appears, ``on_deleted(name)`` when a socket goes away."""

    def __init__(
        self,
        directory: Path,
        on_kubelet_socket: Callable[[], Awaitable[None]],
        on_deleted: Callable[[str], Awaitable[None]],
        settings: WatcherSettings = WatcherSettings(),
        owned: Callable[[], Collection[str]] = tuple,
    ) -> None:
        self._dir = directory
        self._owned = owned
        self._on_kubelet_socket = on_kubelet_socket
        self._on_deleted = on_deleted
        self._settings = settings

    async def run(self) -> None:
        """Watch until cancelled."""
        await inotify_or_polling(
            self._run_inotify, self._run_polling, use_inotify=self._settings.use_inotify, what=str(self._dir)
        )

    async def _run_inotify(self) -> None:
        from asyncinotify import Inotify, Mask

        with Inotify() as inotify:
            inotify.add_watch(self._dir, Mask.CREATE | Mask.DELETE | Mask.MOVED_TO | Mask.MOVED_FROM)
            log.debug("watching with inotify", directory=str(self._dir))
            async for event in inotify:
                if event.name is None:
                    continue
                name = str(event.name)
                if event.mask & (Mask.CREATE | Mask.MOVED_TO) and name == KUBELET_SOCKET:
                    await self._on_kubelet_socket()
                elif event.mask & (Mask.DELETE | Mask.MOVED_FROM) and name != KUBELET_SOCKET:
                    await self._on_deleted(name)

    async def _run_polling(self) -> None:
        last, seen = await asyncio.to_thread(_snapshot, self._dir)
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            current, now = await asyncio.to_thread(_snapshot, self._dir)
            # Our own sockets too: one created and deleted between two polls is in neither listing.
            for name in (seen | set(self._owned())) - now:
                await self._on_deleted(name)
            seen = now
            if current is not None and current != last:
                await self._on_kubelet_socket()
            last = current


def _snapshot(directory: Path) -> tuple[tuple[int, int] | None, set[str]]:
    """The kubelet socket's identity and the other sockets' names (runs in a thread)."""
    return _identity(directory / KUBELET_SOCKET), set(_socket_names(directory))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_ctime_ns)


def _socket_names(directory: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(directory) if e.name != KUBELET_SOCKET and not e.is_dir()]
    except FileNotFoundError:
        return []
