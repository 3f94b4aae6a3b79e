"""The ``int4_outlier`` / ``int4_outlier_asym`` codecs' payload in one kernel each way: a row's ``k`` outliers
picked, set aside and zeroed, and the rest quantized and packed (int4 or int4_asym) without writing the zeroed
row to memory; and the reverse, the row dequantized with its outliers put back.

Why: ``outlier_select.select`` then the int4 encoder write the zeroed row and read it back (16 + 16 bytes per
8 values more than int4 alone), and its ``k`` block-wide reductions of every key cost more than the
quantization; the decode was the int4 decoder then four torch ops for the scatter.

The selection (same rule and result as ``reference.select_outliers``): the row is read as int32 words (two
fp16/bf16 values each) in chunks of 8 values. First the ``k`` largest *chunk maxima* are picked (``k``
reductions over H / 8 values instead of H); their smallest, ``tau``, is a lower bound of the row's ``k``-th
largest key (``k`` distinct chunks reach it). When exactly ``k`` keys are >= ``tau`` (the top ``k`` lie in
distinct chunks, the common case), they are the top ``k`` and the picks are already in order; otherwise
``k`` rounds run over every key of the row. The keys (``outlier_select.key16``) are unique, so both ways
give the reference's columns in its order.

Applies to 16-bit inputs whose rows hold whole groups of a power-of-two size >= 8, at most 16,384 columns and
32 outliers (``applies``); the codec runs ``outlier_select`` + the int4 kernels elsewhere.

Layout: kernels (``@triton.jit``) -> launchers (``encode`` / ``decode``: checks, grid) -> torch references
``reference.select_outliers`` + ``quantize_int4`` / ``quantize_int4_asym`` and their decoders (bitwise equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.kernels.outlier_select import MAX_COLS, MAX_K, value16
from hyperlane_lab.kernels.quant_common import (
    ACT_DTYPES,
    asym_group_params,
    bf16_bits,
    check_launch,
    group_scales,
    halves_to_f32,
    load_nibbles,
    load_per_group,
    output_view,
    quantize_biased,
    store_groups,
    word_loads_ok,
)

__all__ = ["applies", "decode", "encode"]


@triton.jit
def _top4(a1, a2, a3, a4, b1, b2, b3, b4):
    """The 4 largest of two descending lists of 4 distinct keys (-1: none), descending: a bitonic merge."""
    m1, m2, m3, m4 = tl.maximum(a1, b4), tl.maximum(a2, b3), tl.maximum(a3, b2), tl.maximum(a4, b1)
    m1, m3 = tl.maximum(m1, m3), tl.minimum(m1, m3)
    m2, m4 = tl.maximum(m2, m4), tl.minimum(m2, m4)
    return tl.maximum(m1, m2), tl.minimum(m1, m2), tl.maximum(m3, m4), tl.minimum(m3, m4)


@triton.jit
def _flat(t):
    """A 2-D tensor as 1-D, so that a max over all of it is one reduction (sm_90, Triton 3.6: no data moves)."""
    return tl.reshape(t, [t.shape[0] * t.shape[1]])


@triton.jit
def _encode_kernel(
    w_ptr,  # [R, H / 2] int32: the fp16/bf16 input as words (element 2i in the low half)
    scale_ptr,  # [R * GPR] int16 (fp16 bits)
    min_ptr,  # [R * GPR] int16 (ASYM; else unused)
    idx_ptr,  # [R, K] int16: outlier columns, best first
    val_ptr,  # [R, K] int16: their fp16 bits
    p_ptr,  # [R * H / 2] uint8: packed nibbles
    flag_ptr,  # [1] int32 (CHECK): += bad groups + outliers that are not finite in fp16
    GPR,  # groups per row
    GS: tl.constexpr,
    GPR_P: tl.constexpr,  # GPR rounded up to a power of two
    K: tl.constexpr,
    KP: tl.constexpr,
    ASYM: tl.constexpr,
    CHECK: tl.constexpr,
    BF16: tl.constexpr,
    EVEN: tl.constexpr,  # GPR == GPR_P: no masks
    TOP4: tl.constexpr,  # the first pass takes its picks four at a time (bench/outlier_quant_tune.py)
):
    row = tl.program_id(0).to(tl.int64)
    gl = tl.arange(0, GPR_P)
    # word (pair) index in the row, [GPR_P, GS / 8, 4]: a chunk is 4 words (16 bytes) of one thread
    wi = (
        gl[:, None, None] * (GS // 2)
        + tl.arange(0, GS // 8)[None, :, None] * 4
        + tl.arange(0, 4)[None, None, :]
    )
    base = row * GPR * (GS // 2)
    if EVEN:
        w = tl.load(w_ptr + base + wi)
    else:
        inside = (gl < GPR)[:, None, None]
        w = tl.load(w_ptr + base + wi, mask=inside, other=0)
    # Keys without the sign (the values are loaded once chosen): |v|'s 15 bits (every NaN as Inf's + 1, so
    # all NaNs tie above Inf), then the column reversed: unique, and in the reference's order.
    nan: tl.constexpr = (0x7F80 if BF16 else 0x7C00) + 1
    ctl = 0x7FFF - 2 * wi
    klo = (tl.minimum(w & 0x7FFF, nan) << 16) | ctl
    khi = tl.minimum(w & 0x7FFF0000, nan << 16) | (ctl - 1)
    if not EVEN:
        klo = tl.where(inside, klo, -2)
        khi = tl.where(inside, khi, -2)
    # the k largest chunk maxima, by descending thresholds (keys are unique): tau ends as the k-th
    cm = _flat(tl.max(tl.maximum(klo, khi), axis=2))
    kk = tl.arange(0, KP)
    picks = tl.full([KP], 0, tl.int32)
    tau = 0x7FFFFFFF
    if TOP4:  # four picks a reduction (a quarter of the block-wide reductions, each with more work)
        for i in tl.static_range(0, K, 4):
            cands = tl.where(cm < tau, tl.maximum(cm, -1), -1)
            none = tl.full(cands.shape, -1, tl.int32)
            t1, t2, t3, t4 = tl.reduce((cands, none, none, none), 0, _top4)
            picks = tl.where(kk == i, t1, picks)
            tau = t1
            if i + 1 < K:
                picks = tl.where(kk == i + 1, t2, picks)
                tau = t2
            if i + 2 < K:
                picks = tl.where(kk == i + 2, t3, picks)
                tau = t3
            if i + 3 < K:
                picks = tl.where(kk == i + 3, t4, picks)
                tau = t4
    else:
        for i in tl.static_range(K):
            tau = tl.max(tl.where(cm < tau, cm, -1), axis=0)
            picks = tl.where(kk == i, tau, picks)
    n_over = tl.sum(_flat(tl.sum((klo >= tau).to(tl.int32) + (khi >= tau).to(tl.int32), axis=2)), axis=0)
    if (n_over != K) | (tau < 0):  # two of the top k share a chunk: k rounds over every key
        tau = 0x7FFFFFFF
        for i in tl.static_range(K):
            below = tl.maximum(tl.where(klo < tau, klo, -2), tl.where(khi < tau, khi, -2))
            tau = tl.max(_flat(tl.max(below, axis=2)), axis=0)
            picks = tl.where(kk == i, tau, picks)
    cols = 0x7FFF - (picks & 0x7FFF)
    bits16 = tl.load(w_ptr.to(tl.pointer_type(tl.int16)) + 2 * base + cols, mask=kk < K, other=0)
    v16 = value16(bits16.to(tl.int32), BF16)
    tl.store(idx_ptr + row * K + kk, cols.to(tl.int16), mask=kk < K)
    tl.store(val_ptr + row * K + kk, v16.to(tl.int16), mask=kk < K)
    # the row with its outliers at +0 (keys >= tau are exactly the k picked)
    w = tl.where(klo >= tau, w & -65536, w)
    w = tl.where(khi >= tau, w & 0xFFFF, w)
    ve, vo = halves_to_f32(w, BF16)
    mag = tl.maximum(ve.to(tl.int32, bitcast=True) & 0x7FFFFFFF, vo.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    absbits = tl.max(tl.max(mag, axis=2), axis=1)  # as abs_max_bits, per group
    if ASYM:
        lo = tl.min(tl.min(tl.minimum(ve, vo), axis=2), axis=1)
        hi = tl.max(tl.max(tl.maximum(ve, vo), axis=2), axis=1)
        bits, divisor, recip, bad, mbits = asym_group_params(lo, hi, absbits)
        mf = mbits.to(tl.float16, bitcast=True).to(tl.float32)[:, None, None]
        lo_q = quantize_biased(ve - mf, divisor[:, None], recip[:, None], bad[:, None], 0)
        hi_q = quantize_biased(vo - mf, divisor[:, None], recip[:, None], bad[:, None], 0)
    else:
        bits, divisor, recip, bad = group_scales(absbits, 7)
        lo_q = quantize_biased(ve, divisor[:, None], recip[:, None], bad[:, None], 8)
        hi_q = quantize_biased(vo, divisor[:, None], recip[:, None], bad[:, None], 8)
    packed = (lo_q + (hi_q << 4)).to(tl.uint8)  # low nibbles: element 2i, then 2i + 1 (see quantize_biased)
    g = row * GPR + gl
    if EVEN:
        tl.store(p_ptr + base + wi, packed)
        tl.store(scale_ptr + g, bits)
        if ASYM:
            tl.store(min_ptr + g, mbits)
    else:
        tl.store(p_ptr + base + wi, packed, mask=inside)
        tl.store(scale_ptr + g, bits, mask=gl < GPR)
        if ASYM:
            tl.store(min_ptr + g, mbits, mask=gl < GPR)
    if CHECK:  # one atomic per bad group or non-finite outlier (rare), no block-wide count
        tl.atomic_add(flag_ptr + 0 * gl, 1, mask=bad & (gl < GPR))
        tl.atomic_add(flag_ptr + 0 * kk, 1, mask=((v16 & 0x7C00) == 0x7C00) & (kk < K))


@triton.jit
def _decode_kernel(
    scale_ptr,  # [R * GPR] int16
    min_ptr,  # [R * GPR] int16 (ASYM)
    idx_ptr,  # [R, K] int16
    val_ptr,  # [R, K] int16 (fp16 bits)
    p_ptr,  # [R * H / 2] uint8
    out_ptr,  # [R, H] (bf16: int16 view)
    GPR,
    GS: tl.constexpr,
    GPR_P: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    ASYM: tl.constexpr,
    OUT_MAX: tl.constexpr,
    OUT_BF16: tl.constexpr,
    EVEN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gl = tl.arange(0, GPR_P)
    g = row * GPR + gl
    gvalid = gl < GPR
    q = load_nibbles(p_ptr, g, gvalid, GS, GS, GPR_P, EVEN)
    scale = load_per_group(scale_ptr, g, gvalid, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
    if ASYM:
        m = load_per_group(min_ptr, g, gvalid, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
        v = q.to(tl.float32) * scale[:, None] + m[:, None]  # the product is exact: no fma question
    else:
        v = (q - 8).to(tl.float32) * scale[:, None]
    cols = GPR * GS
    store_groups(out_ptr, v, g, gvalid, cols, GPR, GS, GS, OUT_MAX, OUT_BF16, True, EVEN)
    # the outliers overwrite their columns: the barrier orders this block's two stores to the same address
    tl.debug_barrier()
    kk = tl.arange(0, KP)
    j = tl.load(idx_ptr + row * K + kk, mask=kk < K, other=0).to(tl.int32) & 0xFFFF
    ov = tl.load(val_ptr + row * K + kk, mask=kk < K, other=0).to(tl.float16, bitcast=True)
    put = (kk < K) & (j < cols)  # a column past the row (a payload that skipped validate) writes nothing
    if OUT_BF16:  # fp16 -> bf16 rounds to nearest even, Inf and NaN kept (no clamp: as torch's cast)
        tl.store(out_ptr + row * cols + j, bf16_bits(ov.to(tl.float32)), mask=put)
    else:
        tl.store(out_ptr + row * cols + j, ov.to(out_ptr.dtype.element_ty), mask=put)


def applies(cols: int, group_size: int, k: int, x: torch.Tensor | None = None) -> bool:
    """The fused kernels take rows of ``cols`` values in groups of ``group_size`` with ``k`` outliers (and, to
    encode, the input ``x``: 16-bit values from a 4-byte aligned start)."""
    shape_ok = (
        8 <= group_size <= cols <= MAX_COLS
        and group_size & (group_size - 1) == 0
        and cols % group_size == 0
        and 1 <= k <= min(MAX_K, cols)
    )
    return shape_ok and (x is None or word_loads_ok(x, True))


def _grid_meta(rows: int, cols: int, group_size: int, k: int) -> tuple[int, dict[str, object]]:
    gpr = cols // group_size
    gpr_p = triton.next_power_of_2(gpr)
    warps = max(1, min(16, gpr_p * group_size // 1024))  # 32 values a thread (outlier_select: the fastest)
    return gpr, dict(
        GS=group_size, GPR_P=gpr_p, K=k, KP=triton.next_power_of_2(k), EVEN=gpr == gpr_p, num_warps=warps
    )


def _check(
    rows: int,
    cols: int,
    group_size: int,
    k: int,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    idx: torch.Tensor,
    vals: torch.Tensor,
    packed: torch.Tensor,
) -> None:
    if not applies(cols, group_size, k):
        raise ValueError(
            f"the fused outlier kernels take 8 <= group_size <= cols <= {MAX_COLS}, a power-of-two group_size "
            f"dividing cols and 1 <= k <= min({MAX_K}, cols); got cols={cols}, group_size={group_size}, k={k} "
            "(use outlier_select.select and the int4 kernels)"
        )
    n = rows * (cols // group_size)
    check_launch(scales, "scales", (torch.int16,), n)
    if mins is not None:
        check_launch(mins, "mins", (torch.int16,), n)
    check_launch(idx, "idx", (torch.int16,), rows * k)
    check_launch(vals, "vals", (torch.float16,), rows * k)
    check_launch(packed, "packed", (torch.uint8,), rows * cols // 2)


def encode(
    x: torch.Tensor,
    k: int,
    group_size: int,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    idx: torch.Tensor,
    vals: torch.Tensor,
    packed: torch.Tensor,
    flag: torch.Tensor | None = None,
    *,
    num_warps: int | None = None,
    top4: bool = False,
) -> None:
    """Fill an outlier payload's sections from ``x [R, H]`` (fp16/bf16): ``scales`` (and ``mins`` for
    int4_asym groups, else None) int16 [R * H / gs], ``idx`` int16 [R, k], ``vals`` fp16 [R, k], ``packed``
    uint8 [R * H / 2]. ``flag`` (int32 [1]) receives the number of bad groups plus outliers not finite in fp16.
    ``num_warps`` and ``top4`` (the first pass's picks four per block-wide reduction: 5 barriers instead of 21
    and 72 registers instead of 80 on sm_90 offline, not yet timed on a GPU) override the defaults
    (``bench/outlier_quant_tune.py`` times them). Torch reference: ``reference.select_outliers`` then ``quantize_int4`` / ``quantize_int4_asym``."""
    check_launch(x, "outlier encode input", ACT_DTYPES[:2])
    if x.dim() != 2 or not word_loads_ok(x, True):
        raise ValueError(f"outlier encode takes a 4-byte aligned x [R, H], got shape {tuple(x.shape)}")
    rows, cols = x.shape
    _check(rows, cols, group_size, k, scales, mins, idx, vals, packed)
    if flag is not None:
        check_launch(flag, "flag", (torch.int32,), 1)
    if rows == 0:
        return
    gpr, meta = _grid_meta(rows, cols, group_size, k)
    if num_warps is not None:
        meta["num_warps"] = num_warps
    _encode_kernel[(rows,)](
        x.view(torch.int32), scales, scales if mins is None else mins, idx, vals.view(torch.int16), packed,
        scales if flag is None else flag, gpr, ASYM=mins is not None, CHECK=flag is not None,
        BF16=x.dtype == torch.bfloat16, TOP4=top4, enable_fp_fusion=False, **meta,
    )  # fmt: skip


def decode(
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    idx: torch.Tensor,
    vals: torch.Tensor,
    packed: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    k: int,
) -> None:
    """Fill ``out [R, H]`` (fp16/bf16/fp32) from an outlier payload's sections (as ``encode`` writes them; a
    column >= H, which ``OutlierInt4Codec.validate`` refuses, is skipped here). Torch reference: ``dequantize_int4`` /
    ``dequantize_int4_asym`` then the outliers scattered back."""
    check_launch(out, "outlier decode output", ACT_DTYPES)
    if out.dim() != 2:
        raise ValueError(f"outlier decode takes out [R, H], got shape {tuple(out.shape)}")
    rows, cols = out.shape
    _check(rows, cols, group_size, k, scales, mins, idx, vals, packed)
    if rows == 0:
        return
    gpr, meta = _grid_meta(rows, cols, group_size, k)
    out_ptr, out_meta = output_view(out)
    _decode_kernel[(rows,)](
        scales, scales if mins is None else mins, idx, vals.view(torch.int16), packed, out_ptr, gpr,
        ASYM=mins is not None, enable_fp_fusion=False, **meta, **out_meta,
    )  # fmt: skip
