"""The stage interface every engine implements (torch, onnxruntime) and every transport drives."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.types import LayerSpan

__all__ = ["StageEngine"]


@runtime_checkable
class StageEngine(Protocol):
    engine_name: str
    spec: ModelSpec
    span: LayerSpan
    is_first: bool
    is_last: bool
    dtype: torch.dtype
    device: torch.device

    def open_session(self, session_id: str, batch: int, max_len: int) -> None:
        """Preallocate this stage's KV cache for ``batch`` sequences of up to ``max_len`` tokens."""

    def close_session(self, session_id: str) -> None:
        """Free the session's cache (unknown ids are ignored)."""

    def has_session(self, session_id: str) -> bool: ...

    def input_shape_ok(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Raise ValueError if ``x``/``positions`` don't fit this stage."""

    def forward(
        self, session_id: str, x: torch.Tensor, positions: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """ids [B,S] (first) or hidden [B,S,H] -> hidden [B,S,H], or logits [B,V] on the last stage."""

    def describe(self) -> dict[str, object]: ...
