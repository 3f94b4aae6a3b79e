"""How fast could the int4 encoder be? Stripped-down kernels with its memory pattern, next to it and a copy.

The int4 encoder (``kernels/quant_int4.py``, word loads) reads a 16-bit tensor as int32 words, one group
of 64 values per row of a ``[GP, 32]`` tile, and writes half a byte per value plus one fp16 scale per
group. On an H200 it reaches 78-83% of a device-to-device copy's bandwidth at 16-64 MB (goal: 85%). This
script times, in one run, on the same inputs (fp16 ``[rows, 4096]``, group 64):

- ``copy``: ``torch.empty_like(x).copy_(x)`` (the goal's reference);
- ``move``: the encoder's loads and stores with no arithmetic: each output byte takes a nibble of each
  half of one word, each scale the first half-word of its group (the memory pattern alone);
- ``absmax``: ``move`` plus the per-group max of |x| as the scale (the reduction, no quantization);
- ``lite``: an int4 encoder with less arithmetic than the real one's rule (scale = absmax / 7 rounded to
  fp16, ``round(v * 7 / absmax)`` without the exact-division correction, no NaN handling): what a cheaper
  rounding rule could give, not a codec;
- ``int4``: the real encoder (``quantize``, default launch), checked bit for bit against the torch
  reference.

If ``move`` is near the copy and ``int4`` is not, the encoder's arithmetic is what costs; if ``move`` is
no faster than ``int4``, the memory pattern is the bound. Times: ``triton.testing.do_bench`` medians,
each tile size x warps listed. Writes JSON (``--out``) and prints a table. CUDA only.
Usage: PYTHONPATH=$PWD python3 bench/encoder_floor.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

MB = 1 << 20
SIZES = [16 * MB, 32 * MB, 64 * MB]
CONFIGS = [(4096, 4), (2048, 4), (8192, 8)]  # (values per program, num_warps)
HIDDEN, GS = 4096, 64


def _kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def floor_kernel(x_ptr, s_ptr, p_ptr, GP: tl.constexpr, MODE: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
        k = tl.arange(0, 32)
        w = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + g[:, None] * 32 + k[None, :])
        # "lite": fp32 halves, scale = absmax / 7, q = round(v * (7 / absmax)) (no exact division)
        if MODE == 2:
            lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            amax = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=1)
            r = tl.where(amax > 0, 7.0 / amax, 0.0)[:, None]
            qlo = ((lo * r + 12582920.0).to(tl.int32, bitcast=True)) & 0xF  # + 1.5 * 2**23 + 8: q + 8
            qhi = ((hi * r + 12582920.0).to(tl.int32, bitcast=True)) & 0xF
            packed = (qlo | (qhi << 4)).to(tl.uint8)
            s = (amax * (1.0 / 7.0)).to(tl.float16).to(tl.int16, bitcast=True)
        else:
            packed = ((w & 0xF) | ((w >> 12) & 0xF0)).to(tl.uint8)
            if MODE == 1:  # absmax of the 16-bit patterns (the reduction, no arithmetic)
                s = tl.max(tl.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF), axis=1).to(tl.int16)
            else:
                s = tl.sum(tl.where(k[None, :] == 0, w, 0), axis=1).to(tl.int16)
        tl.store(p_ptr + g[:, None] * 32 + k[None, :], packed)
        tl.store(s_ptr + g, s)

    return floor_kernel


def _t_us(fn: Any) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3


def _one_size(nbytes: int, floor_kernel: Any) -> list[dict[str, Any]]:
    from hyperlane_lab.codecs import reference as ref
    from hyperlane_lab.codecs._kernels import kernel_module

    q4 = kernel_module("quant_int4")
    rows = nbytes // (2 * HIDDEN)
    g = torch.Generator("cuda").manual_seed(rows)
    x = torch.randn(rows, HIDDEN, device="cuda", generator=g).to(torch.float16)
    n = rows * HIDDEN // GS
    scales = torch.empty(n, dtype=torch.int16, device="cuda")
    packed = torch.empty(n * GS // 2, dtype=torch.uint8, device="cuda")
    moved = x.numel() * 2 + 2 * n + packed.numel()
    copy_us = _t_us(lambda: torch.empty_like(x).copy_(x))
    copy_gbps = 2 * x.numel() * 2 / copy_us / 1e3
    out = [dict(size_mb=nbytes // MB, kind="copy", us=copy_us, gbps=copy_gbps, pct_copy=100.0)]

    def row(kind: str, us: float, tile: int | None, warps: int | None, **kw: Any) -> None:
        gbps = moved / us / 1e3
        out.append(dict(size_mb=nbytes // MB, kind=kind, tile=tile, num_warps=warps, us=us, gbps=gbps,
                        pct_copy=100 * gbps / copy_gbps, copy_us=copy_us, **kw))  # fmt: skip

    want = ref.quantize_int4(x, GS)
    q4.quantize(x, scales, packed, GS)
    ok = bool(torch.equal(scales, want[0]) and torch.equal(packed, want[1]))
    row("int4", _t_us(lambda: q4.quantize(x, scales, packed, GS)), None, None, matches_reference=ok)
    for tile, warps in CONFIGS:
        gp = tile // GS
        for mode, kind in enumerate(("move", "absmax", "lite")):

            def fn(gp: int = gp, mode: int = mode, warps: int = warps) -> None:
                floor_kernel[(n // gp,)](x, scales, packed, GP=gp, MODE=mode, num_warps=warps)

            row(kind, _t_us(fn), tile, warps)

        def enc(tile: int = tile, warps: int = warps) -> None:
            q4.quantize(x, scales, packed, GS, tile=tile, num_warps=warps)

        row("int4", _t_us(enc), tile, warps)
    return out


def run() -> dict[str, Any]:
    floor_kernel = _kernels()
    rows_out = [r for nbytes in SIZES for r in _one_size(nbytes, floor_kernel)]
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows_out)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| size | kernel | tile x warps | µs | % of copy |", "|---|---|---|---:|---:|"]
    for r in result["rows"]:
        cfg = f"{r['tile']} x {r['num_warps']}w" if r.get("tile") else "default"
        cfg = "" if r["kind"] == "copy" else cfg
        ok = " (bits differ!)" if r.get("matches_reference") is False else ""
        lines.append(
            f"| {r['size_mb']} MB | {r['kind']}{ok} | {cfg} | {r['us']:.2f} | {r['pct_copy']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "out" / "encoder_floor.json"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("encoder_floor: needs a CUDA GPU (nothing to time here)")
        return 0
    result = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"# int4 encoder floor on {result['device']}\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
