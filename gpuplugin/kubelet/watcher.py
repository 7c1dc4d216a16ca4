"""Noticing kubelet restarts: ``kubelet.sock`` created again, or one of our sockets deleted.

inotify tells us at once; where it is unavailable (not Linux, or out of watches) a poll of the directory does,
within ``poll_interval_s``. A directory that does not exist yet, or was removed and created again, is waited for
(polled: its parent may be missing too) and then watched afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("gpuplugin.kubelet.watcher")

KUBELET_SOCKET = "kubelet.sock"


@dataclass(frozen=True, slots=True)
class WatcherSettings:
    """How the kubelet's directory is watched."""

    poll_interval_s: float = 0.2
    """Seconds (0.01 to 1) between two looks at the directory when inotify is unavailable, and for it while it is
    missing; well inside the one second we allow for noticing a restart."""
    settle_s: float = 0.05
    """Seconds (0 to 0.5) to wait after our socket is deleted before serving again, for the directory's own removal
    to show (``rm -rf`` deletes the files first); far inside the one second we allow."""
    use_inotify: bool = True
    """Off: poll, as where inotify is unavailable (not Linux, or out of watches)."""

    def __post_init__(self) -> None:
        if not 0.01 <= self.poll_interval_s <= 1.0:
            raise ValueError(f"watcher.poll_interval_s: must be from 0.01 to 1, got {self.poll_interval_s!r}")
        if not 0.0 <= self.settle_s <= 0.5:
            raise ValueError(f"watcher.settle_s: must be from 0 to 0.5, got {self.settle_s!r}")


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
    """Calls ``on_kubelet_socket`` when ``kubelet.sock`` appears, ``on_deleted(name)`` when a socket goes away.

    The directory itself may be missing (the kubelet not installed yet) or removed and created again (a node agent
    reinstalled): the watcher then calls ``on_missing``, waits for it, and calls ``on_watching`` once it watches it
    again, as it does whenever it starts watching: whatever happened unwatched is for that callback to put right.
    """

    def __init__(
        self,
        directory: Path,
        on_kubelet_socket: Callable[[], Awaitable[None]],
        on_deleted: Callable[[str], Awaitable[None]],
        settings: WatcherSettings = WatcherSettings(),
        owned: Callable[[], Collection[str]] = tuple,
        *,
        on_watching: Callable[[], Awaitable[None]] | None = None,
        on_missing: Callable[[], None] | None = None,
    ) -> None:
        self._dir = directory
        self._owned = owned
        self._on_kubelet_socket = on_kubelet_socket
        self._on_deleted = on_deleted
        self._on_watching = on_watching
        self._on_missing = on_missing
        self._settings = settings
        self._use_inotify = settings.use_inotify

    async def run(self) -> None:
        """Watch until cancelled, through the directory's absences."""
        first = True
        while True:
            if not await asyncio.to_thread(self._dir.is_dir):
                await self._wait_for_directory(first)
            first = False
            if self._use_inotify:
                try:
                    watch = await asyncio.to_thread(_watch, self._dir)
                except (ImportError, OSError) as exc:
                    if not await asyncio.to_thread(self._dir.is_dir):
                        continue  # gone again before the watch was set
                    log.warning("inotify unavailable; polling instead", watched=str(self._dir), error=str(exc))
                    self._use_inotify = False
                else:
                    if watch is None:
                        continue  # replaced while the watch was set
                    inotify, identity = watch
                    with inotify:
                        await self._follow_inotify(inotify, identity)
                    continue
            await self._run_polling()

    async def _wait_for_directory(self, first: bool) -> None:
        """Poll until the directory exists; the parent may be missing too, so inotify on it would not do."""
        if self._on_missing is not None:
            self._on_missing()
        what = "does not exist" if first else "removed"
        log.warning(f"kubelet directory {what}; waiting for it", directory=str(self._dir))
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            if await asyncio.to_thread(self._dir.is_dir):
                log.info("kubelet directory appeared; serving in it", directory=str(self._dir))
                return

    async def _watching(self) -> None:
        if self._on_watching is not None:
            await self._on_watching()

    async def _follow_inotify(self, inotify: Any, identity: tuple[int, int]) -> None:
        """Handle the directory's events until it is removed, moved away or replaced (``identity`` no longer the
        one at its path)."""
        from asyncinotify import Mask

        gone = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.UNMOUNT
        log.debug("watching with inotify", directory=str(self._dir))
        await self._watching()
        events = aiter(inotify)
        while True:
            batch = [await anext(events)]
            if batch[0].mask & (Mask.DELETE | Mask.MOVED_FROM):
                # ``rm -rf`` deletes our socket a moment before the directory: serving again at once would put a
                # socket back into it, and the rmdir would fail. Look a moment further first, unless a kubelet
                # starting (it wipes the directory, then creates its socket) says the directory stays.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.settle_s):
                        while not (
                            batch[-1].mask & (Mask.CREATE | Mask.MOVED_TO) and _named(batch[-1], KUBELET_SOCKET)
                        ):
                            batch.append(await anext(events))
                # No DELETE_SELF comes while our old socket, bound in the removed directory, still pins it: look.
                if await asyncio.to_thread(_directory_identity, self._dir) != identity:
                    return
            if any(event.mask & gone for event in batch):
                return
            # The kubelet's socket first: it serves again whatever socket of ours is missing and registers it, once;
            # our deletions after it then name sockets already replaced. The other way round, a registration done
            # between the two would be made again, and the kubelet would replace an endpoint with itself.
            if any(event.mask & (Mask.CREATE | Mask.MOVED_TO) and _named(event, KUBELET_SOCKET) for event in batch):
                await self._on_kubelet_socket()
            for event in batch:
                if event.mask & (Mask.DELETE | Mask.MOVED_FROM) and event.name is not None:
                    name = str(event.name)
                    if name != KUBELET_SOCKET:
                        await self._on_deleted(name)

    async def _run_polling(self) -> None:
        """Compare the directory with its last listing every poll interval, until the directory is gone."""
        snapshot = await asyncio.to_thread(_snapshot, self._dir)
        if snapshot is None:
            return
        last, seen = snapshot
        await self._watching()
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            snapshot = await asyncio.to_thread(_snapshot, self._dir)
            if snapshot is None:
                return
            current, now = snapshot
            # Our own sockets too: one created and deleted between two polls is in neither listing.
            for name in (seen | set(self._owned())) - now:
                await self._on_deleted(name)
            seen = now
            if current is not None and current != last:
                await self._on_kubelet_socket()
            last = current


def _named(event: Any, name: str) -> bool:
    return event.name is not None and str(event.name) == name


def _watch(directory: Path) -> tuple[Any, tuple[int, int]] | None:
    """An inotify instance watching ``directory``'s entries and its own removal, and the directory's identity; None
    if it was replaced meanwhile. Raises where inotify is unavailable, or the directory is gone. Blocks."""
    from asyncinotify import Inotify, Mask

    before = _directory_identity(directory)
    inotify = Inotify()
    try:
        inotify.add_watch(
            directory,
            Mask.CREATE | Mask.DELETE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE_SELF | Mask.MOVE_SELF,
        )
    except BaseException:
        inotify.close()
        raise
    if before is None or _directory_identity(directory) != before:
        inotify.close()
        return None
    return inotify, before


def _directory_identity(directory: Path) -> tuple[int, int] | None:
    """The directory's device and inode: a directory removed and created again has another. Blocks."""
    try:
        stat = directory.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (stat.st_dev, stat.st_ino)


def _snapshot(directory: Path) -> tuple[tuple[int, int] | None, set[str]] | None:
    """The kubelet socket's identity and the other sockets' names; None without the directory (runs in a thread)."""
    try:
        names = {e.name for e in os.scandir(directory) if e.name != KUBELET_SOCKET and not e.is_dir()}
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _identity(directory / KUBELET_SOCKET), names


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_ctime_ns)
