"""Per-row outlier selection of the ``int4_outlier`` / ``int4_outlier_asym`` codecs in one pass: the ``k`` values
of largest magnitude of each row (their columns and fp16 values) and the row with those columns zeroed, which
the int4 / int4_asym kernels then quantize.

Why: in torch this is ``abs``, ``topk``, ``gather``, a cast and ``scatter`` over the whole tensor, each a kernel
with a full-size temporary; the encode ran at ~6% of a device copy's bandwidth (bench/RESULTS.md). Here one
program holds one row in registers, picks the ``k`` largest keys by ``k`` max-reductions (one integer per value:
magnitude bits, reversed column, sign; an int32 for 16-bit inputs, an int64 for fp32; so one reduction a round
and no load of the winner) and writes the side channel and the zeroed row; the row's bits are copied, not
converted, so every input dtype passes exactly.

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

__all__ = ["MAX_COLS", "MAX_K", "fp16_bits", "key16", "pick16", "select", "value16"]

MAX_COLS = 16384  # one row per program, held in registers (32 values a thread at 16 warps)
MAX_K = 32  # the selection loop is unrolled: k passes of one block-wide reduction each
_NAN16 = tl.constexpr(NAN16_BITS)


@triton.jit
def key16(b, col, BF16: tl.constexpr):
    """The ranking key of 16-bit values ``b`` (int32 holding the fp16/bf16 bits) at columns ``col`` (< 2**15):
    |v|'s 15 bits (every NaN raised to 0x7FFF, above Inf), then the column reversed (ties go to the lower
    column), then the sign; unique per column, and its order is the reference's ranking."""
    mag = b & 0x7FFF
    mag = tl.where(mag > (0x7F80 if BF16 else 0x7C00), 0x7FFF, mag)
    return (mag << 16) | ((0x7FFF - col) << 1) | (b >> 15)


@triton.jit
def fp16_bits(val):
    """fp32 -> the fp16 bits sent for an outlier (int32): rounded as the reference, every NaN as 0x7E00."""
    return tl.where(val != val, _NAN16, val.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32))


@triton.jit
def value16(bits16, BF16: tl.constexpr):
    """The fp16 bits (int32) sent for a 16-bit input value given as its bits (int32, sign at bit 15)."""
    if BF16:  # bf16 -> fp32 is exact (the high half); fp32 -> fp16 rounds as the reference
        val = (bits16 << 16).to(tl.float32, bitcast=True)
    else:
        val = bits16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return fp16_bits(val)


@triton.jit
def pick16(key, BF16: tl.constexpr):
    """A ``key16`` -> (its column, the fp16 bits of its value), without a load."""
    return 0x7FFF - ((key >> 1) & 0x7FFF), value16((key >> 16) | ((key & 1) << 15), BF16)


@triton.jit
def _select_kernel(
    x_ptr,  # [R, H] fp16/bf16/fp32 values
    xb_ptr,  # the same memory as integers of the same width (the row is copied bit for bit)
    idx_ptr,  # [R, K] int16: columns (uint16 bits), best first
    val_ptr,  # [R, K] int16: fp16 bits of the chosen values
    rest_ptr,  # [R, H] integers of x's width: the row with the chosen columns set to +0
    cols,
    K: tl.constexpr,
    KP: tl.constexpr,  # K rounded up to a power of two (the result vectors)
    BLOCK: tl.constexpr,
    NARROW: tl.constexpr,  # a 16-bit input: int32 keys (else fp32: int64 keys)
    BF16: tl.constexpr,  # NARROW: the input is bf16 (else fp16)
):
    # One integer per value, so that each round is a single max-reduction and the winner's value is
    # rebuilt from its key without a load: |v|'s bits (every NaN raised to the top value, above Inf),
    # then the column reversed (ties go to the lower column), then the sign. A 16-bit value's 15
    # magnitude bits, 15 column bits and the sign fit an int32; an fp32 value needs an int64.
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < cols
    base = row * cols
    raw = tl.load(xb_ptr + base + c, mask=inside, other=0)
    if NARROW:
        packed = key16(raw.to(tl.int32) & 0xFFFF, c, BF16)
    else:
        rev = BLOCK - 1 - c
        b = raw.to(tl.int32)
        key = b & 0x7FFFFFFF
        key = tl.where(key > 0x7F800000, 0x7FFFFFFF, key)
        packed = (key.to(tl.int64) << 32) | (rev.to(tl.int64) << 1) | (b < 0).to(tl.int64)
    packed = tl.where(inside, packed, -2)
    kk = tl.arange(0, KP)
    cols_out = tl.zeros([KP], dtype=tl.int32)
    vals_out = tl.zeros([KP], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.max(packed, axis=0)
        packed = tl.where(packed == best, -1, packed)  # taken (each packed value is unique)
        if NARROW:
            j, v16 = pick16(best, BF16)
        else:
            j = BLOCK - 1 - ((best >> 1) & 0x7FFFFFFF).to(tl.int32)
            val = ((best >> 32).to(tl.int32) | ((best & 1).to(tl.int32) << 31)).to(tl.float32, bitcast=True)
            v16 = fp16_bits(val)
        cols_out = tl.where(kk == i, j, cols_out)
        vals_out = tl.where(kk == i, v16, vals_out)
    tl.store(idx_ptr + row * K + kk, cols_out.to(tl.int16), mask=kk < K)
    tl.store(val_ptr + row * K + kk, vals_out.to(tl.int16), mask=kk < K)
    tl.store(rest_ptr + base + c, tl.where(packed == -1, 0, raw).to(raw.dtype), mask=inside)


def select(
    x: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    vals: torch.Tensor,
    rest: torch.Tensor,
    num_warps: int | None = None,
) -> None:
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
    narrow = x.element_size() == 2
    ints = torch.int16 if narrow else torch.int32
    block = triton.next_power_of_2(cols)
    if num_warps is None:  # 32 keys a thread (int32) or 16 (int64): the fastest on an H100
        num_warps = max(1, min(16, block // (1024 if narrow else 512)))  # (bench/outlier_select_tune.py)
    _select_kernel[(rows,)](
        x, x.view(ints), idx, vals.view(torch.int16), rest.view(ints), cols,
        K=k, KP=triton.next_power_of_2(k), BLOCK=block, NARROW=narrow, BF16=x.dtype == torch.bfloat16,
        num_warps=num_warps,
    )  # fmt: skip
