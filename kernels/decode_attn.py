"""Attention of a batch-B, one-new-token decode step in one Triton launch (two with flash-decoding).

Why: the torch path of ``models/decode_static.py`` (RoPE of q and k from the cos/sin tables, scatter of the
new key/value into the static cache, GQA attention with a causal / sliding-window mask) is about five
small kernels per layer, each a launch plus a round trip through memory for tiny tensors. Here one
program per (row, KV head) ropes the new query heads and key in registers, stores the new key/value into
the cache and streams the cached keys with an online (running-max) softmax in fp32.

Layout: ``_decode_attn_kernel`` / ``_combine_kernel`` (``@triton.jit``) -> ``decode_attention`` (launcher:
checks, split choice, grid; no device reads, so it can be captured in a CUDA graph and traced by
torch.compile) -> ``decode_attention_ref`` (the torch path itself, through its RoPE and attention
functions, for tests).

Differences from the torch path, all within rounding: q and k are roped in fp32 and rounded to the cache
dtype once (torch ropes in the activation dtype); scores use fp32 ``q * D**-0.5``; p stays fp32 for p @ V.
Padding rows (pos < 0) write their key/value to the trash slot L and attend only their own new key (torch
attends slot 0); their output is finite and ignored by callers. Positions >= L are treated as padding rows
(never written or read out of bounds).

Speed (H100, Hq 32, Hkv 8, D 128, fp16, CUDA-graph timed, against the torch path's ops): B=1, L=4096 44 vs
112 µs; B=1, L=32768 239 vs 532 µs; B=8, L=4096 208 vs 235 µs; but B=32, L=4096 787 vs 633 µs (0.68 TB/s):
with G >= 4 the broadcast [G, L, D] products (no tl.dot), not memory, bound it (G=1 reached 2.3 TB/s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options
from hyperlane_lab.kernels.quant_common import bf16_bits, check_launch

__all__ = ["MAX_SPLIT", "SLOTS_PER_SPLIT", "choose_split", "decode_attention", "decode_attention_ref"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOTS_PER_SPLIT = 256  # flash-decoding: about this many cache slots per program
MAX_SPLIT = 64


@triton.jit
def _rounded(x, ptr, BF16: tl.constexpr):
    """fp32 ``x`` rounded to nearest in ``ptr``'s dtype; bf16 with integer ops, as the interpreter's cast
    truncates (same bits interpreted and compiled)."""
    if BF16:
        r = bf16_bits(x).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(ptr.dtype.element_ty)
    return r


@triton.jit
def _decode_attn_kernel(
    qkv_ptr,  # [B, 1, (HQ + 2 HKV) D]
    pos_ptr,  # [B, 1] int64, < 0 = padding row
    cos_ptr,  # [>= L, D] fp32
    sin_ptr,
    kc_ptr,  # [B, HKV, n_slots, D]; slot n_slots - 1 is the trash slot of padding rows
    vc_ptr,
    out_ptr,  # [B, 1, HQ D] (written when not PARTIAL)
    m_ptr,  # PARTIAL: [B, HQ, n_split] fp32 running max, sum of exp, [B, HQ, n_split, D] fp32 p @ V
    l_ptr,
    acc_ptr,
    n_split,
    n_slots,
    window,  # <= 0: full causal attention
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PARTIAL: tl.constexpr,
    BF16: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    # Before the wait (PDL), only what no kernel of this step writes: the position (copied in before the
    # step's first kernel), the RoPE tables and the cache slots before the position (written by earlier
    # steps); the new q/k/v come from the kernel before this one, so they are read after the wait.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    p = tl.load(pos_ptr + b)
    valid = (p >= 0) & (p < n_slots - 1)
    g = tl.where(valid, p, 0)
    # cached keys [lo, hi) are read; key g (the new one) comes from registers, never read back
    hi = g
    lo = tl.where(window > 0, tl.maximum(g - window + 1, 0), 0)
    per = (hi - lo + n_split - 1) // n_split  # contiguous chunk of [lo, hi) per split (may be empty)
    start = lo + s * per
    end = tl.minimum(start + per, hi)

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    first = d < D // 2
    rot = tl.where(first, d + D // 2, d - D // 2)  # rotate_half(x)[d] = sign * x[rot]
    cos = tl.load(cos_ptr + g * D + d, mask=dmask, other=0.0)
    sin = tl.load(sin_ptr + g * D + d, mask=dmask, other=0.0) * tl.where(first, -1.0, 1.0)
    base = (b * HKV + h) * n_slots * D
    j = tl.arange(0, BLOCK_L)
    jj = start + j  # the first block of keys, loaded early
    kvmask = (jj < end)[:, None] & dmask[None, :]
    offs = base + jj[:, None] * D + d[None, :]
    kb = tl.load(kc_ptr + offs, mask=kvmask, other=0.0)  # [BLOCK_L, BLOCK_D]
    vb = tl.load(vc_ptr + offs, mask=kvmask, other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    row = qkv_ptr + b * ((HQ + 2 * HKV) * D)
    gi = tl.arange(0, BLOCK_G)
    qo = (h * G + gi)[:, None] * D
    qmask = (gi < G)[:, None] & dmask[None, :]
    q = tl.load(row + qo + d[None, :], mask=qmask, other=0.0).to(tl.float32)
    qr = tl.load(row + qo + rot[None, :], mask=qmask, other=0.0).to(tl.float32)
    q = _rounded(q * cos[None, :] + qr * sin[None, :], kc_ptr, BF16).to(tl.float32) * scale  # [G, D]
    ko = (HQ + h) * D
    k = tl.load(row + ko + d, mask=dmask, other=0.0).to(tl.float32)
    kr = tl.load(row + ko + rot, mask=dmask, other=0.0).to(tl.float32)
    k_new = _rounded(k * cos + kr * sin, kc_ptr, BF16)
    v_new = tl.load(row + (HQ + HKV + h) * D + d, mask=dmask, other=0.0)

    slot = tl.where(valid, p, n_slots - 1)
    owner = s == 0  # split 0 stores the new key/value and folds it into its softmax state
    smask = dmask & (d * 0 + s == 0)  # a [BLOCK_D] mask (the interpreter rejects scalar-broadcast masks)
    tl.store(kc_ptr + base + slot * D + d, k_new, mask=smask)
    tl.store(vc_ptr + base + slot * D + d, v_new, mask=smask)

    # start state: the new key alone (split 0) or empty (max -1e30, finite so exp(m - m_new) is never NaN)
    score_new = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1)  # [BLOCK_G]
    m = tl.where(owner, score_new, -1.0e30)
    den = tl.where(owner, 1.0, 0.0) + tl.zeros_like(score_new)
    acc = den[:, None] * v_new.to(tl.float32)[None, :]  # [BLOCK_G, BLOCK_D]

    for j0 in range(start, end, BLOCK_L):
        jmask = (j0 + j) < end
        nj = j0 + BLOCK_L + j  # the next block's loads go out before this block's arithmetic
        nmask = (nj < end)[:, None] & dmask[None, :]
        noffs = base + nj[:, None] * D + d[None, :]
        kn = tl.load(kc_ptr + noffs, mask=nmask, other=0.0)
        vn = tl.load(vc_ptr + noffs, mask=nmask, other=0.0)
        sc = tl.sum(q[:, None, :] * kb.to(tl.float32)[None, :, :], axis=2)  # [BLOCK_G, BLOCK_L]
        sc = tl.where(jmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        pr = tl.exp(sc - m_new[:, None])
        den = den * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vb.to(tl.float32)[None, :, :], axis=1)
        m = m_new
        kb = kn
        vb = vn

    r = b * HQ + h * G + gi  # output row (b, query head)
    if PARTIAL:
        w = r * n_split + s
        tl.store(m_ptr + w, m, mask=gi < G)
        tl.store(l_ptr + w, den, mask=gi < G)
        tl.store(acc_ptr + w[:, None] * D + d[None, :], acc, mask=qmask)
    else:
        o = acc / den[:, None]
        tl.store(out_ptr + r[:, None] * D + d[None, :], _rounded(o, out_ptr, BF16), mask=qmask)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, n_split,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (row, query head): merges the splits' (max, sum, acc) partials in fixed order."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    r = tl.program_id(0).to(tl.int64)
    si = tl.arange(0, BLOCK_S)
    smask = si < n_split
    d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + r * n_split + si, mask=smask, other=-1.0e30)
    den = tl.load(l_ptr + r * n_split + si, mask=smask, other=0.0)
    amask = smask[:, None] & (d < D)[None, :]
    acc = tl.load(acc_ptr + (r * n_split + si)[:, None] * D + d[None, :], mask=amask, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # split 0 always holds the new key: the max is a real score
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * den, axis=0)
    tl.store(out_ptr + r * D + d, _rounded(o, out_ptr, BF16), mask=d < D)


def choose_split(n_slots: int) -> int:
    """Flash-decoding splits for a cache of ``n_slots`` slots, from the static shape only (no host sync):
    about ``SLOTS_PER_SPLIT`` slots per program, at most ``MAX_SPLIT``. On an H100 (Hq 32, Hkv 8, D 128,
    fp16, full caches) 16 to 64 splits were fastest for 1 to 64 rows: a program streams its keys one
    dependent block after another, so short chunks and many programs keep more loads in flight."""
    return max(1, min(MAX_SPLIT, -(-(n_slots - 1) // SLOTS_PER_SPLIT)))


def _check(
    qkv: torch.Tensor, pos: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
) -> None:  # fmt: skip
    check_launch(qkv, "decode_attention: qkv", _DTYPES)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_launch(t, f"decode_attention: {name}", (qkv.dtype,))
    check_launch(pos, "decode_attention: pos", (torch.int64,))
    for t, name in ((cos_t, "cos_t"), (sin_t, "sin_t")):
        check_launch(t, f"decode_attention: {name}", (torch.float32,))
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: caches must both be [B, Hkv, L+1, D], got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    b, hkv, n_slots, d = k_cache.shape
    if n_kv_heads != hkv or n_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(
            f"decode_attention: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}, which must "
            f"match the caches' {hkv} heads"
        )
    if d % 2 or n_slots < 2:
        raise ValueError(
            f"decode_attention: need an even head dim and >= 2 cache slots, got {tuple(k_cache.shape)}"
        )
    if qkv.shape != (b, 1, (n_heads + 2 * hkv) * d):
        raise ValueError(
            f"decode_attention: qkv {tuple(qkv.shape)} does not fit [B, 1, (Hq + 2 Hkv) D] = "
            f"[{b}, 1, {(n_heads + 2 * hkv) * d}]"
        )
    if pos.shape != (b, 1):
        raise ValueError(f"decode_attention: pos must be [{b}, 1] int64, got {tuple(pos.shape)}")
    if cos_t.dim() != 2 or cos_t.shape[0] < n_slots - 1 or cos_t.shape[1] != d or sin_t.shape != cos_t.shape:
        raise ValueError(
            f"decode_attention: cos_t/sin_t must be [>= {n_slots - 1}, {d}], got {tuple(cos_t.shape)} and "
            f"{tuple(sin_t.shape)}"
        )
    if len({t.device for t in (qkv, pos, cos_t, sin_t, k_cache, v_cache)}) != 1:
        raise ValueError("decode_attention: all tensors must be on one device")


def decode_attention(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    window: int | None = None,
    split: int | None = None,
    *,
    block_l: int | None = None,
    num_warps: int = 4,
    pdl: bool = False,
) -> torch.Tensor:
    """Attention output ``[B, 1, Hq * D]`` (qkv's dtype) of one decode step; also writes the roped new key
    and the new value into slot ``pos`` of ``k_cache`` / ``v_cache`` (slot ``L = k_cache.shape[2] - 1``
    for padding rows, pos < 0), in place.

    ``qkv [B, 1, (Hq + 2 Hkv) D]``: the fused q/k/v projection; ``pos [B, 1]`` int64; ``cos_t`` /
    ``sin_t [>= L, D]`` fp32 (half-rotation layout); caches ``[B, Hkv, L + 1, D]``. ``window``: sliding
    window (None / 0: full causal attention). ``split``: programs per (row, KV head) over the key range
    (None: ``choose_split``); ``block_l`` / ``num_warps``: keys per loop step (None: from the tile size)
    and warps of the main kernel, for tuning; ``pdl``: launch with programmatic dependent launch
    (``kernels/pdl.py``; sm_90+ only). Rows with
    pos < 0 give finite values that callers must ignore. Raises ValueError on mismatched inputs.
    """
    extra = launch_options(pdl, qkv.device, "decode_attention")  # first: says why on any device
    _check(qkv, pos, cos_t, sin_t, k_cache, v_cache, n_heads, n_kv_heads)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"decode_attention: window must be None or an int >= 0, got {window!r}")
    b, hkv, n_slots, d = k_cache.shape
    if split is None:
        split = choose_split(n_slots)
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"decode_attention: split must be None or an int >= 1, got {split!r}")
    group = n_heads // hkv
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(d)
    if block_l is None:  # aims at ~2048 fp32 values in the [G, L, D] product (at G = 1); the floor of 16
        # keys gives 4-16k values for G = 2-8 at D = 128, which may spill (see bench/gpu_notes.md)
        block_l = max(16, min(64, 2048 // (block_g * block_d)))
    if block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"decode_attention: block_l must be a power of two, got {block_l!r}")
    out = torch.empty((b, 1, n_heads * d), dtype=qkv.dtype, device=qkv.device)
    partial = split > 1
    if partial:
        m = torch.empty((b * n_heads * split,), dtype=torch.float32, device=qkv.device)
        lsum = torch.empty_like(m)
        acc = torch.empty((b * n_heads * split * d,), dtype=torch.float32, device=qkv.device)
    else:
        m = lsum = acc = out  # unused
    bf16 = qkv.dtype == torch.bfloat16
    _decode_attn_kernel[(b, hkv, split)](
        qkv, pos, cos_t, sin_t, k_cache, v_cache, out, m, lsum, acc, split, n_slots, window or 0, d**-0.5,
        HQ=n_heads, HKV=hkv, G=group, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_L=block_l,
        PARTIAL=partial, BF16=bf16, PDL=pdl, num_warps=num_warps, **extra,
    )  # fmt: skip
    if partial:
        _combine_kernel[(b * n_heads,)](
            m, lsum, acc, out, split,
            D=d, BLOCK_S=triton.next_power_of_2(split), BLOCK_D=block_d, BF16=bf16, PDL=pdl, num_warps=4,
            **extra,
        )  # fmt: skip
    return out


def decode_attention_ref(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos_t: torch.Tensor,
    sin_t: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    window: int | None = None,
) -> torch.Tensor:
    """The torch path of ``models/decode_static.py`` (``static_decode_step`` + ``decode_layer_static``'s
    attention, calling its functions), in qkv's dtype (tests run it on float64 copies). Writes the
    caches in place like ``decode_attention``; padding rows act as position 0 (attend slot 0)."""
    b, hkv, n_slots, d = k_cache.shape
    from hyperlane_lab.models.decode_static import decode_attention as torch_attention
    from hyperlane_lab.models.layers import _apply_rope

    hq, dtype = n_heads, qkv.dtype
    slot = torch.where(pos >= 0, pos, torch.full_like(pos, n_slots - 1))
    g = pos.clamp(min=0)
    cos = cos_t[g].to(dtype)[:, None]  # [B, 1, 1, D]
    sin = sin_t[g].to(dtype)[:, None]
    q, k, v = torch.split(qkv, [hq * d, hkv * d, hkv * d], dim=-1)
    q = _apply_rope(q.view(b, 1, hq, d).transpose(1, 2), cos, sin)  # [B, Hq, 1, D]
    k = _apply_rope(k.view(b, 1, hkv, d).transpose(1, 2), cos, sin)
    v = v.view(b, 1, hkv, d).transpose(1, 2)
    idx = slot[:, None, :, None].expand(b, hkv, 1, d)
    k_cache.scatter_(2, idx, k)
    v_cache.scatter_(2, idx, v)
    keys = torch.arange(n_slots, device=k_cache.device)[None, None, None, :]
    qpos = g[:, None, :, None]
    mask = keys <= qpos
    if window:
        mask = mask & (keys > qpos - window)
    return torch_attention(q, k_cache, v_cache, mask).reshape(b, 1, hq * d)  # [B, Hq, 1, D] -> [B, 1, Hq D]
