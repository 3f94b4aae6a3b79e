"""hyperlane_lab: pipeline-parallel LLM inference across a LAN's GPUs, as a research toolkit.

Heavy submodules are imported lazily on first attribute access, so ``import hyperlane_lab`` is
cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "LayerSpan": "hyperlane_lab.types",
    "SamplingParams": "hyperlane_lab.types",
    "Plan": "hyperlane_lab.types",
    "StagePlan": "hyperlane_lab.types",
    "TraceEvent": "hyperlane_lab.types",
    "WorkerInfo": "hyperlane_lab.types",
    "ModelSpec": "hyperlane_lab.models.config",
    "load_stage": "hyperlane_lab.models.loading",
    "bundled_model_path": "hyperlane_lab.models.bundled",
    "InProcessPipeline": "hyperlane_lab.generation.pipeline",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hyperlane_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext hyperlane_lab`` registers the ``%hyperlane`` magics (see hyperlane_lab.magics)."""
    from hyperlane_lab.magics import load_ipython_extension as _load

    _load(ipython)
