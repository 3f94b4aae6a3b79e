"""Time the outlier selection kernel (``kernels/outlier_select.py``) per ``num_warps``, next to the int4 encoder.

On CUDA: for fp16 and fp32 inputs ``[rows, hidden]`` (one decode row, 2048 and 8192 rows), ``select`` with
``k`` outliers a row is timed with ``triton.testing.do_bench`` (median) for each ``num_warps`` candidate and
the launcher's default; every candidate's output is checked bit for bit against the torch reference
(``codecs.reference.select_outliers``). The symmetric int4 encoder on the same input is timed in the same run
(the outlier codecs run it after the selection), so the table says what the selection adds to an encode.
On a CPU-only machine the kernel runs under ``TRITON_INTERPRET=1`` on tiny inputs (a correctness smoke run).

Writes ``$OUT/outlier_select_tune.json`` when ``$OUT`` is set, else ``bench/out/outlier_select_tune.json``,
and prints a markdown table.
Usage: PYTHONPATH=$PWD python3 bench/outlier_select_tune.py [--hidden 4096] [--k 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

WARPS = [1, 2, 4, 8, 16]


def _time_us(fn: Any, cuda: bool) -> float | None:
    if not cuda:  # the interpreter: a smoke run, no timing (None in the JSON, "-" in the table)
        fn()
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3


def _input(rows: int, hidden: int, dtype: torch.dtype, dev: str) -> torch.Tensor:
    x = torch.randn(rows, hidden, device=dev).to(dtype)
    x[:, 7] *= 40  # a massive channel, as in real activations
    return x


def _measure(sel: Any, k4: Any, x: torch.Tensor, k: int, cuda: bool) -> dict[str, Any]:
    """One input: every num_warps candidate checked against the reference and timed; the int4 encode."""
    from hyperlane_lab.codecs import reference as ref
    from hyperlane_lab.codecs.base import GroupLayout

    rows, hidden = x.shape
    want = [t.cpu() for t in ref.select_outliers(x, k)]
    idx = torch.empty((rows, k), dtype=torch.int16, device=x.device)
    vals = torch.empty((rows, k), dtype=torch.float16, device=x.device)
    rest = torch.empty_like(x)
    row: dict[str, Any] = {"dtype": str(x.dtype).split(".")[1], "rows": rows, "hidden": hidden, "k": k}
    for nw in [None, *WARPS]:
        sel(x, k, idx, vals, rest, num_warps=nw)
        ints = torch.int16 if x.element_size() == 2 else torch.int32
        exact = (
            torch.equal((idx.to(torch.int64) & 0xFFFF).cpu(), want[0].to(torch.int64))
            and torch.equal(vals.cpu().view(torch.int16), want[1].view(torch.int16))
            and torch.equal(rest.cpu().view(ints), want[2].view(ints))  # bits: -0 and NaN payloads count
        )
        if not exact:
            raise SystemExit(f"num_warps={nw}: selection differs from the reference ({row})")
        row["default" if nw is None else f"w{nw}"] = _time_us(
            lambda nw=nw: sel(x, k, idx, vals, rest, num_warps=nw), cuda
        )
    n = GroupLayout(rows, hidden, 64).n_groups
    scales = torch.empty(n, dtype=torch.int16, device=x.device)
    packed = torch.empty(n * 32, dtype=torch.uint8, device=x.device)
    row["int4_encode"] = _time_us(lambda: k4.quantize(rest, scales, packed, 64, False), cuda)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from hyperlane_lab.codecs._kernels import kernel_module

    sel, k4 = kernel_module("outlier_select").select, kernel_module("quant_int4")
    dev, hidden, k = ("cuda" if cuda else "cpu"), args.hidden if cuda else 256, args.k
    rows_list = [1, 2048, 8192] if cuda else [1, 3]
    rows_out = [
        _measure(sel, k4, _input(rows, hidden, dtype, dev), k, cuda)
        for dtype in (torch.float16, torch.float32)
        for rows in rows_list
    ]
    meta = {"gpu": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__}  # fmt: skip
    out_dir = os.environ.get("OUT")
    path = (
        Path(out_dir) / "outlier_select_tune.json"
        if out_dir
        else Path(__file__).parent
        / "out"
        / ("outlier_select_tune.json" if cuda else "outlier_select_tune_cpu.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    cols = ["default", *(f"w{w}" for w in WARPS), "int4_encode"]
    print(f"# outlier selection, k={k}, on {meta['gpu']} (µs, do_bench median)\n")
    print("| dtype | rows x hidden | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for r in rows_out:
        print(
            f"| {r['dtype']} | {r['rows']} x {r['hidden']} | "
            + " | ".join("-" if r[c] is None else f"{r[c]:.1f}" for c in cols)
            + " |"
        )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
