"""Fused int8 group quantization: quantize + scales in one pass, dequantize in one pass.

Layout: ``kernel`` (``@triton.jit``) -> launcher (``quantize`` / ``dequantize``: checks, grid) ->
torch reference ``hyperlane_lab.codecs.reference.quantize_int8`` / ``dequantize_int8`` (bitwise equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    load_per_group,
    output_view,
    quantize_biased,
    store_groups,
    store_per_group,
)

__all__ = ["dequantize", "quantize"]

_QMAX = tl.constexpr(127)


@triton.jit
def _quant_int8_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32
    scale_ptr,  # [N] int16 (fp16 bits)
    q_ptr,  # [N * GS] int8
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
):
    g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)  # [GP] group ids
    j = tl.arange(0, BLOCK)
    v = load_groups(x_ptr, g, j, n_groups, cols, groups_per_row, GS, DENSE, EVEN)
    bits, divisor, recip, bad = group_scales(abs_max_bits(v), _QMAX)
    q = quantize_biased(v, divisor, recip, bad, 0).to(tl.int8)  # low byte of the biased bits = q
    q_offs = g[:, None] * GS + j[None, :]
    store_per_group(scale_ptr, bits, g, n_groups, EVEN)
    if EVEN:
        tl.store(q_ptr + q_offs, q)
    else:
        tl.store(q_ptr + q_offs, q, mask=(g < n_groups)[:, None] & (j < GS)[None, :])
    if CHECK:
        count_bad(flag_ptr, bad, g, n_groups)


@triton.jit
def _dequant_int8_kernel(
    scale_ptr,  # [N] int16
    q_ptr,  # [N * GS] int8
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
    q_ptrs = q_ptr + g[:, None] * GS + tl.arange(0, BLOCK)[None, :]
    bits = load_per_group(scale_ptr, g, gvalid, EVEN)
    if EVEN:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=gvalid[:, None] & (tl.arange(0, BLOCK) < GS)[None, :], other=0)
    scale = bits.to(tl.float16, bitcast=True).to(tl.float32)
    v = q.to(tl.float32) * scale[:, None]  # exact: |q| <= 127 times an fp16 scale
    store_groups(out_ptr, v, g, gvalid, cols, groups_per_row, GS, BLOCK, OUT_MAX, OUT_BF16, DENSE, EVEN)


def _groups(x_rows: int, cols: int, group_size: int) -> tuple[int, int]:
    gpr = -(-cols // group_size)
    return x_rows * gpr, gpr


def quantize(
    x: torch.Tensor,
    scales: torch.Tensor,
    q: torch.Tensor,
    group_size: int,
    flag: torch.Tensor | None = None,
    *,
    tile: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Fill ``scales`` (int16 [N], fp16 bits) and ``q`` (int8 [N * gs]) from ``x [R, H]``.

    ``flag`` (int32 [1], zeroed by the caller) receives the number of groups holding NaN/Inf.
    ``tile`` (values per program, a power of two) and ``num_warps`` override the tuned launch defaults
    (``quant_common.launch_config``). Torch reference: ``hyperlane_lab.codecs.reference.quantize_int8``.
    """
    check_launch(x, "quantize_int8 input", ACT_DTYPES)
    if x.dim() != 2 or group_size < 1:
        raise ValueError(
            f"quantize_int8 takes x [R, H] and group_size >= 1, got {tuple(x.shape)}, {group_size}"
        )
    rows, cols = x.shape
    gpr = -(-cols // group_size)
    n_groups = rows * gpr
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(q, "q", (torch.int8,), n_groups * group_size)
    if flag is not None:
        check_launch(flag, "flag", (torch.int32,), 1)
    if n_groups == 0:
        return
    block, gp, warps = launch_config(group_size, n_groups, tile, num_warps)
    dense = gpr * group_size == cols
    _quant_int8_kernel[(-(-n_groups // gp),)](
        x, scales, q, scales if flag is None else flag, n_groups, cols, gpr,
        GS=group_size, BLOCK=block, GP=gp, CHECK=flag is not None, DENSE=dense,
        EVEN=dense and block == group_size and n_groups % gp == 0, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip


def dequantize(scales: torch.Tensor, q: torch.Tensor, out: torch.Tensor, group_size: int) -> None:
    """Fill ``out [R, H]`` (fp16/bf16/fp32) from ``scales`` and ``q``.

    Torch reference: ``hyperlane_lab.codecs.reference.dequantize_int8``.
    """
    check_launch(out, "dequantize_int8 output", ACT_DTYPES)
    if out.dim() != 2 or group_size < 1:
        raise ValueError(
            f"dequantize_int8 takes out [R, H], group_size >= 1; got {tuple(out.shape)}, {group_size}"
        )
    n_groups, gpr = _groups(out.shape[0], out.shape[1], group_size)
    check_launch(scales, "scales", (torch.int16,), n_groups)
    check_launch(q, "q", (torch.int8,), n_groups * group_size)
    if n_groups == 0:
        return
    block, gp = launch_shape(group_size)
    grid = (triton.cdiv(n_groups, gp),)
    out_ptr, out_meta = output_view(out)
    _dequant_int8_kernel[grid](
        scales,
        q,
        out_ptr,
        n_groups,
        out.shape[1],
        gpr,
        GS=group_size,
        BLOCK=block,
        GP=gp,
        enable_fp_fusion=False,
        **out_meta,
        **decoder_layout(n_groups, out.shape[1], group_size, block, gp),
    )
