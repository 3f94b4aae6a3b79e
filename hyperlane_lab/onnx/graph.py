"""The export-friendly torch module behind one ONNX stage: a pure function of its inputs.

Graph contract (L = the stage's global layer indices, T = cache slots = max_len + 1):

    inputs   x              first stage: ids int64 [B, S]; else hidden [B, S, H] (stage dtype)
             positions      int64 [B, S], -1 = padding
             logits_index   last stage only: int64 [B, N], which of the S tokens get logits
             past_k_{l}     [B, Hkv, T, D] for l in L (the engine's whole cache buffer, bound in place)
             past_v_{l}     [B, Hkv, T, D]
    outputs  hidden         [B, S, H] (stage dtype), or on the last stage
             logits         fp32 [B, N, V]
             new_k_{l}      [B, Hkv, S, D]: K of the S new tokens (after RoPE); the engine scatters
             new_v_{l}      [B, Hkv, S, D]  them into its cache at ``positions`` (padding -> slot T-1)

Attention reads the cache only up to ``max(positions)`` (a data-dependent Slice, so a decode step
costs O(current length), not O(max_len)), concatenated with the new tokens' own K/V. A cache slot
that this step also writes is masked out on the cache side and seen through the new token instead,
so the (key, value) set each query attends to is exactly the one ``TorchStage`` builds by scattering
first — the outputs agree to rounding (softmax sums in a different order).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.layers import _apply_rope, rms_norm, rope_inv_freq
from hyperlane_lab.models.stage import TorchStage

__all__ = ["StageGraph", "input_names", "output_names"]

_LAYER_TENSORS = ("wqkv", "bqkv", "wo", "w_gate_up", "w_down", "ln_attn", "ln_mlp")


def input_names(layers: range, first: bool, last: bool) -> list[str]:
    names = ["x", "positions"] + (["logits_index"] if last else [])
    for li in layers:
        names += [f"past_k_{li}", f"past_v_{li}"]
    return names


def output_names(layers: range, last: bool) -> list[str]:
    names = ["logits" if last else "hidden"]
    for li in layers:
        names += [f"new_k_{li}", f"new_v_{li}"]
    return names


def _attention_mask(
    positions: torch.Tensor, past_len: torch.Tensor | int, window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, 1, S, P + S]: which cache slots (first P) and new tokens (last S) each query sees.

    Padding queries (position -1) act as position 0, like ``layers.attention_mask``, so every query
    sees at least one key (slot 0 or the new token at position 0) and its softmax stays finite.
    """
    pc = positions.clamp(min=0)  # [B, S]
    slots = torch.arange(past_len, device=positions.device)  # type: ignore[arg-type]  # [P]
    q = pc[:, :, None]  # [B, S, 1]
    written = (positions[:, :, None] == slots[None, None, :]).any(dim=1)  # [B, P]: slot rewritten now
    see_past = (slots[None, None, :] <= q) & ~written[:, None, :]  # [B, S, P]
    newp = positions[:, None, :]  # [B, 1, S] positions of the keys
    see_new = (newp >= 0) & (newp <= q)  # [B, S, S]
    if window is not None:
        see_past = see_past & (slots[None, None, :] > q - window)
        see_new = see_new & (newp > q - window)
    return torch.cat([see_past, see_new], dim=-1)[:, None, None]


class StageGraph(torch.nn.Module):
    """Wraps a ``TorchStage``'s weights; ``forward`` computes the graph contract above.

    ``symbolic_len``: how the data-dependent cache length is expressed. ``"tensor"`` slices with a
    0-d tensor (the TorchScript exporter records a dynamic Slice); ``"item"`` uses ``.item()`` with
    ``torch._check`` bounds (what ``torch.export``/the dynamo exporter needs). Eager runs either way.
    """

    def __init__(self, stage: TorchStage, symbolic_len: str = "tensor") -> None:
        super().__init__()
        if symbolic_len not in ("tensor", "item"):
            raise ValueError(f"symbolic_len must be 'tensor' or 'item', got {symbolic_len!r}")
        self.spec: ModelSpec = stage.spec
        self.span = stage.span
        self.is_first, self.is_last = stage.is_first, stage.is_last
        self.symbolic_len = symbolic_len
        self.n_layers = len(stage.span)
        # Weights become graph initializers; the RoPE inverse frequencies too (fp32, like TorchStage).
        self.register_buffer("inv_freq", rope_inv_freq(stage.spec).to(stage.device), persistent=False)
        for i, lw in enumerate(stage.weights.layers):
            for name in _LAYER_TENSORS:
                t = getattr(lw, name)
                if t is not None:
                    self.register_buffer(f"l{i}_{name}", t, persistent=False)
        w = stage.weights
        if self.is_first:
            self.register_buffer("embed", w.embed, persistent=False)
        if self.is_last:
            self.register_buffer("final_norm", w.norm, persistent=False)
            self.register_buffer("lm_head", w.lm_head, persistent=False)

    def _t(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, name))

    def _w(self, i: int, name: str) -> torch.Tensor:
        return self._t(f"l{i}_{name}")

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        s = self.spec
        hq, hkv, d = s.n_heads, s.n_kv_heads, s.head_dim
        group = hq // hkv
        logits_index = rest[0] if self.is_last else None
        past = rest[1:] if self.is_last else rest
        bsz, seq = positions.shape[0], positions.shape[1]

        # Cache slots read: 0 .. max(positions) (at least slot 0), like TorchStage's kv_len.
        past_len: torch.Tensor | int = positions.max().clamp(min=0) + 1
        if self.symbolic_len == "item":
            n = int(past_len.item())  # type: ignore[union-attr]
            torch._check(n >= 1)  # type: ignore[no-untyped-call]
            torch._check(n <= past[0].shape[2])  # type: ignore[no-untyped-call]
            past_len = n
        masks: dict[int | None, torch.Tensor] = {}  # [B,1,1,S,P+S] per distinct window (Qwen2 mixes)
        for layer in self.span.layers():
            window = s.layer_window(layer)
            if window not in masks:
                masks[window] = _attention_mask(positions, past_len, window)

        freqs = positions.clamp(min=0).float()[..., None] * self._t("inv_freq")  # [B, S, D/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        h = F.embedding(x, self._t("embed")) if self.is_first else x
        dtype = h.dtype
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, S, D]

        new_kv: list[torch.Tensor] = []
        for i, layer in enumerate(self.span.layers()):
            mask = masks[s.layer_window(layer)]
            pk, pv = past[2 * i], past[2 * i + 1]
            a = rms_norm(h, self._w(i, "ln_attn"), s.rms_eps)
            bias = self._w(i, "bqkv") if s.qkv_bias else None
            qkv = F.linear(a, self._w(i, "wqkv"), bias)
            q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)  # type: ignore[no-untyped-call]
            q = _apply_rope(q.reshape(bsz, seq, hq, d).transpose(1, 2), cos, sin)  # [B, Hq, S, D]
            k = _apply_rope(k.reshape(bsz, seq, hkv, d).transpose(1, 2), cos, sin)  # [B, Hkv, S, D]
            v = v.reshape(bsz, seq, hkv, d).transpose(1, 2)
            keys = torch.cat([pk[:, :, :past_len], k], dim=2)  # [B, Hkv, P+S, D]
            values = torch.cat([pv[:, :, :past_len], v], dim=2)
            # GQA without repeating K/V: the `group` query heads of one KV head share a matmul.
            qg = q.reshape(bsz, hkv, group * seq, d)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (d**-0.5)  # [B, Hkv, gS, P+S]
            scores = scores.reshape(bsz, hkv, group, seq, -1).masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1).to(dtype).reshape(bsz, hkv, group * seq, -1)
            attn = torch.matmul(probs, values).reshape(bsz, hq, seq, d)
            h = h + F.linear(attn.transpose(1, 2).reshape(bsz, seq, hq * d), self._w(i, "wo"))
            m = rms_norm(h, self._w(i, "ln_mlp"), s.rms_eps)
            gate, up = F.linear(m, self._w(i, "w_gate_up")).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, self._w(i, "w_down"))
            new_kv += [k, v]
        if not self.is_last:
            return (h, *new_kv)
        assert logits_index is not None
        idx = logits_index[:, :, None].expand(-1, -1, h.shape[-1])  # [B, N, H]
        h = torch.gather(h, 1, idx)
        h = rms_norm(h, self._t("final_norm"), s.rms_eps)
        return (F.linear(h, self._t("lm_head")).float(), *new_kv)
