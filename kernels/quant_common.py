"""Shared pieces of the quantization kernels: ``@triton.jit`` helpers (group scales, rounding, output clamp)
and launcher checks. Imports Triton at module import: import this module lazily (the codecs do).

Every helper mirrors a step of the torch reference ``hyperlane_lab.codecs.reference`` with the same fp32
operations in the same order, so results are bitwise equal:

- divisions use ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's plain ``/`` may be approximate);
- round-half-to-even is ``(v + 1.5 * 2**23) - 1.5 * 2**23`` in fp32, exact for ``|v| < 2**22``
  (libdevice ``rint`` does not run under ``TRITON_INTERPRET=1``);
- clamps are written with ``tl.where`` so that NaN passes through as in ``torch.where``;
- fp32 -> bf16 output rounding is done with integer ops (``bf16_bits``): the interpreter's cast truncates.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "ACT_DTYPES",
    "INTERPRET",
    "OUT_MAX",
    "TILE_ELEMS",
    "bf16_bits",
    "check_launch",
    "clamp_where",
    "group_scales",
    "launch_shape",
    "output_view",
    "quantize_values",
    "round_half_even",
    "store_output",
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
TILE_ELEMS = 2048  # values handled by one program (groups_per_program * padded group size)


@triton.jit
def round_half_even(v):
    """fp32 round-half-to-even for |v| < 2**22 (torch.round)."""
    return (v + 12582912.0) - 12582912.0


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
def group_scales(v, QMAX: tl.constexpr):
    """``v [GP, B]`` fp32 (masked lanes hold 0) -> (scale bits int16 [GP], divisor fp32 [GP], bad [GP]).

    Reference: ``hyperlane_lab.codecs.reference.group_scales``.
    """
    absv = tl.abs(v)
    finite = absv <= 3.4028234663852886e38  # False for NaN and +-Inf
    nonfinite = tl.max(tl.where(finite, 0, 1), axis=1)
    absmax = tl.max(tl.where(finite, absv, 0.0), axis=1)
    s32 = tl.math.div_rn(absmax, tl.zeros_like(absmax) + QMAX)
    s16 = s32.to(tl.float16)
    bits = s16.to(tl.int16, bitcast=True)
    bits = tl.where(s16.to(tl.float32) < s32, bits + 1, bits).to(tl.int16)  # smallest fp16 >= s32
    bad = (nonfinite > 0) | (bits >= 0x7C00)
    bits = tl.where(bad, 0x7E00, bits).to(tl.int16)  # fp16 NaN marks a bad group
    scale = bits.to(tl.float16, bitcast=True).to(tl.float32)
    divisor = tl.where(bad | (bits == 0), 1.0, scale)
    return bits, divisor, bad


@triton.jit
def quantize_values(v, divisor, bad, QMAX: tl.constexpr):
    """``round_half_even(v / divisor)`` clamped to [-QMAX, QMAX]; 0 in bad groups. fp32 [GP, B]."""
    q = round_half_even(tl.math.div_rn(v, divisor[:, None]))
    q = clamp_where(q, QMAX * 1.0)
    return tl.where(bad[:, None], 0.0, q)


def launch_shape(group_size: int) -> tuple[int, int]:
    """(padded group size BLOCK, groups per program GP); both powers of two."""
    block = triton.next_power_of_2(group_size)
    return block, max(1, TILE_ELEMS // block)


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
