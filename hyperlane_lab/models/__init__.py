"""Model core: a functional Llama-family decoder split into stages with explicit KV caches.

Names are resolved on first use (PEP 562), so ``hyperlane_lab.models.config`` (ModelSpec and the
presets) can be imported without torch: the planning layer derives its shapes from it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperlane_lab.models.bundled import bundled_model_path, resolve_model
    from hyperlane_lab.models.config import PRESETS, ModelSpec
    from hyperlane_lab.models.loading import LoadStats, load_stage, load_stage_weights, parse_dtype
    from hyperlane_lab.models.stage import TorchStage
    from hyperlane_lab.models.tokenizer import load_tokenizer

_WHERE = {
    "PRESETS": "config",
    "ModelSpec": "config",
    "LoadStats": "loading",
    "load_stage": "loading",
    "load_stage_weights": "loading",
    "parse_dtype": "loading",
    "TorchStage": "stage",
    "bundled_model_path": "bundled",
    "resolve_model": "bundled",
    "load_tokenizer": "tokenizer",
}

__all__ = [
    "PRESETS",
    "LoadStats",
    "ModelSpec",
    "TorchStage",
    "bundled_model_path",
    "load_stage",
    "load_stage_weights",
    "load_tokenizer",
    "parse_dtype",
    "resolve_model",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'hyperlane_lab.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hyperlane_lab.models.{where}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
