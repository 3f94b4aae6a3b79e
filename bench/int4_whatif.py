"""What-if 4-bit codecs in plain torch (issue 6): how far the 1% perplexity goal is from int4 on the bundled model.

The registered int4 is symmetric per group (levels -7..7 times absmax / 7, one fp16 scale). This
compares, through the same probe as ``bench/codec_probe.py`` (bundled model, 3 stages, fp32, every
boundary compressed, the 24 stories sampled from the model):

- ``sym4``: the registered int4's rule (symmetric, absmax / 7) re-implemented here (a check
  that this harness reproduces the codec's figures; its rounding of exact ties differs);
- ``asym4``: asymmetric per group: 16 levels between the group's min and max (fp16 scale and
  fp16 minimum: one more fp16 per group), which suits groups pushed to one side by a large
  channel.

Each at group sizes 16, 32 and 64 (``--bits 8``: the same two rules at 8 bits, for int8's top-1
goal); bytes are counted as the wire would carry them. ``--outliers 1,2,4,8`` adds ``sym<bits>_out<k>``:
the symmetric rule after the row's k largest-magnitude values are taken out and sent as fp16 (index + value,
4 bytes each), as int4_outlier does for int4. Prints the
whole-model and per-boundary rows and writes JSON to bench/out/int4_whatif.json (or --out).

    python bench/int4_whatif.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.probes import load_pipeline, probe_grid


def _groups(x: torch.Tensor, gs: int) -> tuple[torch.Tensor, int, int]:
    h = x.shape[-1]
    pad = (-h) % gs
    v = torch.nn.functional.pad(x.float().reshape(-1, h), (0, pad)).reshape(-1, gs)
    return v, h, pad


def _back(v: torch.Tensor, x: torch.Tensor, h: int, pad: int) -> torch.Tensor:
    return v.reshape(-1, h + pad)[:, :h].reshape(x.shape).to(x.dtype)


def sym(bits: int) -> Any:
    """Symmetric per group: levels -q..q times absmax / q, q = 2^(bits-1) - 1 (the registered rule)."""
    q = (1 << (bits - 1)) - 1

    def fn(x: torch.Tensor, gs: int) -> torch.Tensor:
        v, h, pad = _groups(x, gs)
        scale = (v.abs().amax(1, keepdim=True) / q).half().float().clamp_min(1e-12)
        return _back(torch.round(v / scale).clamp(-q, q) * scale, x, h, pad)

    return fn


def asym(bits: int) -> Any:
    """Asymmetric per group: 2^bits levels between the group's min and max (fp16 scale and min)."""
    top = (1 << bits) - 1

    def fn(x: torch.Tensor, gs: int) -> torch.Tensor:
        v, h, pad = _groups(x, gs)
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        scale = ((hi - lo) / top).half().float().clamp_min(1e-12)
        lo = lo.half().float()
        return _back(torch.round((v - lo) / scale).clamp(0, top) * scale + lo, x, h, pad)

    return fn


def sym_outliers(bits: int, k: int) -> Any:
    """``sym(bits)`` on each row with its k largest |values| zeroed, those k put back as fp16 afterwards."""
    base = sym(bits)

    def fn(x: torch.Tensor, gs: int) -> torch.Tensor:
        h = x.shape[-1]
        flat = x.float().reshape(-1, h)
        idx = flat.abs().topk(k, dim=1).indices
        vals = flat.gather(1, idx).half().float()
        q = base(flat.scatter(1, idx, 0.0), gs).float()
        return q.scatter(1, idx, vals).reshape(x.shape).to(x.dtype)

    return fn


class WhatIf:
    """The probe's codec interface for a torch round trip (encode = quantize + dequantize)."""

    def __init__(
        self, name: str, group_size: int, fn: Any, side_bytes: int, bits: int = 4, outliers: int = 0
    ) -> None:
        self.name, self.group_size, self.fn, self.side_bytes, self.bits = (
            name,
            group_size,
            fn,
            side_bytes,
            bits,
        )
        self.outliers = outliers  # fp16 values sent aside per row (2-byte index + 2-byte value each)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.group_size)

    def decode(self, t: torch.Tensor, device: Any = None) -> torch.Tensor:
        return t

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: Any = torch.float16) -> int:
        rows, h = math.prod(shape[:-1]), shape[-1]
        groups = -(-h // self.group_size)
        return rows * (groups * (self.group_size * self.bits // 8 + self.side_bytes) + 4 * self.outliers)

    def payload_outliers(self, shape: tuple[int, ...]) -> int:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", default="16,32,64")
    ap.add_argument(
        "--bits", default="4", help="4, 8 or 4,8 (int8's top-1 goal: the same question at 8 bits)"
    )
    ap.add_argument("--outliers", default="", help="k values per row sent as fp16 aside, e.g. 1,2,4,8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "int4_whatif.json"))
    args = ap.parse_args()
    from codec_probe import sampled_prompts  # type: ignore[import-not-found]  # bench/ is on sys.path

    pipe = load_pipeline(None, n_stages=3)
    prompts = sampled_prompts(pipe)
    cands = []
    for bits in (int(b) for b in args.bits.split(",")):
        for gs in (int(g) for g in args.group_sizes.split(",")):
            cands += [
                WhatIf(f"sym{bits}/{gs}", gs, sym(bits), 2, bits),
                WhatIf(f"asym{bits}/{gs}", gs, asym(bits), 4, bits),
            ]
            for k in (int(n) for n in args.outliers.split(",") if n):
                cands.append(WhatIf(f"sym{bits}_out{k}/{gs}", gs, sym_outliers(bits, k), 2, bits, k))
    df = probe_grid(cands, [0], model=pipe, prompts=prompts)
    cols = ["codec", "boundary", "ratio_vs_fp16", "rel_l2", "top1_agreement", "ppl_delta_rel"]
    print(df[cols].to_string(index=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(df[cols].to_dict(orient="records"), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
