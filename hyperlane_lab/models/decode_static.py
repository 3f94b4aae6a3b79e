"""The static-shape decode step (one new token per row) that ``cuda_decode.GraphDecoder`` captures.

Positions become the cache slot, RoPE rows and an attention mask over the *whole* cache
[0, max_len] on the device, so a captured graph never changes with the sequence length; masked
keys get probability exactly 0, so attending over all slots equals attending over the valid
prefix up to rounding. Plain PyTorch: it also runs on the CPU, where the tests compare it with the
eager path. With ``fused=True`` the layers are ``decode_fused`` layers, which take the positions
and do slots, RoPE and masking inside the attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.decode_linear import LinearFn
from hyperlane_lab.models.layers import LayerWeights, _apply_rope, rms_norm

if TYPE_CHECKING:
    from hyperlane_lab.models.stage import SessionCache, TorchStage

__all__ = ["LayerFn", "decode_attention", "decode_layer_static", "static_decode_step"]

LayerFn = Callable[..., torch.Tensor]


def decode_attention(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k_cache: torch.Tensor,  # [B, Hkv, K, D]
    v_cache: torch.Tensor,  # [B, Hkv, K, D]
    mask: torch.Tensor,  # [B, 1, 1, K] bool, True = attend
) -> torch.Tensor:
    """One query per row against the whole cache; GQA by grouping query heads, no K/V copies.

    Query head j uses KV head j // G (G = Hq / Hkv), as ``enable_gqa`` and transformers do.
    Scores and softmax in fp32. Returns [B, Hq, 1, D].
    """
    b, hq, _, d = q.shape
    hkv = k_cache.shape[1]
    qg = (q * d**-0.5).reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k_cache.transpose(-1, -2))  # [B, Hkv, G, K]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> fp32
    scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1).to(v_cache.dtype)
    return torch.matmul(p, v_cache).reshape(b, hq, 1, d)


def decode_layer_static(
    x: torch.Tensor,  # [B, 1, H]
    w: LayerWeights,
    spec: ModelSpec,
    cos: torch.Tensor,  # [B, 1, 1, D] in x's dtype
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [B, Hkv, L+1, D]
    v_cache: torch.Tensor,
    slot: torch.Tensor,  # [B, 1, 1, 1] int64 cache slot of the new token (L = trash for padding)
    mask: torch.Tensor,  # [B, 1, 1, L+1]
    lin: LinearFn = F.linear,
) -> torch.Tensor:
    """``layers.decoder_layer`` for S == 1 with static shapes (no host values, graph-capturable)."""
    b = x.shape[0]
    hq, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    h = rms_norm(x, w.ln_attn, spec.rms_eps)
    qkv = lin(h, w.wqkv, w.bqkv)  # [B, 1, (Hq+2Hkv) D]
    q, k, v = torch.split(qkv, [hq * d, hkv * d, hkv * d], dim=-1)
    q = _apply_rope(q.view(b, 1, hq, d).transpose(1, 2), cos, sin)  # [B, Hq, 1, D]
    k = _apply_rope(k.view(b, 1, hkv, d).transpose(1, 2), cos, sin)  # [B, Hkv, 1, D]
    v = v.view(b, 1, hkv, d).transpose(1, 2)
    idx = slot.expand(b, hkv, 1, d)
    k_cache.scatter_(2, idx, k)  # the new key/value into its slot, in place
    v_cache.scatter_(2, idx, v)
    attn = decode_attention(q, k_cache, v_cache, mask)
    x = x + lin(attn.reshape(b, 1, hq * d), w.wo)
    h = rms_norm(x, w.ln_mlp, spec.rms_eps)
    gate, up = lin(h, w.w_gate_up).chunk(2, dim=-1)
    return x + lin(F.silu(gate) * up, w.w_down)


def static_decode_step(
    stage: TorchStage,
    cache: SessionCache,
    x: torch.Tensor,  # [B, 1] int64 ids (first stage) or [B, 1, H] hidden, on the stage's device
    pos: torch.Tensor,  # [B, 1] int64 on the device, -1 = padding row
    cos_t: torch.Tensor,  # [>= L, D] fp32 RoPE tables
    sin_t: torch.Tensor,
    keys: torch.Tensor,  # [L + 1] int64 arange (slot index of every cache entry)
    layer_fn: LayerFn = decode_layer_static,
    dynamic_len: bool = False,  # mark the masks' key dim dynamic for torch.compile
    lin: LinearFn = F.linear,  # the LM head's product (the layers' are bound into layer_fn)
    fused: bool = False,  # layer_fn is a ``decode_fused.make_fused_layer`` layer (takes positions)
) -> torch.Tensor:
    """One decode step of ``stage`` with only device-side values: hidden [B,1,H] or logits [B,V]."""
    spec, w = stage.spec, stage.weights
    if stage.is_first:
        assert w.embed is not None  # TorchStage checks the first stage has it
        h = F.embedding(x, w.embed)
    else:
        h = x
    # fused: the attention kernel builds slots, RoPE and masks from the positions itself; launched with PDL it
    # reads them (and older cache slots) before waiting for the kernel before it, so nothing in a step may
    # write the positions or another step's cache slots (kernels/pdl.py)
    if fused:
        for i, layer in enumerate(stage.span.layers()):
            window = spec.layer_window(layer)
            h = layer_fn(h, w.layers[i], spec, pos, cos_t, sin_t, cache.k[i], cache.v[i], window)
        return _head(stage, h, lin)
    big = torch.full_like(pos, cache.max_len)
    slot = torch.where(pos >= 0, pos, big)[:, None, :, None]  # [B, 1, 1, 1]
    g = pos.clamp(min=0)  # padding rows act as position 0 (their output is ignored)
    cos = cos_t[g].to(stage.dtype)[:, None]  # [B, 1, 1, D]
    sin = sin_t[g].to(stage.dtype)[:, None]
    qpos = g[:, None, :, None]  # [B, 1, 1, 1]
    kk = keys[None, None, None, :]  # [1, 1, 1, L+1]
    causal = kk <= qpos  # slot L (trash) is never <= a valid position
    masks: dict[int | None, torch.Tensor] = {}
    for i, layer in enumerate(stage.span.layers()):
        window = spec.layer_window(layer)
        if window not in masks:
            masks[window] = causal if window is None else causal & (kk > qpos - window)
            if dynamic_len:
                torch._dynamo.maybe_mark_dynamic(masks[window], 3)
        h = layer_fn(h, w.layers[i], spec, cos, sin, cache.k[i], cache.v[i], slot, masks[window])
    return _head(stage, h, lin)


def _head(stage: TorchStage, h: torch.Tensor, lin: LinearFn) -> torch.Tensor:
    """A stage's output: the hidden states, or on the last stage the fp32 logits [B, V]."""
    if not stage.is_last:
        return h
    w = stage.weights
    assert w.norm is not None and w.lm_head is not None  # the last stage has them
    h = rms_norm(h, w.norm, stage.spec.rms_eps)
    return lin(h, w.lm_head).float()[:, 0]
