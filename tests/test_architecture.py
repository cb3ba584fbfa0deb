"""The architecture as declared: every package is in pyproject's list and in the import contract's
layers, engine/ has no module at its top level, no module is over 600 lines, and the names the
settings validate against are the ones the dream modules implement."""

from __future__ import annotations

from pathlib import Path

import tomllib

from onnxdream.dream.transforms import TRANSFORMS
from onnxdream.settings.choices import TRANSFORM_SETS

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"engine": "onnxdream", "exporters": "onnxdream.exporters", "models": "onnxdream.models"}
MAX_LINES = 600


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def packages_in_tree() -> set[str]:
    """Every import package the three mapped folders hold (the static folder is package data)."""
    found = {"onnxdream.static"}
    for folder, name in FOLDERS.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    return found


def test_pyproject_lists_every_package_of_the_tree():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    assert listed == packages_in_tree()


def test_the_layers_contract_names_every_package_of_onnxdream():
    contract = next(c for c in pyproject()["tool"]["importlinter"]["contracts"]
                    if c["type"] == "layers")
    named = {part.strip(" ()") for layer in contract["layers"] for part in layer.split("|")}
    top = {p.split(".")[1] for p in packages_in_tree() if p.count(".") >= 1} - {"static"}
    assert top <= named, f"packages missing from the layers contract: {sorted(top - named)}"


def test_engine_has_no_module_at_its_top_level():
    loose = {p.name for p in (REPO / "engine").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert not loose, f"put these in the package of their layer: {sorted(loose)}"


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for folder in FOLDERS
            for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"


def test_the_transform_sets_are_the_ones_settings_accept():
    assert tuple(TRANSFORMS) == TRANSFORM_SETS
