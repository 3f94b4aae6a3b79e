"""Fused asymmetric int4 group quantization (``int4_asym``, ``int4_outlier_asym``): 16 levels from each
group's minimum up, an fp16 scale and an fp16 minimum per group, two values per byte.

Layout: ``kernel`` (``@triton.jit``) -> launcher (``quantize`` / ``dequantize``: checks, grid) -> torch
reference ``hyperlane_lab.codecs.reference.quantize_int4_asym`` / ``dequantize_int4_asym`` (bitwise equal).
Packing: nibble = q (0..15); byte k of a group = element 2k (low nibble) | element 2k+1 (high nibble).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.kernels.quant_common import (
    ACT_DTYPES,
    abs_max_bits,
    asym_group_params,
    check_launch,
    count_bad,
    decoder_layout,
    launch_config,
    launch_shape,
    load_groups,
    load_nibbles,
    load_per_group,
    load_word_pairs,
    output_view,
    quantize_biased,
    store_groups,
    store_nibbles,
    store_per_group,
    word_loads_ok,
)

__all__ = ["dequantize", "quantize"]


@triton.jit
def _quant_int4_asym_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32
    scale_ptr,  # [N] int16 (fp16 bits)
    min_ptr,  # [N] int16 (fp16 bits)
    p_ptr,  # [N * GS / 2] uint8 packed
    flag_ptr,  # [1] int32: += number of bad groups (when CHECK)
    n_groups,
    cols,
    groups_per_row,
    GS: tl.constexpr,
    BLOCK: tl.constexpr,
    GP: tl.constexpr,
    CHECK: tl.constexpr,
    DENSE: tl.constexpr,  # H % GS == 0
    EVEN: tl.constexpr,  # DENSE, BLOCK == GS and N % GP == 0: no masks
    WORDS: tl.constexpr,  # DENSE, BLOCK == GS, a 16-bit input read as int32 words (elements 2k, 2k+1 of a group)
    BF16: tl.constexpr,  # WORDS: the words hold bf16 (else fp16) values
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)  # [GP] group ids
    if WORDS:  # as int4's PACK_WORDS: 16-byte loads, and the pairs to pack are in one thread already
        ve, vo = load_word_pairs(x_ptr, g, n_groups, GS, BLOCK, EVEN, BF16)
        lo = tl.minimum(tl.min(ve, axis=1), tl.min(vo, axis=1))
        hi = tl.maximum(tl.max(ve, axis=1), tl.max(vo, axis=1))
        absbits = tl.maximum(abs_max_bits(ve), abs_max_bits(vo))
    else:
        j = tl.arange(0, BLOCK)
        v = load_groups(x_ptr, g, j, n_groups, cols, groups_per_row, GS, DENSE, EVEN)  # row padding: 0
        in_group = (j < GS)[None, :]
        lo = tl.min(tl.where(in_group, v, float("inf")), axis=1)
        hi = tl.max(tl.where(in_group, v, float("-inf")), axis=1)
        absbits = abs_max_bits(v)
    bits, divisor, recip, bad, mbits = asym_group_params(lo, hi, absbits)
    mf = mbits.to(tl.float16, bitcast=True).to(tl.float32)
    # low nibble = q (0..15), bits 4..7 = 0
    if WORDS:
        lo_q = quantize_biased(ve - mf[:, None], divisor, recip, bad, 0)
        hi_q = quantize_biased(vo - mf[:, None], divisor, recip, bad, 0)
    else:
        qb = quantize_biased(v - mf[:, None], divisor, recip, bad, 0)
        lo_q, hi_q = tl.split(tl.reshape(qb, [GP, BLOCK // 2, 2]))
    store_nibbles(p_ptr, lo_q, hi_q, g, n_groups, GS, BLOCK, EVEN)
    store_per_group(scale_ptr, bits, g, n_groups, EVEN)
    store_per_group(min_ptr, mbits, g, n_groups, EVEN)
    if CHECK:
        count_bad(flag_ptr, bad, g, n_groups)


@triton.jit
def _dequant_int4_asym_kernel(
    scale_ptr,  # [N] int16
    min_ptr,  # [N] int16
    p_ptr,  # [N * GS / 2] uint8
    out_ptr,  # [R, H]
    n_groups,
    cols,
    groups_per_row,
    GS: tl.constexpr,
    BLOCK: tl.constexpr,
    GP: tl.constexpr,
    OUT_MAX: tl.constexpr,
    OUT_BF16: tl.constexpr,
    DENSE: tl.constexpr,
    EVEN: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
    gvalid = g < n_groups
    q = load_nibbles(p_ptr, g, gvalid, GS, BLOCK, GP, EVEN)
    sbits, mbits = load_per_group(scale_ptr, g, gvalid, EVEN), load_per_group(min_ptr, g, gvalid, EVEN)
    scale = sbits.to(tl.float16, bitcast=True).to(tl.float32)
    m = mbits.to(tl.float16, bitcast=True).to(tl.float32)
    v = q.to(tl.float32) * scale[:, None] + m[:, None]  # the product is exact: no fma question
    store_groups(out_ptr, v, g, gvalid, cols, groups_per_row, GS, BLOCK, OUT_MAX, OUT_BF16, DENSE, EVEN)


def _check_group_size(group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4_asym needs an even group_size >= 2 (two values per byte), got {group_size}")


def quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    flag: torch.Tensor | None = None,
    *,
    words_ok: bool = True,
) -> None:
    """Fill ``scales`` and ``mins`` (int16 [N], fp16 bits) and ``packed`` (uint8 [N * gs / 2]) from
    ``x [R, H]``. ``flag`` (int32 [1], zeroed by the caller) receives the number of groups holding NaN/Inf
    or out of the fp16 range. ``words_ok=False`` keeps a 16-bit input on the element-wise load path (tests
    compare the two). Torch reference: ``hyperlane_lab.codecs.reference.quantize_int4_asym``."""
    check_launch(x, "quantize_int4_asym input", ACT_DTYPES)
    _check_group_size(group_size)
    if x.dim() != 2:
        raise ValueError(f"quantize_int4_asym takes x [R, H], got shape {tuple(x.shape)}")
    rows, cols = x.shape
    gpr = -(-cols // group_size)
    n_groups = rows * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(mins, "mins", (torch.int16,), n_groups)
    check_launch(packed, "packed", (torch.uint8,), n_groups * group_size // 2)
    if flag is not None:
        check_launch(flag, "flag", (torch.int32,), 1)
    if n_groups == 0:
        return
    block, gp, warps = launch_config(group_size, n_groups)
    dense = gpr * group_size == cols
    whole = dense and block == group_size  # groups fill their lanes (no +-inf padding in the min / max)
    words = whole and words_ok and word_loads_ok(x, dense)
    _quant_int4_asym_kernel[(-(-n_groups // gp),)](
        x, scales, mins, packed, scales if flag is None else flag, n_groups, cols, gpr,
        GS=group_size, BLOCK=block, GP=gp, CHECK=flag is not None, DENSE=dense,
        EVEN=whole and n_groups % gp == 0, WORDS=words, BF16=x.dtype == torch.bfloat16, num_warps=warps,
        enable_fp_fusion=False,
    )  # fmt: skip


def dequantize(
    scales: torch.Tensor, mins: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, group_size: int
) -> None:
    """Fill ``out [R, H]`` (fp16/bf16/fp32) from ``scales``, ``mins`` and ``packed``.
    Torch reference: ``hyperlane_lab.codecs.reference.dequantize_int4_asym``."""
    check_launch(out, "dequantize_int4_asym output", ACT_DTYPES)
    _check_group_size(group_size)
    if out.dim() != 2:
        raise ValueError(f"dequantize_int4_asym takes out [R, H], got shape {tuple(out.shape)}")
    gpr = -(-out.shape[1] // group_size)
    n_groups = out.shape[0] * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(mins, "mins", (torch.int16,), n_groups)
    check_launch(packed, "packed", (torch.uint8,), n_groups * group_size // 2)
    if n_groups == 0:
        return
    block, gp = launch_shape(group_size)
    out_ptr, out_meta = output_view(out)
    _dequant_int4_asym_kernel[(triton.cdiv(n_groups, gp),)](
        scales, mins, packed, out_ptr, n_groups, out.shape[1], gpr,
        GS=group_size, BLOCK=block, GP=gp, enable_fp_fusion=False, **out_meta,
        **decoder_layout(n_groups, out.shape[1], group_size, block, gp),
    )  # fmt: skip
