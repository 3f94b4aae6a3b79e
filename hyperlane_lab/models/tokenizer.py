"""Tokenizers come from transformers (offline from a folder or GGUF; a hub id where reachable)."""

from __future__ import annotations

from typing import Any

from hyperlane_lab.errors import ModelLoadError

__all__ = ["load_tokenizer"]


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    from hyperlane_lab.models.loading import resolve_source

    src = resolve_source(source)
    try:
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
        return AutoTokenizer.from_pretrained(src.folder)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {source}: {e}") from e
