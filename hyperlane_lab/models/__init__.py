"""Model core: a functional Llama-family decoder split into stages with explicit KV caches."""

from hyperlane_lab.models.bundled import bundled_model_path, resolve_model
from hyperlane_lab.models.config import PRESETS, ModelSpec
from hyperlane_lab.models.loading import LoadStats, load_stage, load_stage_weights, parse_dtype
from hyperlane_lab.models.stage import TorchStage
from hyperlane_lab.models.tokenizer import load_tokenizer

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
