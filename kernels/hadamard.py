"""Walsh-Hadamard rotation of each quantization group (the ``int4_hadamard`` codec).

``wht_groups`` is a ``@triton.jit`` helper used inside the int4 kernels; ``rotate`` is a standalone launcher
(kernel -> launcher) used to test the helper. Torch reference: ``hyperlane_lab.codecs.reference.hadamard_rows``
(same butterfly order, same fp32 operations: bitwise equal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.codecs.reference import inv_sqrt_f32
from hyperlane_lab.kernels.quant_common import check_launch

__all__ = ["rotate", "wht_groups"]


@triton.jit
def wht_groups(v, GP: tl.constexpr, GS: tl.constexpr, LOG2_GS: tl.constexpr, INV_SQRT: tl.constexpr):
    """Orthonormal WHT of each row of fp32 ``v [GP, GS]`` (GS a power of two).

    Stage i (h = 2**i): view a row as [GS / 2h, 2, h]; (a, b) = the two halves; -> (a + b, a - b).
    """
    for i in tl.static_range(LOG2_GS):
        v4 = tl.reshape(v, [GP, GS // (2 << i), 2, 1 << i])
        v4 = tl.permute(v4, [0, 1, 3, 2])  # put the (a, b) pair axis last for split/join
        a, b = tl.split(v4)
        v4 = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
        v = tl.reshape(v4, [GP, GS])
    return v * INV_SQRT


@triton.jit
def _rotate_kernel(
    x_ptr, y_ptr, n_rows, GS: tl.constexpr, GP: tl.constexpr, LOG2_GS: tl.constexpr, INV_SQRT: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)  # [GP] rows
    j = tl.arange(0, GS)
    m = (r < n_rows)[:, None]
    offs = r[:, None] * GS + j[None, :]
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + offs, wht_groups(v, GP, GS, LOG2_GS, INV_SQRT), mask=m)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal WHT of each row of a contiguous fp32 ``[N, gs]`` tensor (gs a power of two, 2..4096)."""
    check_launch(x, "rotate input", (torch.float32,))
    if x.dim() != 2:
        raise ValueError(f"rotate takes [N, group_size], got shape {tuple(x.shape)}")
    n, gs = x.shape
    if gs < 2 or gs > 4096 or gs & (gs - 1):
        raise ValueError(f"Hadamard group size must be a power of two in [2, 4096], got {gs}")
    y = torch.empty_like(x)
    if n == 0:
        return y
    gp = max(1, 2048 // gs)
    grid = (triton.cdiv(n, gp),)
    _rotate_kernel[grid](
        x, y, n, GS=gs, GP=gp, LOG2_GS=gs.bit_length() - 1, INV_SQRT=inv_sqrt_f32(gs), enable_fp_fusion=False
    )
    return y
