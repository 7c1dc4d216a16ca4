#!/usr/bin/env python3
"""A stand-in for ``nvidia-smi compute-policy``: ``-i <uuid> --set-timeslice=<n>`` records the GPU's interval in the
JSON file ``$FAKE_NVIDIA_SMI_STATE`` (GPU UUIDs to intervals; a GPU must be listed there to exist) and ``-l`` lists
it as a table; ``$FAKE_NVIDIA_SMI_SLEEP`` seconds of delay first, to be timed out."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

NAMES = ("Default", "Short", "Medium", "Long")


def main(args: list[str]) -> int:
    time.sleep(float(os.environ.get("FAKE_NVIDIA_SMI_SLEEP", "0")))
    state = Path(os.environ["FAKE_NVIDIA_SMI_STATE"])
    gpus: dict[str, int] = json.loads(state.read_text())
    if args[:2] != ["compute-policy", "-i"] or len(args) != 4:
        print(f"Invalid combination of input arguments: {' '.join(args)}", file=sys.stderr)
        return 2
    gpu, action = args[2], args[3]
    if gpu not in gpus:
        print("No devices were found", file=sys.stderr)
        print("(the second line of the error)", file=sys.stderr)
        return 6
    if action.startswith("--set-timeslice="):
        gpus[gpu] = int(action.removeprefix("--set-timeslice="))
        state.write_text(json.dumps(gpus))
        print(f"Set timeslice to {gpus[gpu]} for GPU {gpu}")
        return 0
    # As the H200's driver prints it.
    print("+-------------------------------------+")
    print("| GPU compute policies:               |")
    print("| GPU     Name           Value        |")
    print("|=====================================|")
    print(f"|   0   Timeslice       {NAMES[gpus[gpu]]:<14}|")
    print("+-------------------------------------+")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
