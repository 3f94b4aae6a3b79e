"""A decode layer whose attention is one Triton kernel (``kernels/decode_attn.py``).

Why: in the plain decode layer (``cuda_decode.decode_layer_static``) RoPE, the two cache writes,
the masked scores, the softmax and the weighted sum of values are ~9 small kernels per layer
(~0.5 ms of a 4.7 ms Llama-2-7B step on an H200, see bench/gpu_notes.md), each moving a few KB.
The kernel does all of it in one launch and reads the cache only up to the row's position.

The layer is three pieces: ``decode_pre`` (norm + q/k/v product) and ``decode_post`` (output
product, residual, norm, MLP) are compiled by ``torch.compile`` when the decoder compiles; the
attention kernel runs between them. The whole step is then captured in a CUDA graph as before.
``HYPERLANE_FUSED_ATTENTION=0`` keeps the plain layer.

For one row (batch 1) the layer can go further (``make_triton_layer``): every product is the
Triton GEMV with the small ops folded in (RMSNorm into the q/k/v and gate/up products, SwiGLU's
``silu(gate) * up`` into the down product, both residual adds into the output products), so a
layer is five launches (plus a split-K sum where one is used) and needs no ``torch.compile``.
With ``HYPERLANE_TRITON_LAYER=1`` the decoder uses it where the GEMV timings say the Triton
products are about as fast as cuBLAS (``triton_layer_configs``). Alone it loses: on an H200 the
folded-in prologues slowed the products by more than the ~7 launches a layer they save
(Llama-2-7B: 229 vs 242 tok/s for the compiled layer with the attention kernel, bench/RESULTS.md).
Launched with programmatic dependent launch and the first weight tile read early it was the fastest
1-GPU decode. The decoder tunes its per-role configs by timing the whole step (``layer_tune.py``): alone
and in the step they rank differently (+4.6% 1-GPU decode on an H200, twenty-fourth session). So tuned,
it is the default of every stage on a device that takes PDL (``cuda_decode.GraphDecoder``): a whole model
in-process, a worker holding every layer (+8.5% against the compiled layer) and split worker stages
(+2.2%, two sharing one H200; twenty-fifth session).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.decode_linear import LinearFn, env_flag
from hyperlane_lab.models.layers import LayerWeights, rms_norm

__all__ = [
    "decode_post",
    "decode_pre",
    "fused_attention_kernel",
    "make_fused_layer",
    "make_triton_layer",
    "runnable_times",
    "triton_layer_configs",
]

log = logging.getLogger(__name__)


def decode_pre(x: torch.Tensor, w: LayerWeights, spec: ModelSpec, lin: LinearFn = F.linear) -> torch.Tensor:
    """RMSNorm and the fused q/k/v product of a decode layer: [B, 1, H] -> [B, 1, (Hq+2Hkv) D]."""
    return lin(rms_norm(x, w.ln_attn, spec.rms_eps), w.wqkv, w.bqkv)


def decode_post(
    x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, spec: ModelSpec, lin: LinearFn = F.linear
) -> torch.Tensor:
    """The rest of the layer after attention ([B, 1, Hq D]): output product, residual, MLP."""
    x = x + lin(attn, w.wo)
    h = rms_norm(x, w.ln_mlp, spec.rms_eps)
    gate, up = lin(h, w.w_gate_up).chunk(2, dim=-1)
    return x + lin(F.silu(gate) * up, w.w_down)


def fused_attention_kernel(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The kernel's launcher, or None where it does not apply: not CUDA, no Triton, or
    ``HYPERLANE_FUSED_ATTENTION=0``."""
    if device.type != "cuda" or not env_flag("HYPERLANE_FUSED_ATTENTION", True):
        return None
    try:
        from hyperlane_lab.codecs._kernels import kernel_module  # source checkouts too

        return kernel_module("decode_attn").decode_attention  # type: ignore[no-any-return]
    except Exception as e:  # no Triton here
        log.warning("fused decode attention not available (%s); using the plain layer", e)
        return None


def _around_attention(
    attn: Callable[..., torch.Tensor], pre: Callable[..., torch.Tensor], post: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """``layer(x, w, spec, pos, cos_t, sin_t, k_cache, v_cache, window) -> [B, 1, H]``: ``pre``
    (x -> q/k/v), the attention kernel ``attn``, ``post`` (x, attention -> next hidden).

    x [B, 1, H]; pos [B, 1] int64 (-1 = padding row: its output is ignored, its new key/value go
    to the cache's trash slot); cos_t/sin_t fp32 [>= L, D]; caches [B, Hkv, L+1, D], written in
    place at each row's position; window: the layer's sliding window or None."""

    def layer(
        x: torch.Tensor,
        w: LayerWeights,
        spec: ModelSpec,
        pos: torch.Tensor,
        cos_t: torch.Tensor,
        sin_t: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        window: int | None,
    ) -> torch.Tensor:
        qkv = pre(x, w, spec)
        a = attn(qkv, pos, cos_t, sin_t, k_cache, v_cache, spec.n_heads, spec.n_kv_heads, window)
        return post(x, a, w, spec)

    return layer


def make_fused_layer(
    attn: Callable[..., torch.Tensor], lin: LinearFn, compile_layers: bool
) -> Callable[..., torch.Tensor]:
    """A decode layer (``_around_attention``'s signature) with the attention kernel ``attn``
    between the (optionally compiled) ``decode_pre`` and ``decode_post``."""

    def pre(x: torch.Tensor, w: LayerWeights, spec: ModelSpec) -> torch.Tensor:
        return decode_pre(x, w, spec, lin)

    def post(x: torch.Tensor, a: torch.Tensor, w: LayerWeights, spec: ModelSpec) -> torch.Tensor:
        return decode_post(x, a, w, spec, lin)

    if compile_layers:
        return _around_attention(attn, torch.compile(pre), torch.compile(post))
    return _around_attention(attn, pre, post)


_ROLES = ("wqkv", "wo", "w_gate_up", "w_down")
_NORMED = ("wqkv", "w_gate_up")  # RMSNorm folded in: the whole row per program (no split-K)


def triton_layer_configs(
    w: LayerWeights, choice: dict[str, Any], slack: float = 1.10
) -> dict[str, Any] | None:
    """Per product role, the fastest Triton GEMV config from the decoder's timings (``choice``:
    ``decode_linear.choose_linears``' per-shape µs), or None when for some role cuBLAS is more
    than ``slack`` times faster (each fused product saves a ~2 µs kernel launch, so a Triton
    product a few percent slower still wins) or a timing is missing. A shape pinned by
    ``HYPERLANE_GEMV_PIN`` (``choice[shape]["pinned"]``) takes its pinned config; pinned to cuBLAS, or to a
    split-K config for a normed role, the layer is off (None)."""
    try:
        from hyperlane_lab.codecs._kernels import kernel_module

        gk = kernel_module("gemv")
    except Exception:  # no Triton
        return None
    by_name = gk.configs_by_name()
    out: dict[str, Any] = {}
    for role in _ROLES:
        n, k = getattr(w, role).shape
        pinned = choice.get(f"{n}x{k}", {}).get("pinned")
        if pinned is not None:  # HYPERLANE_GEMV_PIN: this config, whatever the timings say
            cfg = by_name.get(pinned)
            if cfg is None or (role in _NORMED and cfg.split_k > 1):  # cuBLAS, or split-K under a norm
                log.warning(
                    "all-Triton layer off: %s is pinned to %s, which the layer cannot run", role, pinned
                )
                return None
            out[role] = cfg
            continue
        times = choice.get(f"{n}x{k}", {}).get("us", {})
        ok = runnable_times(role, times, by_name)
        if "cublas" not in times or not ok:
            return None
        best = min(ok, key=ok.__getitem__)
        if ok[best] > slack * times["cublas"]:
            return None
        out[role] = by_name[best]
    return out


def runnable_times(role: str, times: Mapping[str, float], by_name: Mapping[str, Any]) -> dict[str, float]:
    """The timings (config name -> µs) of the Triton configs ``role``'s product can run in the layer: no
    cuBLAS or unknown names, and no split-K where the norm is folded in (``_NORMED``)."""
    return {
        name: t
        for name, t in times.items()
        if name in by_name and (role not in _NORMED or by_name[name].split_k == 1)
    }


def make_triton_layer(
    attn: Callable[..., torch.Tensor], cfgs: dict[str, Any], pdl: bool = False, prefetch: bool = False
) -> Callable[..., torch.Tensor]:
    """A decode layer (``_around_attention``'s signature) in five Triton launches for one row:
    norm+qkv, attention, wo+residual, norm+gate/up, SwiGLU+down+residual. ``cfgs``: a
    ``GemvConfig`` per role (``triton_layer_configs``). ``pdl``: every launch with programmatic
    dependent launch (``kernels/pdl.py``, sm_90+; ``HYPERLANE_PDL=1``), so each kernel of the chain
    may start while the one before it finishes; ``prefetch``: the GEMVs read their first weight tile
    before waiting (``HYPERLANE_PDL_PREFETCH=1``)."""
    from hyperlane_lab.codecs._kernels import kernel_module

    gemv = kernel_module("gemv").gemv
    gemv = functools.partial(gemv, pdl=True, prefetch=prefetch) if pdl else gemv
    attn = functools.partial(attn, pdl=True) if pdl else attn
    c_qkv, c_o, c_gu, c_down = (cfgs[r] for r in _ROLES)

    def pre(x: torch.Tensor, w: LayerWeights, spec: ModelSpec) -> torch.Tensor:
        return gemv(x, w.wqkv, w.bqkv, c_qkv, norm_weight=w.ln_attn, eps=spec.rms_eps)  # type: ignore[no-any-return]

    def post(x: torch.Tensor, a: torch.Tensor, w: LayerWeights, spec: ModelSpec) -> torch.Tensor:
        x = gemv(a, w.wo, None, c_o, residual=x)
        gu = gemv(x, w.w_gate_up, None, c_gu, norm_weight=w.ln_mlp, eps=spec.rms_eps)
        return gemv(gu, w.w_down, None, c_down, gated=True, residual=x)  # type: ignore[no-any-return]

    return _around_attention(attn, pre, post)
