"""Lazy access to the Triton kernel modules (``hyperlane_lab.kernels.*``, source folder ``kernels/``).

Importing a kernel module imports Triton, so codecs call ``kernel_module`` only on the Triton path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["kernel_module"]

log = logging.getLogger(__name__)


def _register_source_kernels() -> bool:
    """Map ``hyperlane_lab.kernels`` onto ``<repo>/kernels`` when the install did not (source checkouts).

    The pyproject maps the folder with ``package-dir``; an install whose package list misses
    ``hyperlane_lab.kernels`` leaves it unimportable. Returns True when the folder was found and registered.
    """
    folder = Path(__file__).resolve().parents[2] / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        return False
    spec = importlib.util.spec_from_file_location(
        "hyperlane_lab.kernels", init, submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["hyperlane_lab.kernels"] = module
    spec.loader.exec_module(module)
    log.warning(
        "hyperlane_lab.kernels was not installed; loaded it from %s (fix: list the package in pyproject "
        "and re-run `pip install -e .`)",
        folder,
    )
    return True


@functools.cache
def kernel_module(name: str) -> ModuleType:
    """``hyperlane_lab.kernels.<name>`` (imports Triton)."""
    try:
        importlib.import_module("hyperlane_lab.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "hyperlane_lab.kernels" or not _register_source_kernels():
            raise ModuleNotFoundError(
                "hyperlane_lab.kernels is not installed; reinstall hyperlane_lab (pip install -e .) with the "
                "kernels/ folder mapped to hyperlane_lab.kernels, or use backend='torch'"
            ) from exc
    return importlib.import_module(f"hyperlane_lab.kernels.{name}")
