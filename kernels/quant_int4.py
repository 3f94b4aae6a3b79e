"""Fused int4 group quantization (two values per byte), optionally with a Walsh-Hadamard rotation of each
group (``int4_hadamard``): rotate + quantize + pack in one pass, unpack + dequantize + rotate back in one pass.

Layout: ``kernel`` (``@triton.jit``) -> launcher (``quantize`` / ``dequantize``: checks, grid) ->
torch reference ``hyperlane_lab.codecs.reference.quantize_int4`` / ``dequantize_int4`` (bitwise equal).
Packing: nibble = q + 8; byte k of a group = element 2k (low nibble) | element 2k+1 (high nibble).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hyperlane_lab.codecs.reference import inv_sqrt_f32
from hyperlane_lab.kernels.hadamard import wht_groups
from hyperlane_lab.kernels.quant_common import (
    ACT_DTYPES,
    abs_max_bits,
    check_launch,
    count_bad,
    decoder_layout,
    group_scales,
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

_QMAX = tl.constexpr(7)

# How the encoder gets elements 2k and 2k+1 of a group into one thread to pack them into a byte:
PACK_SPLIT = 0  # load the [GP, BLOCK] tile, tl.reshape to [GP, BLOCK/2, 2], tl.split (any dtype, Hadamard)
PACK_STRIDED = 1  # two stride-2 loads, x[2k] and x[2k+1] (L1 serves the second from the first's lines)
PACK_WORDS = 2  # fp16/bf16 read as int32 words (16-byte vector loads), halves taken apart with bit ops
PACK_MODES = {"split": PACK_SPLIT, "strided": PACK_STRIDED, "words": PACK_WORDS}
# Default: "words" where it applies (16-bit input, H % group_size == 0, no Hadamard), else "split".
# bench/codec_tune.py times all three.
DEFAULT_PACK = "words"


@triton.jit
def _quant_int4_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32 (PACK_WORDS: read as int32 words [R, H / 2])
    scale_ptr,  # [N] int16 (fp16 bits)
    p_ptr,  # [N * GS / 2] uint8 packed
    flag_ptr,  # [1] int32: += number of bad groups (when CHECK)
    n_groups,
    cols,
    groups_per_row,
    GS: tl.constexpr,
    BLOCK: tl.constexpr,
    GP: tl.constexpr,
    CHECK: tl.constexpr,
    HADAMARD: tl.constexpr,
    LOG2_GS: tl.constexpr,
    INV_SQRT: tl.constexpr,
    DENSE: tl.constexpr,  # H % GS == 0
    EVEN: tl.constexpr,  # DENSE, BLOCK == GS and N % GP == 0: no masks
    PACK: tl.constexpr,  # PACK_* (PACK_SPLIT with HADAMARD; PACK_WORDS needs DENSE and a 16-bit input)
    BF16: tl.constexpr,  # PACK_WORDS: the words hold bf16 (else fp16) values
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)  # [GP] group ids
    k = tl.arange(0, BLOCK // 2)  # byte k of a group packs elements 2k, 2k+1
    if PACK == 0:
        v = load_groups(x_ptr, g, tl.arange(0, BLOCK), n_groups, cols, groups_per_row, GS, DENSE, EVEN)
        if HADAMARD:  # BLOCK == GS here (power of two)
            v = wht_groups(v, GP, BLOCK, LOG2_GS, INV_SQRT)
        bits, divisor, recip, bad = group_scales(abs_max_bits(v), _QMAX)
        lo, hi = tl.split(tl.reshape(quantize_biased(v, divisor, recip, bad, 8), [GP, BLOCK // 2, 2]))
    else:
        if PACK == 2:
            ve, vo = load_word_pairs(x_ptr, g, n_groups, GS, BLOCK, EVEN, BF16)
        else:
            ve = load_groups(x_ptr, g, 2 * k, n_groups, cols, groups_per_row, GS, DENSE, EVEN)
            vo = load_groups(x_ptr, g, 2 * k + 1, n_groups, cols, groups_per_row, GS, DENSE, EVEN)
        bits, divisor, recip, bad = group_scales(tl.maximum(abs_max_bits(ve), abs_max_bits(vo)), _QMAX)
        lo = quantize_biased(ve, divisor, recip, bad, 8)
        hi = quantize_biased(vo, divisor, recip, bad, 8)
    # the low nibble of the biased bits is q + 8 and bits 4..7 are 0, so one shift-add packs a byte
    store_nibbles(p_ptr, lo, hi, g, n_groups, GS, BLOCK, EVEN)
    store_per_group(scale_ptr, bits, g, n_groups, EVEN)
    if CHECK:
        count_bad(flag_ptr, bad, g, n_groups)


# n_groups is never specialized: Triton 3.6 (the device image's) compiles n_groups == 1 (a one-group tensor, e.g.
# [1, 64] at group 64) as a constant, and that build wrote (q + 8) * scale into an fp32 output on H100 and H200,
# where the same launch with n_groups as an argument, the fp16/bf16 outputs and the interpreter are exact.
@triton.jit(do_not_specialize=["n_groups"])
def _dequant_int4_kernel(
    scale_ptr,  # [N] int16
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
    HADAMARD: tl.constexpr,
    LOG2_GS: tl.constexpr,
    INV_SQRT: tl.constexpr,
    DENSE: tl.constexpr,
    EVEN: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
    gvalid = g < n_groups
    q = load_nibbles(p_ptr, g, gvalid, GS, BLOCK, GP, EVEN) - 8  # masked bytes (0) give q = -8, never stored
    bits = load_per_group(scale_ptr, g, gvalid, EVEN)
    scale = bits.to(tl.float16, bitcast=True).to(tl.float32)
    v = q.to(tl.float32) * scale[:, None]
    if HADAMARD:
        v = wht_groups(v, GP, BLOCK, LOG2_GS, INV_SQRT)
    store_groups(out_ptr, v, g, gvalid, cols, groups_per_row, GS, BLOCK, OUT_MAX, OUT_BF16, DENSE, EVEN)


def _check_group_size(group_size: int, hadamard: bool) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 needs an even group_size >= 2 (two values per byte), got {group_size}")
    if hadamard and group_size & (group_size - 1):
        raise ValueError(f"int4_hadamard needs a power-of-two group_size, got {group_size}")


@functools.cache
def _meta(group_size: int, hadamard: bool) -> dict[str, object]:
    """Decoder constexprs (cached: ``inv_sqrt_f32`` builds a tensor)."""
    block, gp = launch_shape(group_size)
    return dict(
        GS=group_size, BLOCK=block, GP=gp, HADAMARD=hadamard,
        LOG2_GS=block.bit_length() - 1, INV_SQRT=inv_sqrt_f32(block),
    )  # fmt: skip


@functools.cache
def _quant_meta(group_size: int, hadamard: bool) -> dict[str, object]:
    block = triton.next_power_of_2(group_size)
    return dict(
        GS=group_size, HADAMARD=hadamard, LOG2_GS=block.bit_length() - 1, INV_SQRT=inv_sqrt_f32(block)
    )


def quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    hadamard: bool = False,
    flag: torch.Tensor | None = None,
    *,
    tile: int | None = None,
    num_warps: int | None = None,
    pack: str | None = None,
) -> None:
    """Fill ``scales`` (int16 [N]) and ``packed`` (uint8 [N * gs / 2]) from ``x [R, H]``.

    ``flag`` (int32 [1], zeroed by the caller) receives the number of groups holding NaN/Inf.
    ``tile`` (values per program, a power of two), ``num_warps`` and ``pack`` (a key of ``PACK_MODES``; where
    "words" does not apply, "split" runs instead) override the tuned defaults.
    Torch reference: ``hyperlane_lab.codecs.reference.quantize_int4``.
    """
    check_launch(x, "quantize_int4 input", ACT_DTYPES)
    _check_group_size(group_size, hadamard)
    if x.dim() != 2:
        raise ValueError(f"quantize_int4 takes x [R, H], got shape {tuple(x.shape)}")
    mode = PACK_MODES.get(pack or DEFAULT_PACK)
    if mode is None:
        raise ValueError(f"pack must be one of {sorted(PACK_MODES)}, got {pack!r}")
    rows, cols = x.shape
    gpr = -(-cols // group_size)
    n_groups = rows * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(packed, "packed", (torch.uint8,), n_groups * group_size // 2)
    if flag is not None:
        check_launch(flag, "flag", (torch.int32,), 1)
    if n_groups == 0:
        return
    block, gp, warps = launch_config(group_size, n_groups, tile, num_warps)
    dense = gpr * group_size == cols
    bf16 = x.dtype == torch.bfloat16
    if hadamard:
        mode = PACK_SPLIT
    elif mode == PACK_WORDS and not word_loads_ok(x, dense):
        mode = PACK_SPLIT  # int32 words need 16-bit values, whole groups per row and a 4-byte aligned start
    _quant_int4_kernel[(-(-n_groups // gp),)](
        x, scales, packed, scales if flag is None else flag, n_groups, cols, gpr,
        BLOCK=block, GP=gp, CHECK=flag is not None, DENSE=dense,
        EVEN=dense and block == group_size and n_groups % gp == 0, PACK=mode,
        BF16=bf16, num_warps=warps, enable_fp_fusion=False,
        **_quant_meta(group_size, hadamard),
    )  # fmt: skip


def dequantize(
    scales: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, group_size: int, hadamard: bool = False
) -> None:
    """Fill ``out [R, H]`` (fp16/bf16/fp32) from ``scales`` and ``packed``.

    Torch reference: ``hyperlane_lab.codecs.reference.dequantize_int4``.
    """
    check_launch(out, "dequantize_int4 output", ACT_DTYPES)
    _check_group_size(group_size, hadamard)
    if out.dim() != 2:
        raise ValueError(f"dequantize_int4 takes out [R, H], got shape {tuple(out.shape)}")
    gpr = -(-out.shape[1] // group_size)
    n_groups = out.shape[0] * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(packed, "packed", (torch.uint8,), n_groups * group_size // 2)
    if n_groups == 0:
        return
    meta = _meta(group_size, hadamard)
    grid = (triton.cdiv(n_groups, int(meta["GP"])),)  # type: ignore[call-overload]
    out_ptr, out_meta = output_view(out)
    _dequant_int4_kernel[grid](
        scales, packed, out_ptr, n_groups, out.shape[1], gpr, enable_fp_fusion=False, **meta, **out_meta,
        **decoder_layout(n_groups, out.shape[1], group_size, int(meta["BLOCK"]), int(meta["GP"])),  # type: ignore[call-overload]
    )  # fmt: skip
