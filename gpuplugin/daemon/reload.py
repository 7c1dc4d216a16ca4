"""Noticing a changed config file, including Kubernetes ConfigMap updates.

A mounted ConfigMap changes by a symlink swap (``..data`` points at a new timestamped directory), so watching
the file itself would miss it. We watch its directory for any change and compare the file's content: whatever
the mechanism, a real change of content is reported once, and a touch is not.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import structlog

from gpuplugin.core.errors import ConfigError
from gpuplugin.daemon.settings import MAX_CONFIG_BYTES, decode_config
from gpuplugin.kubelet.watcher import inotify_or_polling

log = structlog.get_logger("gpuplugin.daemon.reload")


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    poll_interval_s: float = 1.0
    """Only when inotify is unavailable."""
    settle_s: float = 0.05
    """Editors and the kubelet write in several steps; wait this long after the last event before reading."""
    use_inotify: bool = True


async def read_bytes(path: Path) -> bytes:
    """The file's content, read off the event loop: ``MAX_CONFIG_BYTES`` and one more at most, so that a huge
    file is refused without being read."""
    async with aiofiles.open(path, "rb") as f:
        return await f.read(MAX_CONFIG_BYTES + 1)


def fingerprint(content: str | bytes) -> str:
    """Equal for a text and its UTF-8 bytes."""
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


class ConfigWatcher:
    """Calls ``on_change(text)`` whenever the config file's content changes; runs until cancelled."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[str], Awaitable[None]],
        *,
        initial_text: str | None,
        settings: ReloadSettings = ReloadSettings(),
    ) -> None:
        self._path = path
        self._on_change = on_change
        self._settings = settings
        self._seen = None if initial_text is None else fingerprint(initial_text)

    async def check(self) -> None:
        """Read the file and report it if its content is new (also what SIGHUP triggers)."""
        try:
            content = await read_bytes(self._path)
        except OSError as exc:
            # Mid-swap, or deleted: keep serving the old config, and say why once per state.
            if self._seen != "missing":
                log.warning("config file unreadable; keeping the current config", path=str(self._path), error=str(exc))
                self._seen = "missing"
            return
        seen = fingerprint(content)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            text = decode_config(content, str(self._path))
        except ConfigError as exc:
            # Not a config at all: refused here, once per content, as the daemon refuses a bad one.
            log.error("config refused; the current config keeps serving", error=str(exc))
            return
        await self._on_change(text)

    async def run(self) -> None:
        await inotify_or_polling(
            self._run_inotify, self._run_polling, use_inotify=self._settings.use_inotify, what=str(self._path)
        )

    async def _run_polling(self) -> None:
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            await self.check()

    async def _run_inotify(self) -> None:
        from asyncinotify import Inotify, Mask

        directory = self._path.parent
        with Inotify() as inotify:
            inotify.add_watch(
                directory,
                Mask.CREATE | Mask.MODIFY | Mask.MOVED_TO | Mask.DELETE | Mask.CLOSE_WRITE | Mask.ATTRIB,
            )
            # An edit between the first read and this watch would otherwise wait for the next one.
            await self.check()
            events = aiter(inotify)
            while True:
                await anext(events)
                # Drain the burst a symlink swap or an editor's save makes, then read once.
                while True:
                    # asyncio.timeout, not wait_for: on Python 3.11 a cancel that lands as wait_for times out comes
                    # out as TimeoutError, and the watcher would go on watching in a task asked to end.
                    try:
                        async with asyncio.timeout(self._settings.settle_s):
                            await anext(events)
                    except TimeoutError:
                        break
                await self.check()
