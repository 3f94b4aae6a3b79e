"""Packaging: every package folder is listed in pyproject (kernels/ ships as hyperlane_lab.kernels)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hyperlane_lab").rglob("__init__.py")
    } | {"hyperlane_lab.kernels"}
    assert listed == found, f"update [tool.setuptools] packages in pyproject.toml: {sorted(found ^ listed)}"


def test_kernels_importable_as_subpackage() -> None:
    import hyperlane_lab.kernels as k

    assert Path(k.__file__).parent == ROOT / "kernels"
