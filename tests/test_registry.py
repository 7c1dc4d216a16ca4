"""Backends found by name: the built-in ones, and third-party ones through the ``gpuplugin.backends`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuplugin.backends.registry import UnknownBackend, backend_names, load_factory

ROOT = Path(__file__).resolve().parent.parent

TOY_MODULE = '''
from tests.fakes import StaticBackend, gpu_tree


def create(context):
    """A third-party backend: two fake GPUs."""
    return StaticBackend(gpu_tree(2))
'''


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution of its own (module and dist-info on sys.path) registering backend ``toy``."""
    (tmp_path / "toy_gpus.py").write_text(TOY_MODULE)
    info = tmp_path / "toy_gpus-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-gpus\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gpuplugin.backends]\ntoy = toy_gpus:create\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_built_in_backends_are_named_without_any_metadata() -> None:
    """The three built-in backends are always among the names, whatever metadata is installed."""
    assert {"mock", "nvml", "partitioned"} <= set(backend_names())


def test_a_third_party_backend_loads_through_its_entry_point(third_party: Path) -> None:
    """A distribution registering ``toy`` under ``gpuplugin.backends`` is listed and its factory loads."""
    assert "toy" in backend_names()
    factory = load_factory("toy")
    assert factory.__module__ == "toy_gpus"


def test_an_unknown_backend_names_the_installed_ones(third_party: Path) -> None:
    """Asking for a backend nobody registered is UnknownBackend listing what is installed, third-party included."""
    with pytest.raises(UnknownBackend, match=r"no backend named 'nope'; installed: .*mock.*toy"):
        load_factory("nope")


def test_the_cli_serves_a_third_party_backend_as_its_own(third_party: Path) -> None:
    """``gpuplugin devices --backend toy`` lists the third-party backend's devices, as for a built-in one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(third_party), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "gpuplugin", "devices", "--backend", "toy", "--state-dir", str(third_party)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()[1:]] == ["GPU-0", "GPU-1"], result.stdout
