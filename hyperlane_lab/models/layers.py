"""Functional pieces of a Llama-family decoder layer: RMSNorm, RoPE, GQA attention, SwiGLU.

Shapes: B batch, S new tokens, K cached+new keys, H hidden, Hq/Hkv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyperlane_lab.models.config import ModelSpec

__all__ = ["LayerWeights", "attention_mask", "decoder_layer", "rms_norm", "rope_inv_freq", "rope_tables"]


@dataclass
class LayerWeights:
    """One decoder layer; q/k/v and gate/up are fused so each is one matmul."""

    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    bqkv: torch.Tensor | None  # [(Hq + 2 Hkv) D] (Qwen2)
    wo: torch.Tensor  # [H, Hq D]
    w_gate_up: torch.Tensor  # [2 F, H]
    w_down: torch.Tensor  # [H, F]
    ln_attn: torch.Tensor  # [H]
    ln_mlp: torch.Tensor  # [H]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers: normalise in fp32, cast back, then scale.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with linear or llama3 scaling when configured."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling_dict
    kind = sc.get("rope_type")
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_tables(
    spec: ModelSpec, length: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [length, D] in fp32 (the half-rotation layout transformers uses)."""
    inv = rope_inv_freq(spec).to(device)
    t = torch.arange(length, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, S, D]; cos/sin [B, 1, S, D] in x's dtype
    return x * cos + _rotate_half(x) * sin


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, S, K]: query at position p sees keys 0..p (and > p - window).

    Padding queries (position -1) see key 0 only, so softmax stays finite; their output is ignored.
    """
    pos = positions.clamp(min=0)[:, None, :, None]  # [B,1,S,1]
    keys = torch.arange(kv_len, device=positions.device)[None, None, None, :]
    mask = keys <= pos
    if window is not None:
        mask &= keys > pos - window
    return mask


def decoder_layer(
    x: torch.Tensor,  # [B, S, H]
    w: LayerWeights,
    spec: ModelSpec,
    cos: torch.Tensor,  # [B, 1, S, D]
    sin: torch.Tensor,  # [B, 1, S, D]
    k_cache: torch.Tensor,  # [B, Hkv, L+1, D]; slot L is the trash slot for padding writes
    v_cache: torch.Tensor,
    write_idx: torch.Tensor,  # [B, S] cache slot of each new token
    mask: torch.Tensor | None,  # [B, 1, S, K]; None with causal=True
    causal: bool = False,  # new tokens are positions 0..S-1 of every row (no cache, no padding)
) -> torch.Tensor:
    bsz, seq, _ = x.shape
    hq, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    h = rms_norm(x, w.ln_attn, spec.rms_eps)
    qkv = F.linear(h, w.wqkv, w.bqkv)  # [B, S, (Hq+2Hkv) D]
    q, k, v = torch.split(qkv, [hq * d, hkv * d, hkv * d], dim=-1)
    q = _apply_rope(q.view(bsz, seq, hq, d).transpose(1, 2), cos, sin)
    k = _apply_rope(k.view(bsz, seq, hkv, d).transpose(1, 2), cos, sin)
    v = v.view(bsz, seq, hkv, d).transpose(1, 2)
    rows = torch.arange(bsz, device=x.device)[:, None].expand(bsz, seq)
    k_cache[rows, :, write_idx] = k.transpose(1, 2)  # [B,S,Hkv,D] scattered to its slots
    v_cache[rows, :, write_idx] = v.transpose(1, 2)
    if causal:  # fresh prompt: attend to the new keys with is_causal (flash kernels, no mask tensor)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
    else:
        assert mask is not None
        kv_len = mask.shape[-1]
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
    x = x + F.linear(attn.transpose(1, 2).reshape(bsz, seq, hq * d), w.wo)
    h = rms_norm(x, w.ln_mlp, spec.rms_eps)
    gate, up = F.linear(h, w.w_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.w_down)
