"""Per-row outlier selection of the ``int4_outlier`` / ``int4_outlier_asym`` codecs in one pass: the ``k`` values
of largest magnitude of each row (their columns and fp16 values) and the row with those columns zeroed, which
the int4 / int4_asym kernels then quantize.

Why: in torch this is ``abs``, ``topk``, ``gather``, a cast and ``scatter`` over the whole tensor, each a kernel
with a full-size temporary; the encode ran at ~6% of a device copy's bandwidth (bench/RESULTS.md). Here one
program holds one row in registers, picks the ``k`` largest keys by ``k`` max-reductions and writes the side
channel and the zeroed row; the row's bits are copied, not converted, so every input dtype passes exactly.

Layout: ``_select_kernel`` (``@triton.jit``) -> ``select`` (launcher: checks, grid) -> torch reference
``hyperlane_lab.codecs.reference.select_outliers`` (bitwise equal: same ranking key, ties to the lower column,
NaN values stored as 0x7E00).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.codecs.reference import NAN16_BITS
from hyperlane_lab.kernels.quant_common import ACT_DTYPES, check_launch

__all__ = ["MAX_COLS", "MAX_K", "select"]

MAX_COLS = 16384  # one row per program, held in registers (32 values a thread at 16 warps)
MAX_K = 32  # the selection loop is unrolled: k passes of two block-wide reductions each
_NAN16 = tl.constexpr(NAN16_BITS)


@triton.jit
def _select_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32 values
    xb_ptr,  # the same memory as integers of the same width (the row is copied bit for bit)
    idx_ptr,  # [R, K] int16: columns (uint16 bits), best first
    val_ptr,  # [R, K] int16: fp16 bits of the chosen values
    rest_ptr,  # [R, H] integers of x's width: the row with the chosen columns set to +0
    cols,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < cols
    base = row * cols
    v = tl.load(x_ptr + base + c, mask=inside, other=0.0).to(tl.float32)
    key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |v| as bits: ordered as the magnitudes
    key = tl.where(key > 0x7F800000, 0x7FFFFFFF, key)  # every NaN ranks alike, above Inf
    key = tl.where(inside, key, -1)
    chosen = c < 0
    for i in tl.static_range(K):
        best = tl.max(key, axis=0)
        j = tl.min(tl.where(key == best, c, BLOCK), axis=0)  # ties: the lower column
        val = tl.load(x_ptr + base + j).to(tl.float32)  # the value itself (sign of a zero, NaN kept)
        bits = val.to(tl.float16).to(tl.int16, bitcast=True)
        bits = tl.where(val != val, _NAN16, bits).to(tl.int16)
        tl.store(idx_ptr + row * K + i, j.to(tl.int16))
        tl.store(val_ptr + row * K + i, bits)
        hit = c == j
        key = tl.where(hit, -1, key)
        chosen = chosen | hit
    raw = tl.load(xb_ptr + base + c, mask=inside, other=0)
    tl.store(rest_ptr + base + c, tl.where(chosen, 0, raw).to(raw.dtype), mask=inside)


def select(x: torch.Tensor, k: int, idx: torch.Tensor, vals: torch.Tensor, rest: torch.Tensor) -> None:
    """Fill ``idx`` (int16 [R, k], column bits), ``vals`` (fp16 [R, k]) and ``rest`` (x's dtype, [R, H]) from
    ``x [R, H]``. Torch reference: ``hyperlane_lab.codecs.reference.select_outliers``."""
    check_launch(x, "select_outliers input", ACT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"select_outliers takes x [R, H], got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if not 1 <= k <= min(cols, MAX_K):
        raise ValueError(
            f"select_outliers needs 1 <= k <= {min(cols, MAX_K)} (the row length, at most {MAX_K}), got k={k}"
        )
    if cols > MAX_COLS:
        raise ValueError(f"select_outliers holds a row in registers: at most {MAX_COLS} columns, got {cols}")
    check_launch(idx, "idx", (torch.int16,), rows * k)
    check_launch(vals, "vals", (torch.float16,), rows * k)
    check_launch(rest, "rest", (x.dtype,), rows * cols)
    if rows == 0:
        return
    ints = torch.int16 if x.element_size() == 2 else torch.int32
    block = triton.next_power_of_2(cols)
    _select_kernel[(rows,)](
        x, x.view(ints), idx, vals.view(torch.int16), rest.view(ints), cols,
        K=k, BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )  # fmt: skip
