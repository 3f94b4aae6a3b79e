"""Tune the launch configuration of the activation encoders (the quantize kernels).

On CUDA: for int8, int4 (each packing strategy) and int4_hadamard, quantize fp16 ``[rows, hidden]`` inputs of
16, 32 and 64 MB and one decode-size row (1 x hidden) with every candidate configuration (values per program
x num_warps [x int4 packing]). Each candidate is timed with ``triton.testing.do_bench`` (median), its
bandwidth (bytes read + written per second) is compared with a device-to-device copy measured in the same
run (``torch.empty_like(x).copy_(x)``, 2 x bytes), and its output is checked bit for bit against the torch
reference (``hyperlane_lab.codecs.reference``). At decode size the host wall time per call (back-to-back
calls, launcher overhead included) is recorded too. ``int4_outlier`` runs the int4 kernel on the rows with
their outliers zeroed, so the int4 rows apply to it.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` on tiny inputs: a correctness smoke run
of every candidate (interpreter timings mean nothing).

Writes ``$OUT/codec_tune.json`` when ``$OUT`` is set, else ``bench/out/codec_tune.json``, and prints a
markdown table: the best configuration per codec and size next to the kernels' defaults.
Usage: PYTHONPATH=$PWD python3 bench/codec_tune.py [--group-size 64] [--hidden 4096] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MB = 1 << 20
# decode size first: if the time budget runs out, the large sizes lose candidates, not the latency goal's row
CUDA_SIZES = [("1 x H", 0), ("16 MB", 16 * MB), ("32 MB", 32 * MB), ("64 MB", 64 * MB)]  # 0: one row
CPU_SIZES = [("1 x H", 0), ("2 x H", -2)]  # -r: r rows
LARGE = [(2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]  # (values per program, num_warps)
SMALL = [(256, 1), (256, 2), (512, 1), (512, 2), (1024, 2), (1024, 4), (2048, 4)]
CODECS = ["int8", "int4", "int4_hadamard"]


def _packs(codec: str, small: bool) -> list[str | None]:
    if codec != "int4":
        return [None]
    return ["words", "split"] if small else ["words", "split", "strided"]


def _time_us(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _copy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).copy_(x)


def _wall_us(fn: Callable[[], object], n: int = 500) -> float:
    """Host time per call of back-to-back calls (what a pipeline stage pays), launch overhead included."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


class Case:
    """One codec on one input: output buffers, the reference bytes and a launcher per configuration."""

    def __init__(self, codec: str, x: torch.Tensor, gs: int) -> None:
        from hyperlane_lab.codecs import reference as ref
        from hyperlane_lab.codecs._kernels import kernel_module

        self.codec, self.x, self.gs = codec, x, gs
        n = x.shape[0] * -(-x.shape[1] // gs)
        self.scales = torch.empty(n, dtype=torch.int16, device=x.device)
        if codec == "int8":
            self.mod = kernel_module("quant_int8")
            self.q = torch.empty(n * gs, dtype=torch.int8, device=x.device)
            self.want = ref.quantize_int8(x, gs)
        else:
            self.mod = kernel_module("quant_int4")
            self.q = torch.empty(n * gs // 2, dtype=torch.uint8, device=x.device)
            self.want = ref.quantize_int4(x, gs, hadamard=codec == "int4_hadamard")
        self.moved = x.numel() * x.element_size() + 2 * n + self.q.numel()  # read input, write payload

    def launcher(self, tile: int | None, warps: int | None, pack: str | None) -> Callable[[], None]:
        x, s, q, gs, mod = self.x, self.scales, self.q, self.gs, self.mod
        if self.codec == "int8":
            return lambda: mod.quantize(x, s, q, gs, tile=tile, num_warps=warps)
        had = self.codec == "int4_hadamard"
        return lambda: mod.quantize(x, s, q, gs, had, tile=tile, num_warps=warps, pack=pack)

    def mismatches(self) -> int:
        """Bytes of the last launch's payload that differ from the reference."""
        bits, vals = self.want
        return int((self.scales != bits).sum()) + int((self.q != vals).sum())


def _default(case: Case) -> tuple[int, int, str | None]:
    """The configuration the launcher picks when given none (tile, num_warps, pack)."""
    from hyperlane_lab.codecs._kernels import kernel_module

    common = kernel_module("quant_common")
    n = case.scales.numel()
    block, gp, warps = common.launch_config(case.gs, n)
    pack = kernel_module("quant_int4").DEFAULT_PACK if case.codec == "int4" else None
    return block * gp, warps, pack


def tune(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    from hyperlane_lab.codecs._kernels import kernel_module

    device = "cuda" if cuda else "cpu"
    t_start = time.perf_counter()
    copies: list[dict[str, Any]] = []
    rows_out: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    skipped = 0
    small_below = kernel_module("quant_common").ENC_SMALL_ELEMS
    for label, nbytes in CUDA_SIZES if cuda else CPU_SIZES:
        rows = max(1, nbytes // (2 * args.hidden)) if nbytes > 0 else max(1, -nbytes)
        g = torch.Generator(device).manual_seed(rows)
        x = torch.randn(rows, args.hidden, device=device, generator=g)
        x = (x * torch.exp(torch.randn(rows, 1, device=device, generator=g))).to(torch.float16)  # row spread
        size = label.replace("H", str(args.hidden))
        small = rows * args.hidden <= small_below  # the launcher's own small/large split
        copy_us = _time_us(functools.partial(_copy, x), cuda)
        copy_gbps = 2 * x.numel() * 2 / copy_us / 1e3
        copies.append(dict(size=size, shape=[rows, args.hidden], us=copy_us, gbps=copy_gbps))
        for codec in args.codecs.split(","):
            case = Case(codec, x, args.group_size)
            default = _default(case)
            grid = [(t, w, p) for t, w in (SMALL if small else LARGE) for p in _packs(codec, small)]
            if default not in grid:
                grid.append(default)
            for tile, warps, pack in grid:
                if time.perf_counter() - t_start > args.budget_s:
                    skipped += 1
                    continue
                fn = case.launcher(tile, warps, pack)
                try:
                    fn()  # compile + the output checked below
                    if cuda:
                        torch.cuda.synchronize()
                except Exception as exc:  # e.g. out of resources: record it, keep tuning the others
                    errors.append(dict(codec=codec, size=size, tile=tile, num_warps=warps, pack=pack,
                                       error=f"{type(exc).__name__}: {exc}"[:500]))  # fmt: skip
                    continue
                bad = case.mismatches()
                us = _time_us(fn, cuda)
                gbps = case.moved / us / 1e3
                row = dict(codec=codec, size=size, shape=[rows, args.hidden], tile=tile, num_warps=warps,
                           pack=pack, default=(tile, warps, pack) == default, us=us, gbps=gbps,
                           pct_copy=100 * gbps / copy_gbps, bytes_moved=case.moved, match=bad == 0,
                           mismatched_bytes=bad)  # fmt: skip
                if cuda and small:
                    row["wall_us"] = _wall_us(fn)
                rows_out.append(row)
            del case
        del x
    return dict(copy=copies, candidates=rows_out, errors=errors, skipped_over_budget=skipped)


def api_decode_size(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``codec.encode`` at decode size with the default launch (CUDA): GPU µs (do_bench) and host µs/call."""
    from hyperlane_lab import codecs

    x = torch.randn(1, args.hidden, device="cuda", dtype=torch.float16)
    out = []
    for name in [*CODECS, "int4_outlier"]:
        c = codecs.get(name, args.group_size)
        for check in (False, "defer"):

            def fn(c: Any = c, check: Any = check) -> object:
                return c.encode(x, backend="triton", check_finite=check)

            out.append(dict(codec=name, check_finite=str(check), us=_time_us(fn, True), wall_us=_wall_us(fn)))
    return out


def best_rows(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (codec, size): the fastest candidate whose output matched, with the default's numbers beside it."""
    out = []
    keys = dict.fromkeys((r["codec"], r["size"]) for r in cands)
    for codec, size in keys:
        mine = [r for r in cands if r["codec"] == codec and r["size"] == size]
        ok = [r for r in mine if r["match"]]
        dflt = next((r for r in mine if r["default"]), None)
        if not ok:
            out.append(dict(codec=codec, size=size, best=None, mismatching=len(mine)))
            continue
        b = min(ok, key=lambda r: r["us"])
        out.append(
            dict(codec=codec, size=size, tile=b["tile"], num_warps=b["num_warps"], pack=b["pack"], us=b["us"],
                 pct_copy=b["pct_copy"], wall_us=b.get("wall_us"), default_us=dflt and dflt["us"],
                 default_pct_copy=dflt and dflt["pct_copy"], default_wall_us=dflt and dflt.get("wall_us"),
                 mismatching=len(mine) - len(ok))
        )  # fmt: skip
    return out


def _cfg(r: dict[str, Any]) -> str:
    return f"{r['tile']} x {r['num_warps']}w" + (f" {r['pack']}" if r.get("pack") else "")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| codec | size | best config | µs | % of copy | host µs/call | default µs | default % | bad |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in result["best"]:
        if r.get("us") is None:
            lines.append(f"| {r['codec']} | {r['size']} | no candidate matched the reference | | | | | | "
                         f"{r['mismatching']} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['codec']} | {r['size']} | {_cfg(r)} | {r['us']:.1f} | {r['pct_copy']:.0f}% | "
            f"{f(r['wall_us'], '.1f')} | {f(r['default_us'], '.1f')} | {f(r['default_pct_copy'], '.0f')}% | "
            f"{r['mismatching']} |"
        )
    lines.append("")
    lines += [f"copy {c['size']}: {c['us']:.1f} µs, {c['gbps']:.0f} GB/s" for c in result["copy"]]
    if result["api_decode_size"]:
        lines += ["", "| codec.encode at decode size | check_finite | GPU µs (do_bench) | host µs/call |",
                  "|---|---|---:|---:|"]  # fmt: skip
        lines += [f"| {r['codec']} | {r['check_finite']} | {r['us']:.1f} | {r['wall_us']:.1f} |"
                  for r in result["api_decode_size"]]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop timing new candidates after this")
    ap.add_argument(
        "--codecs",
        default=",".join(CODECS),
        help=f"comma-separated, of {CODECS}: the encoders tuned (the codec.encode decode-size table keeps them all)",
    )
    args = ap.parse_args()
    bad = sorted(set(args.codecs.split(",")) - set(CODECS))
    if bad:
        ap.error(f"unknown codec(s) {bad}; valid: {CODECS}")
    cuda = torch.cuda.is_available()
    if not cuda:
        # must be set before the kernel modules are imported (lazily, by Case): @triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
        print("no CUDA device: correctness smoke run of every candidate under TRITON_INTERPRET=1 "
              "(tiny inputs; the timings are interpreter times)\n")  # fmt: skip
    try:
        import triton
    except ImportError:
        print("codec_tune: Triton is not installed; nothing to tune (pip install triton)")
        return 0
    result = tune(args, cuda)
    result["best"] = best_rows(result["candidates"])
    result["api_decode_size"] = api_decode_size(args) if cuda else []
    from hyperlane_lab.codecs._kernels import kernel_module

    common = kernel_module("quant_common")
    result["meta"] = dict(
        device=torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'cpu'} (interpreter)",
        torch=torch.__version__, triton=triton.__version__, group_size=args.group_size, hidden=args.hidden,
        timer="triton.testing.do_bench median" if cuda else "perf_counter (interpreter)",
        defaults=dict(large=[common.ENC_TILE, common.ENC_WARPS],
                      small=[common.ENC_SMALL_TILE, common.ENC_SMALL_WARPS],
                      small_below_values=common.ENC_SMALL_ELEMS,
                      int4_pack=kernel_module("quant_int4").DEFAULT_PACK),
        note="int4_outlier runs the int4 kernel: the int4 rows apply to it",
    )  # fmt: skip
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "codec_tune.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"# encoder launch tuning on {result['meta']['device']} (group {args.group_size}, fp16)\n")
    print(markdown(result))
    if result["skipped_over_budget"]:
        print(f"\n{result['skipped_over_budget']} candidates skipped: over the {args.budget_s:.0f} s budget")
    for e in result["errors"]:
        print(f"error: {e['codec']} {e['size']} {_cfg(e)}: {e['error']}")
    bad = sum(1 for r in result["candidates"] if not r["match"])
    print(
        f"\n{bad} candidate(s) differ from the torch reference"
        if bad
        else "\nall candidates match the reference"
    )
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
