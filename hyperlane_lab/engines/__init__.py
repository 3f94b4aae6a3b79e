"""Engines by name: ``torch`` (always) and ``onnxruntime`` (imported only when selected)."""

from __future__ import annotations

import importlib
from typing import Any

from hyperlane_lab.engines.base import StageEngine
from hyperlane_lab.registry import Registry

__all__ = ["ENGINES", "StageEngine", "create_engine", "names"]

# name -> "module:function"; the function takes (source, span, dtype, device, spec, **options)
ENGINES: Registry[str] = Registry("engine")
ENGINES.add("torch", "hyperlane_lab.models.loading:load_stage")
ENGINES.add("onnxruntime", "hyperlane_lab.engines.ort_engine:load_ort_stage")


def names() -> list[str]:
    return ENGINES.names()


def create_engine(name: str, **kwargs: Any) -> StageEngine:
    """Build a stage with engine ``name`` (ValueError listing valid engines if unknown)."""
    module, func = ENGINES.get(name).split(":")
    factory = getattr(importlib.import_module(module), func)
    engine: StageEngine = factory(**kwargs)
    return engine
