"""Pure-torch reference of the grouped int8/int4 quantizers. The Triton kernels in ``hyperlane_lab.kernels``
reproduce these functions bit for bit (same fp32 operations in the same order).

Per group of ``gs`` values ``v`` (fp32; for ``int4_hadamard`` the rotated values, see ``hadamard_rows``):

1. ``bad`` = the group holds a NaN/Inf;  ``absmax = max |v|`` over its finite values.
2. ``s32 = absmax / qmax`` (IEEE fp32 division), ``qmax`` = 127 (int8) or 7 (int4).
3. ``s = fp16(s32)`` rounded to nearest-even, then bumped one fp16 ulp up if it landed below ``s32``: ``s`` is
   the smallest fp16 >= ``s32``, so ``|v| / s <= qmax`` and no value is clipped (tiny groups get a subnormal
   scale instead of 0). If ``s`` is +Inf (``absmax > 65504 * qmax``) the group is ``bad`` as well.
4. ``q = clamp(round_half_even(v / s), -qmax, qmax)`` (IEEE fp32 division by the stored fp16 scale, so the
   receiver multiplies by exactly the scale the sender divided by). ``|v - q*s| <= s/2`` up to one fp32
   rounding of ``v/s`` (a relative 6e-8).
5. ``bad`` groups store the scale bits ``0x7E00`` (fp16 NaN) and ``q = 0``: they decode to NaN.

Dequantize: ``q * s`` in fp32 (exact), inverse rotation if any, clamped to the output dtype's finite range
(so an fp16 value near 65504 cannot round up to Inf), cast to the output dtype (round-to-nearest-even).

int4 packing: nibble ``u = q + 8`` (offset binary, 1..15); byte ``k`` of a group holds element ``2k`` in its
low nibble and element ``2k+1`` in its high nibble.

Asymmetric int4 (``int4_asym``, ``int4_outlier_asym``): 16 levels from the group's minimum up.

1. ``bad`` as above; ``lo`` / ``hi`` = min / max of the group (row padding counts as 0, as above).
2. ``m = fp16(lo)`` rounded to nearest-even, then moved one fp16 ulp down if it landed above ``lo``: ``m`` is
   the largest fp16 <= ``lo``; -0 is stored as +0 (a group holding both zeros may report either as its
   min). If it is -Inf (``lo < -65504``) the group is ``bad``.
3. ``s32 = (hi - m) / 15`` (fp32 subtraction, IEEE fp32 division); ``s`` = the smallest fp16 >= ``s32`` as in
   step 3 above, -0 stored as +0 (+Inf: ``bad``).
4. ``q = round_half_even((v - m) / s)`` (fp32 subtraction, then IEEE division by the stored scale; ``s = 0``
   divides by 1). ``v - m >= 0`` and ``(hi - m) / s <= 15 (1 + 2**-23)``, so ``q`` is in 0..15 without a clamp,
   and ``|v - (q*s + m)| <= s/2`` up to the fp32 roundings of ``v - m`` and of the quotient.
5. ``bad`` groups store scale bits ``0x7E00`` (NaN), ``m = 0`` and ``q = 0``: they decode to NaN.

Dequantize: ``q * s + m`` in fp32 (the product is exact, so a fused multiply-add rounds the same), clamped
and cast as above. Nibble ``u = q`` (0..15), packed as int4.

Outlier selection (``int4_outlier``, ``int4_outlier_asym``; ``select_outliers``): per row, the ``k`` values
of largest magnitude, ranked by the bits of ``|v|`` in fp32 (every NaN counts alike, above Inf), ties to
the lower column; stored in that order. Values go as fp16 (round-to-nearest-even; a NaN as
``0x7E00``); the rest of the row keeps its values, with +0 at the chosen columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "NAN16_BITS",
    "QMAX",
    "dequantize_int4",
    "dequantize_int4_asym",
    "dequantize_int8",
    "fp16_scales",
    "group_scales",
    "grouped",
    "hadamard_rows",
    "inv_sqrt_f32",
    "quantize_int4",
    "quantize_int4_asym",
    "quantize_int8",
    "ungroup",
]

QMAX = {8: 127, 4: 7}
NAN16_BITS = 0x7E00  # canonical fp16 quiet NaN: scales of bad groups, NaN outliers
NEG_ZERO16 = -0x8000  # fp16 -0.0 as int16 bits (0x8000)
FP16_INF_BITS = 0x7C00
_FP32_MAX = torch.finfo(torch.float32).max


def inv_sqrt_f32(n: int) -> float:
    """``1/sqrt(n)`` rounded to fp32 (the Hadamard normalization constant, as both paths use it)."""
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


def grouped(x2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[R, H]`` (any float dtype) -> fp32 ``[R * G, group_size]``, last group of each row zero-padded."""
    rows, cols = x2d.shape
    groups = -(-cols // group_size)
    xf = x2d.float()
    pad = groups * group_size - cols
    if pad:
        xf = F.pad(xf, (0, pad))
    return xf.reshape(rows * groups, group_size)


def ungroup(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``grouped``: ``[R * G, gs]`` -> ``[R, H]`` (drops the padding)."""
    gs = v.shape[1]
    return v.reshape(rows, -(-cols // gs) * gs)[:, :cols]


def hadamard_rows(v: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of each row of fp32 ``[N, gs]`` (gs a power of two).

    Butterfly stages h = 1, 2, 4, ...: within blocks of 2h, ``(a, b) -> (a + b, a - b)`` for a = first half,
    b = second half; then one multiply by fp32(1/sqrt(gs)). The transform is its own inverse.
    """
    n, gs = v.shape
    h = 1
    while h < gs:
        v4 = v.reshape(n, gs // (2 * h), 2, h)
        a, b = v4[:, :, 0, :], v4[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2).reshape(n, gs)
        h *= 2
    return v * inv_sqrt_f32(gs)


def fp16_scales(s32: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3 and 5 for fp32 steps ``s32 [N]`` of groups flagged ``bad``: (scale bits int16 [N], divisor fp32
    [N], bad bool [N]). The scale is the smallest fp16 >= ``s32`` (-0 kept as +0: an asymmetric group whose
    max is -0), fp16 NaN where the group is bad or the scale overflowed; the divisor is 1 there and for zero
    scales."""
    s16 = s32.to(torch.float16)
    bits = s16.view(torch.int16)
    bits = torch.where(s16.float() < s32, bits + 1, bits)  # round up: smallest fp16 >= s32
    bits = torch.where(bits == NEG_ZERO16, 0, bits).to(torch.int16)
    bad = bad | (bits >= FP16_INF_BITS)
    bits = torch.where(bad, torch.full_like(bits, NAN16_BITS), bits)
    divisor = torch.where(bad | (bits == 0), 1.0, bits.view(torch.float16).float())
    return bits, divisor, bad


def group_scales(v: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3 and 5 for fp32 ``v [N, gs]``: (scale bits int16 [N], divisor fp32 [N], bad bool [N])."""
    absv = v.abs()
    finite = absv <= _FP32_MAX  # False for NaN and +-Inf
    nonfinite = ~finite.all(dim=1)
    absmax = torch.where(finite, absv, 0.0).amax(dim=1)
    # Divide by a full tensor, not a Python scalar: CUDA turns "tensor / scalar" into a reciprocal multiply.
    return fp16_scales(absmax / torch.full_like(absmax, float(qmax)), nonfinite)


def _quantize_values(v: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    bits, divisor, bad = group_scales(v, qmax)
    q = torch.round(v / divisor[:, None]).clamp(-qmax, qmax)  # torch.round: half to even
    q = torch.where(bad[:, None], 0.0, q)
    return bits, q


def _dequantize_values(bits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return q * bits.view(torch.float16).float()[:, None]  # exact in fp32 (|q| <= 127, fp16 scale)


def _to_output(v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    lim = torch.finfo(out_dtype).max
    v = torch.where(v > lim, lim, torch.where(v < -lim, -lim, v))  # keeps NaN (clamp-by-where)
    return v.to(out_dtype)


def quantize_int8(x2d: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, H]`` -> (scale bits int16 ``[N]``, int8 values ``[N * gs]``)."""
    bits, q = _quantize_values(grouped(x2d, group_size), QMAX[8])
    return bits, q.to(torch.int8).flatten()


def dequantize_int8(
    bits: torch.Tensor, q: torch.Tensor, rows: int, cols: int, group_size: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of ``quantize_int8`` -> ``[R, H]`` of ``out_dtype``."""
    v = _dequantize_values(bits, q.reshape(-1, group_size).float())
    return ungroup(_to_output(v, out_dtype), rows, cols)


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    nib = u.to(torch.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).flatten()


def _unpack_nibbles(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    p = packed.reshape(-1, group_size // 2)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(-1, group_size).float()


def quantize_int4(
    x2d: torch.Tensor, group_size: int, hadamard: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, H]`` -> (scale bits int16 ``[N]``, packed uint8 ``[N * gs / 2]``)."""
    v = grouped(x2d, group_size)
    if hadamard:
        v = hadamard_rows(v)
    bits, q = _quantize_values(v, QMAX[4])
    return bits, _pack_nibbles(q + 8.0)  # offset binary


def dequantize_int4(
    bits: torch.Tensor,
    packed: torch.Tensor,
    rows: int,
    cols: int,
    group_size: int,
    out_dtype: torch.dtype,
    hadamard: bool = False,
) -> torch.Tensor:
    """Inverse of ``quantize_int4`` -> ``[R, H]`` of ``out_dtype``."""
    v = _dequantize_values(bits, _unpack_nibbles(packed, group_size) - 8.0)
    if hadamard:
        v = hadamard_rows(v)
    return ungroup(_to_output(v, out_dtype), rows, cols)


def asym_group_params(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric steps 1-3 and 5 for fp32 ``v [N, gs]``: (scale bits int16, min bits int16, divisor fp32,
    bad bool), all [N]."""
    finite = v.abs() <= _FP32_MAX
    nonfinite = ~finite.all(dim=1)
    lo = torch.where(finite, v, 0.0).amin(dim=1)
    hi = torch.where(finite, v, 0.0).amax(dim=1)
    m16 = lo.to(torch.float16)
    mbits = m16.view(torch.int16)
    # one fp16 ulp toward -Inf: the magnitude's bits shrink for a positive value, grow for a negative one
    down = torch.where(m16 > 0, mbits - 1, mbits + 1).to(torch.int16)
    mbits = torch.where(m16.float() > lo, down, mbits)
    # -0: +0 (which zero amin picks varies)
    mbits = torch.where(mbits == NEG_ZERO16, 0, mbits).to(torch.int16)
    m = mbits.view(torch.float16).float()
    bad = nonfinite | ((mbits & 0x7FFF) >= FP16_INF_BITS)
    bits, divisor, bad = fp16_scales((hi - m) / torch.full_like(hi, 15.0), bad)
    mbits = torch.where(bad, torch.zeros_like(mbits), mbits)
    return bits, mbits, divisor, bad


def quantize_int4_asym(x2d: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[R, H]`` -> (scale bits int16 ``[N]``, minimum bits int16 ``[N]``, packed uint8 ``[N * gs / 2]``)."""
    v = grouped(x2d, group_size)
    bits, mbits, divisor, bad = asym_group_params(v)
    d = v - mbits.view(torch.float16).float()[:, None]
    q = torch.round(d / divisor[:, None])
    q = torch.where(bad[:, None], 0.0, q)
    return bits, mbits, _pack_nibbles(q)


def dequantize_int4_asym(
    bits: torch.Tensor,
    mbits: torch.Tensor,
    packed: torch.Tensor,
    rows: int,
    cols: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``quantize_int4_asym`` -> ``[R, H]`` of ``out_dtype``."""
    q = _unpack_nibbles(packed, group_size)
    v = _dequantize_values(bits, q) + mbits.view(torch.float16).float()[:, None]
    return ungroup(_to_output(v, out_dtype), rows, cols)


def outlier_keys(x2d: torch.Tensor) -> torch.Tensor:
    """int32 ranking key of each value: the fp32 bits of ``|v|``, every NaN as one key above Inf's."""
    a = x2d.abs() if x2d.dtype == torch.float32 else x2d.float().abs_()  # one new tensor
    return a.view(torch.int32).clamp_max_(0x7F800001)  # NaN bits are all above Inf's


def _rank(key: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """A unique int64 per value that orders as (key, then the lower column first)."""
    return key.to(torch.int64).mul_(65536).add_(65535 - col)


def _exact_top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest keys per row, ties to the lower column, in that order: topk over
    ``_rank``. Exact on any device, without a host sync."""
    return _rank(key, torch.arange(key.shape[1], device=key.device)).topk(k, dim=1).indices


def select_outliers(x2d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(columns int64 [R, k], values as fp16 [R, k], the rows with those columns set to +0), by the rule in
    the module docstring. ``1 <= k <= H <= 65536``.

    On the host, ``topk`` over the int32 keys (~3x cheaper than the unique int64 key) picks the set unless
    a row's k-th and (k+1)-th keys tie (then the exact path runs); the k chosen are then put in order."""
    cols = x2d.shape[1]
    key = outlier_keys(x2d)
    if x2d.is_cuda:
        idx = _exact_top(key, k)
    else:
        top = key.topk(min(k + 1, cols), dim=1)
        if k < cols and bool((top.values[:, k - 1] == top.values[:, k]).any()):
            idx = _exact_top(key, k)  # a tie at the cut: which of the tied columns goes is the rule's
        else:
            idx = top.indices[:, :k]
            idx = idx.gather(1, _rank(top.values[:, :k], idx).argsort(dim=1, descending=True))
    vals = x2d.gather(1, idx).to(torch.float16)
    bits = vals.view(torch.int16).masked_fill(torch.isnan(vals), NAN16_BITS)
    # the rest as integers: every bit of the values not chosen is kept (a float scatter may rewrite NaNs)
    ints = x2d.contiguous().view(torch.int16 if x2d.element_size() == 2 else torch.int32)
    return idx, bits.view(torch.float16), ints.scatter(1, idx, 0).view(x2d.dtype)
