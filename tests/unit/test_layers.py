"""The import-linter contract of pyproject.toml names every part of the code, and the code keeps it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def _parts() -> set[str]:
    """Every package and top-level module of broker/ and workers/, as dotted names."""
    parts = set()
    for root in ("broker", "workers"):
        for path in (ROOT / root).iterdir():
            if path.is_dir() and (path / "__init__.py").exists():
                parts.add(f"{root}.{path.name}")
            elif path.suffix == ".py" and path.name != "__init__.py":
                parts.add(f"{root}.{path.stem}")
    return parts


def test_every_package_has_a_layer() -> None:
    """A new package or top-level module must be given its place in the layers (docs/architecture.md)."""
    layers = _contracts()["layers"]["layers"]
    assert isinstance(layers, list)
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    placed_or_inside = {part for part in _parts() if part in placed or part.split(".")[0] in placed}
    assert _parts() - placed_or_inside == set()
    assert placed - _parts() - {"workers"} == set(), "the contract names a package that no longer exists"


def test_imports_keep_the_layers() -> None:
    """``lint-imports`` (also run by ``make lint``) finds every contract kept."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert command is not None, "import-linter is not installed: pip install -e '.[test]'"
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
