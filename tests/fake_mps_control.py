"""A stand-in for ``nvidia-cuda-mps-control``: ``-d`` starts a background daemon on ``$CUDA_MPS_PIPE_DIRECTORY``;
without arguments it reads one command (``get_server_list``, ``quit``) and answers as the real one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PID_FILE = "nvidia-cuda-mps-control.pid"


def _pid_file() -> Path:
    return Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"]) / PID_FILE


def running_pid() -> int | None:
    """The daemon's PID when it runs (a zombie counts as gone), else None."""
    try:
        pid = int(_pid_file().read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def serve() -> None:
    def stop(_signum: int, _frame: object) -> None:
        _pid_file().unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    _pid_file().write_text(str(os.getpid()))
    while True:
        signal.pause()


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        serve()
    if sys.argv[1:] == ["-d"]:
        if running_pid() is not None:
            print("An instance of this daemon is already running")
            return 1
        subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return 0
    command = sys.stdin.read().strip()
    pid = running_pid()
    if pid is None:
        print("Cannot find MPS control daemon process")
        return 1
    if command == "quit":
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while running_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    elif command == "get_server_list":
        # The daemon stands in for its one MPS server, so that a quit must also wait for a server to exit.
        print(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
