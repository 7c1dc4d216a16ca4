"""Fixtures shared by every test, and the checks that hold for all of them (no leaked asyncio tasks)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail any test that leaves an asyncio task running behind it."""
    before = set(asyncio.all_tasks())
    yield
    # Give tasks that are finishing a few loop turns to do so.
    for _ in range(5):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"leaked tasks: {[t.get_name() for t in leaked]}"


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Undo any logging set-up a test made (the CLI configures a level filter), so capture_logs sees everything."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes, and tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="gp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
