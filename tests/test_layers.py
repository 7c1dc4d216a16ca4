"""The architecture's layers, as import-linter contracts in pyproject.toml, and the tree they describe."""

from __future__ import annotations

import subprocess
import sys
import tomllib
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
