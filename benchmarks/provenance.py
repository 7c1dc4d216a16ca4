"""Which commit a result measured: every results file names it, and a changed checkout says so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    """The checkout's commit, whether files differ from it (None: git could not tell) and the first that do."""

    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: read only; never refresh the index of a checkout others work in.
            done = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    changed = [] if not status else [line[3:] for line in status.splitlines() if line.strip()]
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(changed),
        "changed": changed[:20],
    }


def measured_commit() -> str:
    """The commit a results file names: ``GPUPLUGIN_COMMIT`` where the tree is a copy without .git (a lent machine),
    else the checkout's, with ``-dirty`` when files differ from it; ``unknown`` where git cannot tell."""
    given = os.environ.get("GPUPLUGIN_COMMIT")
    if given:
        return given
    state = git_state()
    if state["commit"] is None:
        return "unknown"
    return str(state["commit"]) + ("-dirty" if state["dirty"] else "")
