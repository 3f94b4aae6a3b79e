"""TorchStage: the layers ``[start, end)`` of a decoder, with a preallocated KV cache per session.

The first stage also owns the embedding, the last the final norm and LM head. ``forward`` is the
stage interface every engine and transport uses:

    x: first stage token ids [B, S] int64, else hidden states [B, S, H]
    positions: [B, S] int64 absolute positions; -1 marks padding (written to a trash slot, ignored)
    returns: hidden [B, S, H]; or, on the last stage, fp32 logits [B, V] at each row's last valid
             token ([B, S, V] with ``all_logits=True``).

Positions alone say where each token's K/V goes, so prefill of any length, chunked prefill,
one-token decode and batches of different lengths all use the same path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.layers import LayerWeights, attention_mask, decoder_layer, rms_norm, rope_tables
from hyperlane_lab.models.sessions import SessionCache, StageSessions
from hyperlane_lab.types import LayerSpan

__all__ = ["SessionCache", "StageWeights", "TorchStage"]  # SessionCache re-exported from sessions

log = logging.getLogger(__name__)


@dataclass
class StageWeights:
    layers: list[LayerWeights]
    embed: torch.Tensor | None = None  # [V, H], first stage (and last when tied)
    norm: torch.Tensor | None = None  # [H], last stage
    lm_head: torch.Tensor | None = None  # [V, H], last stage

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [lw.wqkv, lw.bqkv, lw.wo, lw.w_gate_up, lw.w_down, lw.ln_attn, lw.ln_mlp]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


class TorchStage(StageSessions):
    """One pipeline stage executed with PyTorch (the ``torch`` engine)."""

    engine_name = "torch"

    def __init__(
        self,
        spec: ModelSpec,
        span: LayerSpan,
        weights: StageWeights,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        span.check_within(spec.n_layers)
        if len(weights.layers) != len(span):
            raise ValueError(f"stage {span} needs {len(span)} layers of weights, got {len(weights.layers)}")
        self.spec, self.span, self.weights = spec, span, weights
        self.dtype, self.device = dtype, torch.device(device)
        self.is_first = span.start == 0
        self.is_last = span.end == spec.n_layers
        if self.is_first and weights.embed is None:
            raise ValueError("the first stage needs the embedding table")
        if self.is_last and (weights.norm is None or weights.lm_head is None):
            raise ValueError("the last stage needs the final norm and LM head")
        self._init_sessions()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        # CUDA only: decode steps (S == 1) replay a CUDA graph (models/cuda_decode.py)
        self.cuda_graphs = os.environ.get("HYPERLANE_CUDA_GRAPHS", "1") != "0"
        self._graphs: Any = None

    # ------------------------------------------------------------------ sessions

    def _new_cache(self, batch: int, max_len: int) -> SessionCache:
        graphs = self.graph_decoder()
        if graphs is not None:  # a parked cache of this shape (with its graph) when there is one
            return graphs.new_cache(batch, max_len)  # type: ignore[no-any-return]
        return super()._new_cache(batch, max_len)

    def _release(self, cache: SessionCache) -> None:
        if self._graphs is not None:
            self._graphs.release(cache)

    def decode_choices(self) -> dict[str, Any]:
        """The CUDA decoder's kernel choices so far (``GraphDecoder.gemv_choice``: per weight shape the
        Triton GEMV or cuBLAS with the timings in µs, the all-Triton layer, the PDL mode); empty before
        its first decode capture, on CPU or with graphs off. A copy, safe to read from another thread."""
        g = self._graphs
        return dict(g.gemv_choice) if g is not None else {}

    def graph_decoder(self) -> Any:
        """The CUDA-graph decoder of this stage (None on CPU or with ``cuda_graphs`` off)."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        if self._graphs is None:
            from hyperlane_lab.models.cuda_decode import GraphDecoder

            self._graphs = GraphDecoder(self)
        return self._graphs

    def decode_graph_ready(self, session_id: str, wire: Any = None) -> bool:
        """True when this session's decode steps replay an already captured CUDA graph: such a
        step only enqueues work (no compile, no capture), so a caller may run it on a latency-
        critical thread (the worker's event loop does). ``wire``: a ``decode_wire.WireSpec`` asks
        about wire steps of that spec; None about staged steps (a wire graph would recapture)."""
        cache = self._sessions.get(session_id)
        g = cache.graph if cache is not None else None
        if g is None or self.graph_decoder() is None:
            return False
        if wire is None:
            return g.wire is None
        return g.wire is not None and g.wire.spec == wire

    def prompt_graph_ready(self, session_id: str, positions: torch.Tensor) -> bool:
        """True when a prompt step of this session at these (host) positions would replay an already
        captured prompt graph: like ``decode_graph_ready``, such a step only enqueues work."""
        graphs = self.graph_decoder()
        if graphs is None or session_id not in self._sessions:
            return False
        start = self._prompt_start(positions)
        return start is not None and graphs.prompt_ready(positions.shape[0], positions.shape[1], start)

    def prompt_input_slot(
        self, session_id: str, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """For a later stage's prompt step at these (host) positions whose graph is captured: the device tensor
        its hidden state may be uploaded into (the graph's input, ``[B, S, H]`` in the stage's dtype) and the
        event to copy after; ``forward`` given that tensor skips its input copy. None when the step does not
        qualify (first stage, another dtype, no captured graph, an unknown session)."""
        graphs = self.graph_decoder()
        if graphs is None or self.is_first or dtype != self.dtype or session_id not in self._sessions:
            return None
        start = self._prompt_start(positions)
        if start is None:
            return None
        return graphs.prompt_input(positions.shape[0], positions.shape[1], start)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ compute

    def _rope_for(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < length:
            n = max(length, self.spec.max_position)
            self._rope = rope_tables(self.spec, n, self.device)
        return self._rope

    @torch.inference_mode()
    def forward(
        self, session_id: str, x: torch.Tensor, positions: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        cache, max_pos = self._begin_step(session_id, x, positions)
        bsz, seq = positions.shape
        graphs = self.graph_decoder()
        if graphs is not None and seq == 1 and not all_logits:
            return graphs.step(cache, x, positions)  # type: ignore[no-any-return]
        start = self._prompt_start(positions) if self.device.type == "cuda" else None
        host_stamps().mark("fwd:checked")
        if start is not None and graphs is not None and not all_logits:  # its bucket's graph
            xin = x if self.is_first else x.to(device=self.device, dtype=self.dtype)
            out = graphs.prompt_step(cache, xin, seq, start)
            if out is not None:
                return out  # type: ignore[no-any-return]
        causal = start == 0 and self._no_window_cuts(seq)
        positions = positions.to(self.device)
        valid = positions >= 0
        write_idx = torch.where(valid, positions, torch.full_like(positions, cache.max_len))
        cos_t, sin_t = self._rope_for(cache.max_len)
        gather = positions.clamp(min=0)
        cos = cos_t[gather].to(self.dtype)[:, None]  # [B,1,S,D]
        sin = sin_t[gather].to(self.dtype)[:, None]
        kv_len = max_pos + 1 if max_pos >= 0 else 1
        masks: dict[int | None, torch.Tensor | None] = {}  # per distinct window of this stage's layers
        layer_masks = []
        for layer in self.span.layers():
            window = self.spec.layer_window(layer)
            if window not in masks:
                masks[window] = None if causal else attention_mask(positions, kv_len, window)
            layer_masks.append(masks[window])

        if self.is_first:
            h = self.embed(x.to(self.device))
        else:
            h = x.to(device=self.device, dtype=self.dtype)
        layer_fn = graphs.prefill_layer() if graphs is not None else decoder_layer  # CUDA: compiled
        for i, lw in enumerate(self.weights.layers):
            h = layer_fn(
                h, lw, self.spec, cos, sin, cache.k[i], cache.v[i], write_idx, layer_masks[i], causal
            )
        if not self.is_last:
            return h
        if not all_logits:
            last = positions.argmax(dim=1)  # index of each row's last valid token
            h = h[torch.arange(bsz, device=self.device), last][:, None]
        logits = self.head(h)
        return logits if all_logits else logits[:, 0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (on the stage's device) -> hidden states."""
        assert self.weights.embed is not None  # checked in __init__
        return F.embedding(ids, self.weights.embed)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage: hidden states [B, S, H] -> fp32 logits [B, S, V] (final norm, LM head)."""
        w = self.weights
        assert w.norm is not None and w.lm_head is not None  # checked in __init__
        return F.linear(rms_norm(h, w.norm, self.spec.rms_eps), w.lm_head).float()

    def _prompt_start(self, positions: torch.Tensor) -> int | None:
        """p when every row holds the same positions p..p+S-1 (S >= 2, no padding; host tensors
        only, so no device sync): a prompt, or a chunk of one, that a prompt graph can run."""
        seq = positions.shape[1]
        if seq < 2 or positions.device.type != "cpu":
            return None
        p = positions.numpy()
        start = int(p[0, 0])
        if start < 0 or not (p == np.arange(start, start + seq)).all():
            return None
        return start

    def _fresh_prompt(self, positions: torch.Tensor) -> bool:
        """True when every row holds positions 0..S-1 (no padding, empty cache before them) and no
        layer's window cuts into them: plain causal attention over the new tokens is then exact."""
        return self._prompt_start(positions) == 0 and self._no_window_cuts(positions.shape[1])

    def _no_window_cuts(self, seq: int) -> bool:
        """No layer's sliding window is shorter than ``seq`` new tokens."""
        return all(w is None or w >= seq for w in map(self.spec.layer_window, self.span.layers()))

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(
        cls,
        spec: ModelSpec,
        span: LayerSpan,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        std: float = 0.02,
    ) -> TorchStage:
        """Random weights of the right shapes (for speed work; no checkpoint needed)."""
        from hyperlane_lab.models.loading import random_stage_weights

        return cls(spec, span, random_stage_weights(spec, span, seed, dtype, device, std), dtype, device)

    def describe(self) -> dict[str, object]:
        return {
            "span": [self.span.start, self.span.end],
            "engine": self.engine_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "weight_bytes": self.weights.nbytes(),
            "first": self.is_first,
            "last": self.is_last,
        }
