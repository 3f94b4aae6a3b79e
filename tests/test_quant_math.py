"""The arithmetic shortcuts of the Triton encoders (``kernels/quant_common.py``), checked in torch on CPU.

The encoders divide each value by its group's fp16 scale ``s`` as ``q0 = v * r``, ``q = fma(v - q0 * s, r,
q0)`` with ``r = 1 / s`` rounded once per group, and skip the reference's clamp to [-qmax, qmax]. Both must
give exactly what ``hyperlane_lab.codecs.reference`` computes; here the fma is evaluated in float64, which is
exact for these operands (the product of two fp32 values is exact in float64, and the sum lies far from an
fp32 rounding midpoint, see the kernel module's docstring).
"""

from __future__ import annotations

import torch

from hyperlane_lab.codecs import reference as ref


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double() + c.double()).float()


def _kernel_quotient(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r = torch.ones_like(d) / d
    q0 = v * r
    return _fma32(_fma32(q0, -d, v), r, q0)


def _fp16_divisors(step: int) -> torch.Tensor:
    """Every ``step``-th positive finite fp16 value (subnormals included), as fp32."""
    return torch.arange(1, 0x7C00, step, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def test_quotient_equals_ieee_division_for_all_fp16_values() -> None:
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    v = every[torch.isfinite(every)]
    for d in _fp16_divisors(97):
        vv = v[v.abs() <= 128 * d]  # values of a group with this scale
        assert torch.equal(_kernel_quotient(vv, d.expand_as(vv)), vv / d), float(d)


def test_quotient_equals_ieee_division_near_ties() -> None:
    """fp32 values around (k + 1/2) * s, where a quotient off by one ulp would round the other way."""
    d = _fp16_divisors(13)[:, None]
    ties = (torch.arange(-255, 256, dtype=torch.float32) / 2)[None, :] * d
    bits = ties.view(torch.int32)
    v = torch.cat([(bits + k).view(torch.float32) for k in range(-3, 4)], dim=1)  # (0 - k: NaN bits)
    dd = d.expand_as(v)[torch.isfinite(v)]
    v = v[torch.isfinite(v)]
    q, want = _kernel_quotient(v, dd), v / dd
    big = want.abs() >= 2**-126  # smaller quotients round to 0 either way (checked below)
    assert torch.equal(q[big], want[big])
    assert torch.equal(torch.round(q), torch.round(want))


def test_groups_need_no_clamp() -> None:
    """In a good group |v / s| rounds to at most qmax, so the reference's clamp never changes a value.

    Random groups, and groups whose max is within a few ulps of qmax times an fp16 value (where the scale
    rounds down to that value or is bumped one fp16 ulp up).
    """
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4096, 64, generator=g) * torch.exp(2 * torch.randn(4096, 1, generator=g))
    s16 = _fp16_divisors(29)[:, None]
    for qmax in ref.QMAX.values():
        edge = (qmax * s16).view(torch.int32) + torch.arange(-4, 5, dtype=torch.int32)[None, :]
        edge = torch.cat([edge.view(torch.float32), -edge.view(torch.float32)], dim=1)
        edge = edge[(edge.abs() < 65504 * qmax).all(dim=1)]
        for v in (rand, edge):
            _, divisor, bad = ref.group_scales(v, qmax)
            assert not bad.any()
            q = torch.round(_kernel_quotient(v, divisor[:, None].expand_as(v)))
            assert q.abs().max() <= qmax
            assert torch.equal(q, torch.round(v / divisor[:, None]))
