"""Cancellation reaches every long-lived task of the product: nothing in it can turn a cancel into a timeout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = (ROOT / "gpuplugin", ROOT / "backends")
WAIT_FOR = re.compile(r"\basyncio\.wait_for\(|\bfrom asyncio import [^\n]*\bwait_for\b")


def test_the_product_never_uses_asyncio_wait_for() -> None:
    """No asyncio.wait_for in gpuplugin/ or backends/: on Python 3.11 a cancel that lands as it times out comes out as
    TimeoutError, and a watcher catching it kept watching in a task asked to end, so its daemon never stopped (a hang
    of the config watcher's test, one run in a few under load); asyncio.timeout tells the two apart."""
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in PRODUCT
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if WAIT_FOR.search(line)
    ]
    assert not found, f"asyncio.wait_for in the product (use asyncio.timeout): {found}"
