"""Fused int4 group quantization (two values per byte), optionally with a Walsh-Hadamard rotation of each
group (``int4_hadamard``): rotate + quantize + pack in one pass, unpack + dequantize + rotate back in one pass.

Layout: ``kernel`` (``@triton.jit``) -> launcher (``quantize`` / ``dequantize``: checks, grid) ->
torch reference ``hyperlane_lab.codecs.reference.quantize_int4`` / ``dequantize_int4`` (bitwise equal).
Packing: nibble = q + 8; byte k of a group = element 2k (low nibble) | element 2k+1 (high nibble).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.codecs.reference import inv_sqrt_f32
from hyperlane_lab.kernels.hadamard import wht_groups
from hyperlane_lab.kernels.quant_common import (
    ACT_DTYPES,
    check_launch,
    group_scales,
    launch_shape,
    output_view,
    quantize_values,
    store_output,
)

__all__ = ["dequantize", "quantize"]

_QMAX = tl.constexpr(7)


@triton.jit
def _quant_int4_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32
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
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)  # [GP] group ids
    gvalid = g < n_groups
    row = g // groups_per_row
    col = (g % groups_per_row)[:, None] * GS + tl.arange(0, BLOCK)[None, :]  # [GP, BLOCK]
    in_group = gvalid[:, None] & (tl.arange(0, BLOCK) < GS)[None, :]
    v = tl.load(x_ptr + row[:, None] * cols + col, mask=in_group & (col < cols), other=0.0).to(tl.float32)
    if HADAMARD:  # BLOCK == GS here (power of two)
        v = wht_groups(v, GP, BLOCK, LOG2_GS, INV_SQRT)
    bits, divisor, bad = group_scales(v, _QMAX)
    nib = (quantize_values(v, divisor, bad, _QMAX) + 8.0).to(tl.int32)  # 1..15 (8 = zero)
    lo, hi = tl.split(tl.reshape(nib, [GP, BLOCK // 2, 2]))  # elements 2k, 2k+1
    packed = (lo | (hi << 4)).to(tl.uint8)
    k = tl.arange(0, BLOCK // 2)
    tl.store(scale_ptr + g, bits, mask=gvalid)
    tl.store(
        p_ptr + g[:, None] * (GS // 2) + k[None, :], packed, mask=gvalid[:, None] & (k < GS // 2)[None, :]
    )
    if CHECK:
        nbad = tl.sum((bad & gvalid).to(tl.int32), axis=0)
        if nbad > 0:
            tl.atomic_add(flag_ptr, nbad)


@triton.jit
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
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
    gvalid = g < n_groups
    row = g // groups_per_row
    k = tl.arange(0, BLOCK // 2)
    b = tl.load(
        p_ptr + g[:, None] * (GS // 2) + k[None, :], mask=gvalid[:, None] & (k < GS // 2)[None, :], other=0
    )
    b = b.to(tl.int32)
    q = tl.reshape(tl.join(b & 15, b >> 4), [GP, BLOCK]) - 8  # masked bytes (0) give q = -8, never stored
    bits = tl.load(scale_ptr + g, mask=gvalid, other=0)
    scale = bits.to(tl.float16, bitcast=True).to(tl.float32)
    v = q.to(tl.float32) * scale[:, None]
    if HADAMARD:
        v = wht_groups(v, GP, BLOCK, LOG2_GS, INV_SQRT)
    col = (g % groups_per_row)[:, None] * GS + tl.arange(0, BLOCK)[None, :]
    in_group = gvalid[:, None] & (tl.arange(0, BLOCK) < GS)[None, :]
    store_output(out_ptr + row[:, None] * cols + col, v, in_group & (col < cols), OUT_MAX, OUT_BF16)


def _check_group_size(group_size: int, hadamard: bool) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 needs an even group_size >= 2 (two values per byte), got {group_size}")
    if hadamard and group_size & (group_size - 1):
        raise ValueError(f"int4_hadamard needs a power-of-two group_size, got {group_size}")


def _meta(group_size: int, hadamard: bool) -> dict[str, object]:
    block, gp = launch_shape(group_size)
    return dict(
        GS=group_size, BLOCK=block, GP=gp, HADAMARD=hadamard,
        LOG2_GS=block.bit_length() - 1, INV_SQRT=inv_sqrt_f32(block),
    )  # fmt: skip


def quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    hadamard: bool = False,
    flag: torch.Tensor | None = None,
) -> None:
    """Fill ``scales`` (int16 [N]) and ``packed`` (uint8 [N * gs / 2]) from ``x [R, H]``.

    ``flag`` (int32 [1], zeroed by the caller) receives the number of groups holding NaN/Inf.
    Torch reference: ``hyperlane_lab.codecs.reference.quantize_int4``.
    """
    check_launch(x, "quantize_int4 input", ACT_DTYPES)
    _check_group_size(group_size, hadamard)
    if x.dim() != 2:
        raise ValueError(f"quantize_int4 takes x [R, H], got shape {tuple(x.shape)}")
    gpr = -(-x.shape[1] // group_size)
    n_groups = x.shape[0] * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(packed, "packed", (torch.uint8,), n_groups * group_size // 2)
    if flag is not None:
        check_launch(flag, "flag", (torch.int32,), 1)
    if n_groups == 0:
        return
    meta = _meta(group_size, hadamard)
    grid = (triton.cdiv(n_groups, int(meta["GP"])),)  # type: ignore[call-overload]
    _quant_int4_kernel[grid](
        x, scales, packed, scales if flag is None else flag, n_groups, x.shape[1], gpr,
        CHECK=flag is not None, enable_fp_fusion=False, **meta,
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
        scales, packed, out_ptr, n_groups, out.shape[1], gpr, enable_fp_fusion=False, **meta, **out_meta
    )
