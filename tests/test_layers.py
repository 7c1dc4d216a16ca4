"""The architecture's layers, as import-linter contracts in pyproject.toml, and the tree they describe."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_are_kept() -> None:
    """Every layer imports only those below it, backends import none of each other, and nothing imports benchmarks."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout


def test_layers_contract_names_every_sub_package_and_ignores_nothing() -> None:
    """The layers contract covers each sub-package of gpuplugin, and no contract hides an import."""
    (layers,) = [c for c in CONTRACTS if c["type"] == "layers"]
    named = {part.strip() for layer in layers["layers"] for part in layer.split("|")}
    packages = {f"gpuplugin.{p.name}" for p in (ROOT / "gpuplugin").iterdir() if (p / "__init__.py").exists()}
    assert packages <= named
    assert not [c["name"] for c in CONTRACTS if c.get("ignore_imports")]


def test_the_package_root_holds_a_handful_of_modules() -> None:
    """gpuplugin/ itself holds at most 12 modules; everything else lives in a sub-package named for its layer."""
    modules = sorted(p.name for p in (ROOT / "gpuplugin").glob("*.py"))
    assert len(modules) <= 12, modules


def test_the_wheel_installs_one_namespace_without_the_benchmarks(tmp_path: Path) -> None:
    """The built wheel holds the gpuplugin package only, backends under it, the benchmark suite not at all, and its
    backend entry points name modules inside it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("gpuplugin-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        groups = archive.read(entry_points).decode()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"gpuplugin"}
    assert "gpuplugin/backends/mock/backend.py" in names
    assert "gpuplugin/backends/registry.py" in names
    assert not [n for n in names if "__pycache__" in n]
    assert "mock = gpuplugin.backends.mock:create" in groups
