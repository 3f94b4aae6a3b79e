"""Time the one-kernel outlier encoder (``kernels/outlier_quant.py``) per ``num_warps`` against what it replaced.

On CUDA, for fp16 inputs ``[rows, hidden]`` (one decode row, 2048, 4096 and 8192 rows; k outliers, group 64):
the fused encode for each ``num_warps`` candidate, the default and ``top4`` (the first pass's picks four per
reduction; each checked bit for bit against the torch reference chain), the two-kernel chain it replaced (``outlier_select.select`` then the int4 encoder), the int4
encoder alone and a device-to-device copy, all with ``triton.testing.do_bench`` (median). Two inputs: random
rows with one massive channel (the top k almost always in distinct 8-value chunks: one pass) and clustered
rows (the top k in one chunk: every row takes the kernel's second pass).
On a CPU-only machine it runs under ``TRITON_INTERPRET=1`` on tiny inputs (a correctness smoke run).

Writes ``$OUT/outlier_quant_tune.json`` (else ``bench/out/``) and prints a markdown table.
Usage: PYTHONPATH=$PWD python3 bench/outlier_quant_tune.py [--hidden 4096] [--k 8] [--asym]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

WARPS = [2, 4, 8]
GS = 64


def _time_us(fn: Any, cuda: bool) -> float | None:
    if not cuda:
        fn()
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")) * 1e3


def _input(rows: int, hidden: int, clustered: bool, dev: str) -> torch.Tensor:
    x = torch.randn(rows, hidden, device=dev)
    x[:, 7] *= 40  # a massive channel, as in real activations
    if clustered:
        x[:, 16:24] = 30 + torch.arange(8, device=dev)  # the top k share a chunk
    return x.half()


def _measure(x: torch.Tensor, k: int, asym: bool, cuda: bool) -> dict[str, Any]:
    from hyperlane_lab.codecs import reference as ref
    from hyperlane_lab.codecs._kernels import kernel_module

    oq, sel, k4 = (kernel_module(m) for m in ("outlier_quant", "outlier_select", "quant_int4"))
    ka = kernel_module("quant_int4_asym")
    rows, hidden = x.shape
    n = rows * hidden // GS
    dev = x.device

    def buf(*shape: int, dtype: torch.dtype = torch.int16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=dev)

    scales, mins = buf(n), (buf(n) if asym else None)
    idx, vals, packed = buf(rows, k), buf(rows, k, dtype=torch.float16), buf(n * GS // 2, dtype=torch.uint8)
    r_idx, r_vals, rest = ref.select_outliers(x, k)
    want = ref.quantize_int4_asym(rest, GS) if asym else ref.quantize_int4(rest, GS, False)
    out: dict[str, Any] = {"rows": rows, "hidden": hidden, "k": k}
    for nw in [None, *WARPS]:
        oq.encode(x, k, GS, scales, mins, idx, vals, packed, num_warps=nw)
        got = (scales, mins, packed) if asym else (scales, packed)
        exact = (
            torch.equal(idx.to(torch.int64) & 0xFFFF, r_idx)
            and torch.equal(vals.view(torch.int16), r_vals.view(torch.int16))
            and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        )
        if not exact:
            raise SystemExit(f"num_warps={nw}: the fused encode differs from the reference ({out})")
        out["default" if nw is None else f"w{nw}"] = _time_us(
            lambda nw=nw: oq.encode(x, k, GS, scales, mins, idx, vals, packed, num_warps=nw), cuda
        )
    oq.encode(x, k, GS, scales, mins, idx, vals, packed, top4=True)
    if not torch.equal(packed, want[-1]) or not torch.equal(idx.to(torch.int64) & 0xFFFF, r_idx):
        raise SystemExit(f"top4: the fused encode differs from the reference ({out})")
    out["top4"] = _time_us(lambda: oq.encode(x, k, GS, scales, mins, idx, vals, packed, top4=True), cuda)
    rest_buf = torch.empty_like(x)

    def quant() -> None:
        if asym:
            ka.quantize(rest_buf, scales, mins, packed, GS)
        else:
            k4.quantize(rest_buf, scales, packed, GS)

    out["two_kernels"] = _time_us(lambda: (sel.select(x, k, idx, vals, rest_buf), quant()), cuda)
    out["int4_alone"] = _time_us(quant, cuda)
    out["copy"] = _time_us(lambda: rest_buf.copy_(x), cuda)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--asym", action="store_true", help="int4_outlier_asym's groups (else int4_outlier's)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev, hidden = ("cuda" if cuda else "cpu"), args.hidden if cuda else 256
    rows_list = [1, 2048, 4096, 8192] if cuda else [1, 3]
    rows_out = []
    for clustered in (False, True):
        for rows in rows_list:
            r = _measure(_input(rows, hidden, clustered, dev), args.k, args.asym, cuda)
            rows_out.append({"input": "clustered" if clustered else "random", **r})
    meta = {"gpu": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "asym": args.asym, "group_size": GS}  # fmt: skip
    out_dir = os.environ.get("OUT")
    name = "outlier_quant_tune" + ("_asym" if args.asym else "") + (".json" if cuda else "_cpu.json")
    path = Path(out_dir) / name if out_dir else Path(__file__).parent / "out" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    cols = ["default", *(f"w{w}" for w in WARPS), "top4", "two_kernels", "int4_alone", "copy"]
    codec = "int4_outlier_asym" if args.asym else "int4_outlier"
    print(f"# {codec} encode, k={args.k}, group {GS}, on {meta['gpu']} (µs, do_bench median)\n")
    print("| input | rows x hidden | " + " | ".join(cols) + " | fused % of copy |")
    print("|---|---|" + "---:|" * (len(cols) + 1))
    for r in rows_out:
        pct = "-"
        if r["copy"] is not None:  # bytes read + written, against the copy's 2 x input
            moved = r["rows"] * r["hidden"] * 2 * (1 + 0.25) + r["rows"] * r["hidden"] // GS * (
                4 if args.asym else 2
            )
            pct = f"{100 * moved / r['default'] / (2 * r['rows'] * r['hidden'] * 2 / r['copy']):.0f}%"
        print(
            f"| {r['input']} | {r['rows']} x {r['hidden']} | "
            + " | ".join("-" if r[c] is None else f"{r[c]:.1f}" for c in cols)
            + f" | {pct} |"
        )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
