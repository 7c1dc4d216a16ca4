"""One gpuplugin per node: an exclusive lock on a file in the state directory, and the sockets of dead instances.

Two instances on one node (a second DaemonSet, a rolling update with ``maxSurge``, a ``serve`` started by hand)
would fight over the kubelet: the newest registration wins, and the one that stops tells the kubelet that the
resource has no devices. The lock makes the second one wait until the first has gone (or give up with one line),
so only one ever serves. ``flock`` locks belong to the open file: the kernel drops them when the holder dies, even
by SIGKILL, so a crashed instance never blocks the next one.

The lock file is never removed: removing it while another instance waits on the old inode would let a third one
lock a new file beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("gpuplugin.core.instance")

LOCK_FILE = "gpuplugin.lock"
#: How often a waiting instance tries the lock again (seconds): a takeover within a second of the holder's exit.
RETRY_INTERVAL_S = 0.2


class InstanceLockError(Exception):
    """The instance lock cannot be taken; the message is one line naming the lock file and what to do."""


class InstanceLocked(InstanceLockError):
    """Another instance holds the lock and did not release it in the time allowed."""


@dataclass(frozen=True, slots=True)
class SocketIdentity:
    """A socket file as we created it: a file of the same name made by another instance differs.

    The inode alone is not enough: a filesystem hands a freed inode number to the next file it makes.
    """

    device: int
    inode: int
    changed_ns: int
    """st_ctime_ns: when the inode was made or last changed; nothing changes a socket's after it is made."""

    @classmethod
    def of(cls, path: Path) -> SocketIdentity | None:
        """The identity of the file at ``path`` now; None when there is none. Blocking: call it in a thread."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_ctime_ns)


def remove_if_ours(path: Path, identity: SocketIdentity | None) -> bool:
    """Remove ``path`` only if it is still the file we created; True when removed. Blocking: call it in a thread.

    Another instance may have replaced it with its own socket of the same name (a shared state directory): that
    one is left alone. The check and the removal are not atomic, but only a rename between the two could slip in,
    and nothing renames sockets over ours.
    """
    if identity is None or SocketIdentity.of(path) != identity:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


class InstanceLock:
    """The node's one-instance lock at ``<state_dir>/gpuplugin.lock``; the file records the holder's PID."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        self.waiting_for: str | None = None
        """While waiting: who holds the lock (for the readiness probe); None otherwise."""

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def acquire(
        self, wait_s: float | None, *, stop: asyncio.Event | None = None, clock: Callable[[], float] = time.monotonic
    ) -> bool:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder to go (None: as long as it takes, 0: not).

        True once held; False when ``stop`` was set while waiting (nothing was started, nothing needs undoing).
        Raises InstanceLocked naming the holder when the time is up, InstanceLockError when the file cannot be
        opened.
        """
        try:
            fd = await asyncio.to_thread(self._open)
        except OSError as exc:
            raise InstanceLockError(f"cannot open the instance lock {self.path}: {exc.strerror or exc}") from None
        deadline = None if wait_s is None else clock() + wait_s
        try:
            while not await asyncio.to_thread(_try_lock, fd):
                holder = await asyncio.to_thread(_read_holder, fd)
                if deadline is not None and clock() >= deadline:
                    waited = f" after waiting {wait_s:g} s" if wait_s else ""
                    raise InstanceLocked(
                        f"another gpuplugin ({holder}) serves this node: it holds {self.path}{waited}; stop it, or "
                        "give --instance-wait SECONDS to wait for it"
                    )
                if self.waiting_for is None:
                    log.warning(
                        "another gpuplugin serves this node; waiting for it to stop",
                        holder=holder,
                        lock=str(self.path),
                        wait_s=wait_s,
                    )
                self.waiting_for = holder
                if stop is None:
                    await asyncio.sleep(RETRY_INTERVAL_S)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY_INTERVAL_S):
                            await stop.wait()
                    if stop.is_set():
                        os.close(fd)
                        return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            self.waiting_for = None
        await asyncio.to_thread(_write_holder, fd)
        self._fd = fd
        log.info("instance lock taken", lock=str(self.path))
        return True

    def release(self) -> None:
        """Let the next instance in (closing the file drops the lock); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> str:
    """``PID n`` as the holder wrote it; the PID is of the holder's PID namespace (1 in a container)."""
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdecimal() else "PID unknown"


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


async def remove_dead_sockets(directory: Path, prefix: str) -> list[str]:
    """Remove the sockets a dead instance left in ``directory`` (see ``dead_sockets_removed``), logging each."""
    removed = await asyncio.to_thread(dead_sockets_removed, directory, prefix)
    for name in removed:
        log.info("removed the socket of a stopped instance", socket=str(directory / name))
    return removed


def dead_sockets_removed(directory: Path, prefix: str) -> list[str]:
    """Remove our sockets (``<prefix>-*.sock``) in ``directory`` that nobody listens on: left by a killed instance.

    A socket whose connect() is refused has no listener and never will; one that accepts belongs to a live
    instance and is kept. Blocking: call it in a thread. Returns the names removed.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(f"{prefix}-") and entry.name.endswith(".sock")):
            continue
        try:
            if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:
            continue
        if listened_on(entry.path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        removed.append(entry.name)
    return removed


def listened_on(path: str) -> bool:
    """Something accepts connections on the unix socket ``path`` (a missing file: no). Blocking: call it in a
    thread."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            # Refused: a socket file with no listener behind it. Anything else (a full backlog, a timeout):
            # someone may be there, so the file stays.
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True
