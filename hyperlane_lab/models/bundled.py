"""The trained TinyStories model shipped inside the package (MIT; see assets/stories260K/LICENSE)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_MODEL_NAME", "bundled_model_path", "resolve_model"]

BUNDLED_MODEL_NAME = "stories260K"


def bundled_model_path() -> Path:
    """Folder of the bundled HF checkpoint (config, safetensors, tokenizer); works offline."""
    return Path(__file__).resolve().parent.parent / "assets" / BUNDLED_MODEL_NAME


def resolve_model(model: str | Path | None) -> str:
    """``None`` or ``"stories260K"`` -> the bundled model's folder; anything else unchanged."""
    if model is None or str(model) in (BUNDLED_MODEL_NAME, "bundled"):
        return str(bundled_model_path())
    return str(model)
