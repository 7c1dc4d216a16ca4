"""The plugin made slower on purpose, for the test that ``python -m benchmarks compare`` catches a regression.

Run as the benchmark's plugin interpreter (``--plugin-python "python tests/slowed_plugin.py"``): the command line
that follows is ``-m gpuplugin serve ...``, and every Allocate first sleeps SLOWED_ALLOCATE_MS milliseconds (in the
handler, on the event loop, as slow code there would). Nothing in the plugin itself knows of it.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

from gpuplugin.kubelet import allocate, wire

SLOWED_ALLOCATE_MS = "SLOWED_ALLOCATE_MS"


def main() -> None:
    if sys.argv[1:3] != ["-m", "gpuplugin"]:
        raise SystemExit(f"usage: {sys.argv[0]} -m gpuplugin ARGS...")
    delay_s = float(os.environ.get(SLOWED_ALLOCATE_MS, "0")) / 1000
    fast = allocate.Allocator.allocate

    def slowed(self: allocate.Allocator, request: wire.AllocateRequest) -> bytes:
        time.sleep(delay_s)
        return fast(self, request)

    allocate.Allocator.allocate = slowed  # type: ignore[method-assign]
    sys.argv = ["gpuplugin", *sys.argv[3:]]
    runpy.run_module("gpuplugin", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
