"""Shared pieces of the quantization kernels: ``@triton.jit`` helpers (group loads, scales, rounding, output
clamp), launch configuration and launcher checks. Imports Triton at module import: import this module lazily
(the codecs do).

Every helper reproduces a step of the torch reference ``hyperlane_lab.codecs.reference`` bit for bit:

- the per-group scale uses the reference's fp32 operations in the same order; its division uses
  ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's plain ``/`` may be approximate);
- the per-value quotient ``v / s`` is ``q0 = v * r``, ``q = fma(v - q0 * s, r, q0)`` with ``r = 1 / s``
  rounded (one correctly rounded division per group instead of one per value). This equals the IEEE quotient
  whenever it is a normal fp32 number: ``s`` has an 11-bit significand, so ``v / s`` lies at least 2**-12 ulp
  away from any rounding midpoint, while the correction step leaves an error below 2**-23 ulp (``q0`` is
  within 1.5 ulp, so ``v - q0 * s`` is exact in the fma). Smaller quotients round to 0 either way.
  ``tests/test_quant_math.py`` checks the identity over every fp16 value and near-tie fp32 values;
- round-half-to-even adds ``1.5 * 2**23 (+ bias)`` in fp32: the sum's bits then hold ``0x4B400000 + bias +
  round(v)`` for ``|v| < 2**22``; the int8 / nibble extraction works on those integer bits (no float -> int
  conversions). The reference's clamp to [-qmax, qmax] never changes a good group (``quantize_biased``);
- the group's max |v| is an integer max of the fp32 bits with the sign cleared: for non-negative floats the
  bit order is the value order, and NaN/Inf sort above every finite value, which flags the group as bad;
- clamps of output values are written with ``tl.where`` so that NaN passes through as in ``torch.where``;
- fp32 -> bf16 output rounding is done with integer ops (``bf16_bits``): the interpreter's cast truncates.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "ACT_DTYPES",
    "INTERPRET",
    "OUT_MAX",
    "TILE_ELEMS",
    "abs_max_bits",
    "asym_group_params",
    "bf16_bits",
    "check_launch",
    "clamp_where",
    "count_bad",
    "decoder_layout",
    "group_scales",
    "halves_to_f32",
    "launch_config",
    "launch_shape",
    "load_groups",
    "load_nibbles",
    "load_per_group",
    "load_word_pairs",
    "output_view",
    "quantize_biased",
    "scales_from",
    "store_groups",
    "store_nibbles",
    "store_output",
    "word_loads_ok",
]


def _interpret_mode() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: read the variable as triton.jit does
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed when this module is imported, as ``@triton.jit`` decides interpreted vs compiled at decoration time.
INTERPRET: bool = _interpret_mode()

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_MAX = {dt: float(torch.finfo(dt).max) for dt in ACT_DTYPES}

# Launch configuration (``bench/codec_tune.py`` times the alternatives). The decoders keep 2048 values per
# program. Encoders, large inputs: 4096 values per program with 4 warps, i.e. 32 per thread, 4 x 16-byte
# loads in flight per thread and ~8 programs per SM (57 registers): enough bytes in flight for HBM, and the
# per-program and per-group work (addresses, two divisions per group) is spread over more values. Small
# inputs (decode steps): 512-value programs of 2 warps, so a 1 x 4096 row runs as 8 programs whose threads
# have short dependency chains (latency, not bandwidth, is what counts there).
TILE_ELEMS = 2048  # decoders: values per program (groups_per_program * padded group size)
ENC_TILE, ENC_WARPS = 4096, 4
ENC_SMALL_TILE, ENC_SMALL_WARPS = 512, 2
ENC_SMALL_ELEMS = 1 << 20  # inputs of at most this many (padded) values use the small config
_WARPS_OK = (1, 2, 4, 8, 16)


@triton.jit
def clamp_where(v, lim):
    """Clamp to [-lim, lim], keeping NaN (same as the reference's torch.where clamp)."""
    return tl.where(v > lim, lim, tl.where(v < -lim, -lim, v))


@triton.jit
def bf16_bits(v):
    """fp32 -> bfloat16 bits (int16), round-to-nearest-even, NaN -> 0x7FC0 (as torch on CPU).

    Done with integer ops because the interpreter's fp32 -> bf16 cast truncates.
    """
    u = v.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return tl.where(v != v, 0x7FC0, r).to(tl.int16)


@triton.jit
def store_output(ptr, v, mask, OUT_MAX: tl.constexpr, OUT_BF16: tl.constexpr):
    """Clamp fp32 ``v`` to the output's finite range and store it (``ptr``: int16 view when OUT_BF16)."""
    v = clamp_where(v, OUT_MAX)
    if OUT_BF16:
        tl.store(ptr, bf16_bits(v), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_groups(
    x_ptr, g, j, n_groups, cols, groups_per_row, GS: tl.constexpr, DENSE: tl.constexpr, EVEN: tl.constexpr
):
    """fp32 ``[GP, J]``: value ``j`` of group ``g`` of ``x [R, H]``, 0 outside the group or the tensor.

    DENSE (H % GS == 0): group g starts at g * GS, no row/column split (that needs a 64-bit division per
    group). EVEN (DENSE, every (g, j) in range): no masks at all, so loads are plain 16-byte vectors.
    """
    if EVEN:
        v = tl.load(x_ptr + g[:, None] * GS + j[None, :])
    elif DENSE:
        m = (g < n_groups)[:, None] & (j < GS)[None, :]
        v = tl.load(x_ptr + g[:, None] * GS + j[None, :], mask=m, other=0.0)
    else:
        row = g // groups_per_row
        col = (g % groups_per_row)[:, None] * GS + j[None, :]
        m = (g < n_groups)[:, None] & (j < GS)[None, :] & (col < cols)
        v = tl.load(x_ptr + row[:, None] * cols + col, mask=m, other=0.0)
    return v.to(tl.float32)


@triton.jit
def store_groups(
    out_ptr, v, g, gvalid, cols, groups_per_row, GS: tl.constexpr, BLOCK: tl.constexpr,
    OUT_MAX: tl.constexpr, OUT_BF16: tl.constexpr, DENSE: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """Store fp32 ``v [GP, BLOCK]`` as groups ``g`` of ``out [R, H]`` (``store_output``: clamped, cast);
    lanes past GS, the last group's row padding and masked groups are dropped. Inverse of ``load_groups``.

    DENSE / EVEN as in ``load_groups`` (``decoder_layout``): group g's values are ``out``'s flat
    g * GS.. (no 64-bit row/column division per group), and with EVEN nothing is masked."""
    j = tl.arange(0, BLOCK)
    if EVEN:
        store_output(out_ptr + g[:, None] * GS + j[None, :], v, None, OUT_MAX, OUT_BF16)
    elif DENSE:
        in_group = gvalid[:, None] & (j < GS)[None, :]
        store_output(out_ptr + g[:, None] * GS + j[None, :], v, in_group, OUT_MAX, OUT_BF16)
    else:
        row = g // groups_per_row
        col = (g % groups_per_row)[:, None] * GS + j[None, :]
        in_group = gvalid[:, None] & (j < GS)[None, :]
        store_output(out_ptr + row[:, None] * cols + col, v, in_group & (col < cols), OUT_MAX, OUT_BF16)


@triton.jit
def load_per_group(ptr, g, gvalid, EVEN: tl.constexpr):
    """One value per group (``ptr + g``, ``[GP]``), 0 where ``gvalid`` is false; without a mask when ``EVEN``
    (every g valid). Inverse of ``store_per_group``."""
    if EVEN:
        v = tl.load(ptr + g)
    else:
        v = tl.load(ptr + g, mask=gvalid, other=0)
    return v


@triton.jit
def store_per_group(ptr, vals, g, n_groups, EVEN: tl.constexpr):
    """Store one value per group (``vals [GP]`` at groups ``g``): without a mask when ``EVEN`` (every g valid)."""
    if EVEN:
        tl.store(ptr + g, vals)
    else:
        tl.store(ptr + g, vals, mask=g < n_groups)


@triton.jit
def count_bad(flag_ptr, bad, g, n_groups):
    """Add the number of bad groups among ``g`` (ids < n_groups) to ``flag_ptr``: one atomic per program, and
    only when it has any."""
    nbad = tl.sum((bad & (g < n_groups)).to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(flag_ptr, nbad)


@triton.jit
def load_nibbles(
    p_ptr, g, gvalid, GS: tl.constexpr, BLOCK: tl.constexpr, GP: tl.constexpr, EVEN: tl.constexpr
):
    """int32 ``[GP, BLOCK]``: the nibbles of groups ``g`` of a packed int4 payload (byte k of a group holds
    element 2k in its low nibble, 2k+1 in its high one); 0 for masked groups and lanes past GS (EVEN:
    every group valid and BLOCK == GS, no mask)."""
    k = tl.arange(0, BLOCK // 2)
    if EVEN:
        b = tl.load(p_ptr + g[:, None] * (GS // 2) + k[None, :])
    else:
        b = tl.load(
            p_ptr + g[:, None] * (GS // 2) + k[None, :],
            mask=gvalid[:, None] & (k < GS // 2)[None, :],
            other=0,
        )
    b = b.to(tl.int32)
    return tl.reshape(tl.join(b & 15, b >> 4), [GP, BLOCK])


@triton.jit
def halves_to_f32(w, BF16: tl.constexpr):
    """int32 words of two fp16/bf16 values -> (fp32 of the low half, fp32 of the high half)."""
    if BF16:  # a bf16 is the high half of the fp32 with the same value
        return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
    lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # int32 -> int16 keeps the low half
    hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def load_word_pairs(
    x_ptr, g, n_groups, GS: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr, BF16: tl.constexpr
):
    """A 16-bit input read as int32 words (``word_loads_ok``: 16-byte vector loads, and the pair a byte packs
    in one thread): fp32 ``(elements 2k, elements 2k + 1)`` of groups ``g``, ``[GP, BLOCK // 2]`` each, 0 for
    masked groups and lanes past GS (EVEN: none, no mask)."""
    k = tl.arange(0, BLOCK // 2)
    w_ptr = x_ptr.to(tl.pointer_type(tl.int32)) + g[:, None] * (GS // 2) + k[None, :]
    if EVEN:
        w = tl.load(w_ptr)
    else:
        w = tl.load(w_ptr, mask=(g < n_groups)[:, None] & (k < GS // 2)[None, :], other=0)
    return halves_to_f32(w, BF16)


@triton.jit
def abs_max_bits(v):
    """``v [GP, B]`` fp32 -> int32 [GP]: bits of max |v| per row; >= 0x7F800000 when the row has NaN/Inf."""
    return tl.max(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)


@triton.jit
def scales_from(s32, bad):
    """fp32 step per group ``s32`` and its ``bad`` flags [GP] -> (scale bits int16, divisor fp32, 1 / divisor
    fp32, bad): the scale is the smallest fp16 >= ``s32`` (-0 kept as +0), fp16 NaN in groups that are bad or
    whose scale overflowed; the divisor is 1 there and for zero scales.

    Reference: ``hyperlane_lab.codecs.reference.fp16_scales``.
    """
    s16 = s32.to(tl.float16)
    bits = s16.to(tl.int16, bitcast=True)
    bits = tl.where(s16.to(tl.float32) < s32, bits + 1, bits).to(tl.int16)  # smallest fp16 >= s32
    bits = tl.where(bits == -32768, 0, bits).to(tl.int16)  # -0 (an asymmetric group's max of -0): +0
    bad = bad | (bits >= 0x7C00)
    bits = tl.where(bad, 0x7E00, bits).to(tl.int16)  # fp16 NaN marks a bad group
    scale = bits.to(tl.float16, bitcast=True).to(tl.float32)
    divisor = tl.where(bad | (bits == 0), 1.0, scale)
    recip = tl.math.div_rn(tl.zeros_like(divisor) + 1.0, divisor)
    return bits, divisor, recip, bad


@triton.jit
def group_scales(absbits, QMAX: tl.constexpr):
    """``abs_max_bits`` of each group -> (scale bits int16, divisor fp32, 1 / divisor fp32, bad), all [GP].

    Reference: ``hyperlane_lab.codecs.reference.group_scales`` (its ``absmax`` over the finite values only
    matters for good groups, where it is the max of all values).
    """
    absmax = absbits.to(tl.float32, bitcast=True)
    return scales_from(tl.math.div_rn(absmax, tl.zeros_like(absmax) + QMAX), absbits >= 0x7F800000)


@triton.jit
def asym_group_params(lo, hi, absbits):
    """An asymmetric group's ``min`` / ``max`` values and ``abs_max_bits`` [GP] -> (scale bits int16, divisor fp32,
    1 / divisor fp32, bad, minimum bits int16): the minimum is the largest fp16 <= ``lo`` (-0 stored as +0), the
    scale the smallest fp16 >= (hi - minimum) / 15; a bad group's minimum is stored as +0.

    Reference: ``hyperlane_lab.codecs.reference.asym_group_params``.
    """
    m16 = lo.to(tl.float16)  # round to nearest, then one ulp toward -Inf if above
    mbits = m16.to(tl.int16, bitcast=True)
    down = tl.where(m16 > 0, mbits - 1, mbits + 1).to(tl.int16)
    mbits = tl.where(m16.to(tl.float32) > lo, down, mbits).to(tl.int16)
    mbits = tl.where(mbits == -32768, 0, mbits).to(tl.int16)  # -0 -> +0 (which zero tl.min picks varies)
    m = mbits.to(tl.float16, bitcast=True).to(tl.float32)
    bad = (absbits >= 0x7F800000) | ((mbits & 0x7FFF) >= 0x7C00)
    bits, divisor, recip, bad = scales_from(tl.math.div_rn(hi - m, tl.zeros_like(hi) + 15.0), bad)
    return bits, divisor, recip, bad, tl.where(bad, 0, mbits).to(tl.int16)


@triton.jit
def store_nibbles(p_ptr, lo, hi, g, n_groups, GS: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """Store byte k of each group ``g`` as ``lo | hi << 4`` (int32 [GP, BLOCK // 2] whose low 4 bits are the
    nibbles of elements 2k and 2k+1 and bits 4..7 are 0, as ``quantize_biased`` leaves them)."""
    packed = (lo + (hi << 4)).to(tl.uint8)
    k = tl.arange(0, BLOCK // 2)
    offs = g[:, None] * (GS // 2) + k[None, :]
    if EVEN:
        tl.store(p_ptr + offs, packed)
    else:
        tl.store(p_ptr + offs, packed, mask=(g < n_groups)[:, None] & (k < GS // 2)[None, :])


@triton.jit
def quantize_biased(v, divisor, recip, bad, BIAS: tl.constexpr):
    """int32 ``0x4B400000 + BIAS + round(v / divisor)`` (half to even); ``0x4B400000 + BIAS`` in bad groups.

    Its low byte is the int8 value (BIAS 0), its low nibble the int4 nibble ``q + 8`` (BIAS 8): the magic
    constant's low byte is 0. No clamp to [-qmax, qmax] is needed: in a good group the scale is >= the fp32
    ``absmax / qmax``, so ``|v / scale| <= qmax * (1 + 2**-23)``, which rounds to at most qmax.
    """
    r = recip[:, None]
    q0 = v * r
    # fma(q0, -d, v): the negation stays per group ("-q0" would cost one more op per value)
    q = tl.fma(tl.fma(q0, (0.0 - divisor)[:, None], v), r, q0)  # == IEEE v / d, see the module docstring
    b = (q + (12582912.0 + BIAS)).to(tl.int32, bitcast=True)
    return tl.where(bad[:, None], 0x4B400000 + BIAS, b)


def word_loads_ok(x: torch.Tensor, dense: bool) -> bool:
    """``load_word_pairs`` applies to ``x``: 16-bit values, rows of whole groups (``dense``), a 4-byte aligned
    start."""
    return dense and x.element_size() == 2 and x.data_ptr() % 4 == 0


def launch_shape(group_size: int) -> tuple[int, int]:
    """Decoders: (padded group size BLOCK, groups per program GP); both powers of two."""
    block = triton.next_power_of_2(group_size)
    return block, max(1, TILE_ELEMS // block)


def decoder_layout(n_groups: int, cols: int, group_size: int, block: int, gp: int) -> dict[str, bool]:
    """The decoders' DENSE / EVEN constexprs (``store_groups``) for a launch of ``gp`` groups per program,
    each padded to ``block`` lanes: DENSE when rows hold whole groups (``cols % group_size == 0``), EVEN when
    also every program's groups are all valid and unpadded."""
    dense = cols % group_size == 0
    return {"DENSE": dense, "EVEN": dense and block == group_size and n_groups % gp == 0}


def launch_config(
    group_size: int, n_groups: int, tile: int | None = None, num_warps: int | None = None
) -> tuple[int, int, int]:
    """Encoders: (BLOCK, groups per program GP, num_warps); ``tile`` / ``num_warps`` override the defaults."""
    return _config(group_size, n_groups * group_size <= ENC_SMALL_ELEMS, tile, num_warps)


@functools.cache
def _config(group_size: int, small: bool, tile: int | None, num_warps: int | None) -> tuple[int, int, int]:
    if tile is not None and (not isinstance(tile, int) or tile < 1 or tile & (tile - 1)):
        raise ValueError(f"tile must be a power of two (values per program), got {tile!r}")
    if num_warps is not None and num_warps not in _WARPS_OK:
        raise ValueError(f"num_warps must be one of {_WARPS_OK}, got {num_warps!r}")
    block = triton.next_power_of_2(group_size)
    tile = tile or (ENC_SMALL_TILE if small else ENC_TILE)
    if num_warps is None:  # at least one warp per 1024 values of a (large) group: <= 32 values per thread
        num_warps = max(ENC_SMALL_WARPS if small else ENC_WARPS, min(8, block // 1024))
    return block, max(1, tile // block), num_warps


def output_view(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
    """(pointer tensor, constexprs) for ``store_output``: bf16 outputs are written as int16 bits."""
    meta: dict[str, object] = {"OUT_MAX": OUT_MAX[out.dtype], "OUT_BF16": out.dtype == torch.bfloat16}
    return (out.view(torch.int16) if out.dtype == torch.bfloat16 else out), meta


def check_launch(
    x: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...], numel: int | None = None
) -> None:
    """Raise ValueError unless ``x`` is a contiguous tensor of an accepted dtype, on a device Triton can use."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(f"{what} has dtype {x.dtype}; the kernel takes {', '.join(map(str, dtypes))}")
    if not x.is_contiguous():
        raise ValueError(f"{what} must be contiguous; call .contiguous() first")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(
            f"{what} is on {x.device}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before "
            "the kernels are imported, to run them on CPU); use backend='torch' for CPU tensors"
        )
    if numel is not None and x.numel() != numel:
        raise ValueError(f"{what} has {x.numel()} elements, expected {numel}")
