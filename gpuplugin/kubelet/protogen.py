"""Regenerates the Python code of proto/ with betterproto2's compiler (``make proto``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ("v1beta1/api.proto",)
"""The device plugin API: the kubelet contract that tests/test_proto.py checks descriptor by descriptor."""
PLUGIN_WATCHER_PROTO_FILES = ("pluginregistration/v1/api.proto",)
"""The kubelet plugin watcher's registration API, used when the device-plugins directory holds ``DEPRECATION``."""
DRA_PROTO_FILES = ("dra/v1/api.proto", "dra/v1beta1/api.proto", "dra-health/v1alpha1/api.proto")
"""The kubelet's DRA plugin API (``v1`` and ``v1beta1``, the two a 1.34 kubelet speaks; it prefers ``v1``) and its
resource-health API (``v1alpha1``, behind the 1.34 kubelet's ResourceHealthStatus gate)."""
ALL_PROTO_FILES = PROTO_FILES + PLUGIN_WATCHER_PROTO_FILES + DRA_PROTO_FILES
OPTIONS = "client_generation=async,server_generation=async"


def generate(out_dir: Path) -> None:
    """Write the generated package into ``out_dir`` (replacing what is there)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    # The compiler formats its output with ruff, which it finds on PATH.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--plugin=protoc-gen-python_betterproto2={bin_dir / 'protoc-gen-python_betterproto2'}",
                f"--python_betterproto2_out={tmp}",
                f"--python_betterproto2_opt={OPTIONS}",
                *ALL_PROTO_FILES,
            ],
            check=True,
            cwd=PROTO_DIR,
            env=env,
            capture_output=True,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp, out_dir)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gpuplugin" / "kubelet" / "api")
