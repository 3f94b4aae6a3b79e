"""Benchmark the activation codecs' Triton kernels.

On CUDA: for fp16 inputs of 8 KB .. 64 MB ([rows, 4096]), the bandwidth of each quantize / dequantize kernel
(bytes read + written per second) next to a device-to-device copy measured in the same run
(``torch.empty_like(x).copy_(x)``), the speed-up over the pure-torch reference path, and the latency of one
``codec.encode`` / ``codec.decode`` call at decode size (1 x 4096 fp16) including Python overhead.
On CPU: a tiny smoke run of the torch path (no Triton).

Writes ``bench/out/codec_kernels.json`` and prints a markdown table.
Usage: python bench/codec_kernels.py [--group-size 64] [--hidden 4096] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab import codecs
from hyperlane_lab.codecs.base import GroupLayout

KB, MB = 1 << 10, 1 << 20
CUDA_SIZES = [8 * KB, 64 * KB, 512 * KB, 4 * MB, 16 * MB, 32 * MB, 64 * MB]
CPU_SIZES = [8 * KB, 64 * KB]
QUANT = ["int8", "int4", "int4_hadamard", "int4_outlier", "int4_asym", "int4_outlier_asym"]


def _time_us(fn: Callable[[], object], device: str) -> float:
    """Median time of ``fn`` in µs: triton.testing.do_bench on CUDA, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3
    fn()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _wall_us(fn: Callable[[], object], device: str) -> float:
    """Host wall time per call of back-to-back calls (what a pipeline stage pays), incl. launch overhead."""
    n = 2000 if device == "cuda" else 100
    for _ in range(20):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _kernel_fns(
    name: str, x2d: torch.Tensor, gs: int, out: torch.Tensor | None = None
) -> tuple[Callable[[], object], Callable[[], object], int]:
    """(quantize-only, dequantize-only, payload bytes) with preallocated buffers: pure kernel cost."""
    from hyperlane_lab.codecs._kernels import kernel_module

    rows, cols = x2d.shape
    n = GroupLayout(rows, cols, gs).n_groups
    scales = torch.empty(n, dtype=torch.int16, device=x2d.device)
    out = torch.empty_like(x2d) if out is None else out  # the decoders' output
    if name == "int8":
        k8 = kernel_module("quant_int8")
        q8 = torch.empty(n * gs, dtype=torch.int8, device=x2d.device)
        k8.quantize(x2d, scales, q8, gs)
        return (
            (lambda: k8.quantize(x2d, scales, q8, gs)),
            (lambda: k8.dequantize(scales, q8, out, gs)),
            3 * n * gs,
        )
    if "outlier" in name:
        k = codecs.get(name, gs).payload_outliers((rows, cols))
        asym = name.endswith("_asym")
        idx = torch.empty((rows, k), dtype=torch.int16, device=x2d.device)
        vals = torch.empty((rows, k), dtype=torch.float16, device=x2d.device)
        oq = kernel_module("outlier_quant")
        if oq.applies(cols, gs, k, x2d):  # one kernel each way (kernels/outlier_quant.py)
            mins = torch.empty(n, dtype=torch.int16, device=x2d.device) if asym else None
            p = torch.empty(n * gs // 2, dtype=torch.uint8, device=x2d.device)
            oq.encode(x2d, k, gs, scales, mins, idx, vals, p)
            return (
                (lambda: oq.encode(x2d, k, gs, scales, mins, idx, vals, p)),
                (lambda: oq.decode(scales, mins, idx, vals, p, out, gs, k)),
                (4 if asym else 2) * n + n * gs // 2 + 4 * rows * k,
            )
        return _two_kernel_fns(name, x2d, gs, out)
    if name == "int4_asym":
        ka = kernel_module("quant_int4_asym")
        mins = torch.empty(n, dtype=torch.int16, device=x2d.device)
        pa = torch.empty(n * gs // 2, dtype=torch.uint8, device=x2d.device)
        ka.quantize(x2d, scales, mins, pa, gs)
        return (
            (lambda: ka.quantize(x2d, scales, mins, pa, gs)),
            (lambda: ka.dequantize(scales, mins, pa, out, gs)),
            4 * n + n * gs // 2,
        )
    k4 = kernel_module("quant_int4")
    had = name == "int4_hadamard"
    p = torch.empty(n * gs // 2, dtype=torch.uint8, device=x2d.device)
    k4.quantize(x2d, scales, p, gs, had)
    return (
        (lambda: k4.quantize(x2d, scales, p, gs, had)),
        (lambda: k4.dequantize(scales, p, out, gs, had)),
        2 * n + n * gs // 2,
    )


def _two_kernel_fns(
    name: str, x2d: torch.Tensor, gs: int, out: torch.Tensor | None = None
) -> tuple[Callable[[], object], Callable[[], object], int]:
    """An outlier codec as the selection kernel (kernels/outlier_select.py) then the int4 / int4_asym kernel;
    decode, then torch's scatter: the path for rows the one-kernel path does not take."""
    from hyperlane_lab.codecs._kernels import kernel_module

    rows = x2d.shape[0]
    k = codecs.get(name, gs).payload_outliers(tuple(x2d.shape))
    sel = kernel_module("outlier_select").select
    idx = torch.empty((rows, k), dtype=torch.int16, device=x2d.device)
    vals = torch.empty((rows, k), dtype=torch.float16, device=x2d.device)
    rest = torch.empty_like(x2d)
    out = torch.empty_like(x2d) if out is None else out
    q, d, nbytes = _kernel_fns(name.replace("_outlier", ""), rest, gs, out)
    sel(x2d, k, idx, vals, rest)
    idx64, v_out = idx.to(torch.int64) & 0xFFFF, vals.to(x2d.dtype)
    return (
        (lambda: (sel(x2d, k, idx, vals, rest), q())),
        (lambda: (d(), out.scatter_(1, idx64, v_out))),
        nbytes + 4 * rows * k,
    )


def _bench_codec(name: str, x: torch.Tensor, gs: int, device: str, copy_gbps: float) -> list[dict[str, Any]]:
    """Encode/decode timings of one codec on ``x`` for each implementation available on ``device``."""
    c = codecs.get(name, gs)
    in_bytes = x.numel() * 2
    payload_bytes = c.encoded_nbytes(tuple(x.shape))
    moved = in_bytes + payload_bytes  # read input + write payload (and the reverse for decode)
    entries: dict[tuple[str, str], float] = {}
    p_ref = c.encode(x, backend="torch", check_finite=False)
    entries[("encode", "torch")] = _time_us(lambda: c.encode(x, backend="torch", check_finite=False), device)
    entries[("decode", "torch")] = _time_us(lambda: c.decode(p_ref, backend="torch"), device)
    if device == "cuda":
        p_tri = c.encode(x, backend="triton", check_finite=False)
        entries[("encode", "triton")] = _time_us(
            lambda: c.encode(x, backend="triton", check_finite=False), device
        )
        entries[("decode", "triton")] = _time_us(lambda: c.decode(p_tri, backend="triton"), device)
        qfn, dfn, _ = _kernel_fns(name, x, gs)
        entries[("encode", "kernel")] = _time_us(qfn, device)
        entries[("decode", "kernel")] = _time_us(dfn, device)
        if "outlier" in name:  # the two-kernel chain the one-kernel path replaced, for comparison
            qfn, dfn, _ = _two_kernel_fns(name, x, gs)
            entries[("encode", "two_kernels")] = _time_us(qfn, device)
            entries[("decode", "two_kernels")] = _time_us(dfn, device)
    out = []
    for (op, impl), us in entries.items():
        gbps = moved / us / 1e3
        naive = entries.get((op, "torch"))
        out.append(
            dict(op=op, codec=name, impl=impl, size_bytes=in_bytes, shape=list(x.shape), us=us, gbps=gbps,
                 pct_copy=100 * gbps / copy_gbps, payload_bytes=payload_bytes,
                 speedup_vs_torch=(naive / us) if naive else None)
        )  # fmt: skip
    return out


def bench_sizes(
    device: str, gs: int, hidden: int, sizes: list[int], names: list[str] = QUANT
) -> list[dict[str, Any]]:
    rows_out: list[dict[str, Any]] = []
    for nbytes in sizes:
        rows = max(1, nbytes // (2 * hidden))
        x = torch.randn(rows, hidden, device=device, dtype=torch.float16)
        in_bytes = x.numel() * 2
        copy_us = _time_us(lambda x=x: torch.empty_like(x).copy_(x), device)
        copy_gbps = 2 * in_bytes / copy_us / 1e3
        rows_out.append(
            dict(op="copy", codec="-", impl="torch", size_bytes=in_bytes, shape=[rows, hidden],
                 us=copy_us, gbps=copy_gbps, pct_copy=100.0)
        )  # fmt: skip
        for name in names:
            rows_out += _bench_codec(name, x, gs, device, copy_gbps)
        del x
    return rows_out


def bench_decode_size(device: str, gs: int, hidden: int, names: list[str] = QUANT) -> list[dict[str, Any]]:
    """µs per API call for one token (1 x hidden fp16), including Python and launch overhead."""
    x = torch.randn(1, hidden, device=device, dtype=torch.float16)
    out: list[dict[str, Any]] = []
    impls = ["torch", "triton"] if device == "cuda" else ["torch"]
    for name in ["fp16", *names]:
        c = codecs.get(name, gs)
        for impl in impls:
            p = c.encode(x, backend=impl, check_finite=False)
            for check in [False, "defer", True]:
                out.append(
                    dict(op="encode", codec=name, impl=impl, check_finite=str(check),
                         wall_us=_wall_us(lambda c=c, impl=impl, check=check: c.encode(x, backend=impl,
                                                                                      check_finite=check), device))
                )  # fmt: skip
            out.append(
                dict(op="decode", codec=name, impl=impl, check_finite="-",
                     wall_us=_wall_us(lambda c=c, p=p, impl=impl: c.decode(p, backend=impl), device))
            )  # fmt: skip
    return out


def bench_decode_size_graph(
    gs: int, hidden: int, reps: int = 50, names: list[str] = QUANT
) -> list[dict[str, Any]]:
    """µs per kernel call at decode size (1 x hidden fp16) replayed from a CUDA graph: what a
    worker's wire-mode decode graph pays per hand-off (``models/decode_wire.py`` captures the
    quantize / dequantize kernels; no host launch cost). The input is hot in L2, as it is there
    (the previous kernel just wrote it). A device-to-device copy of the same tensor, timed the same
    way, is the baseline."""
    from hyperlane_lab.codecs._kernels import kernel_module

    graph_time_us = kernel_module("gemv").graph_time_us

    x = torch.randn(1, hidden, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(x)
    out = [dict(op="copy", codec="-", graph_us=statistics.median(
        graph_time_us(lambda: dst.copy_(x), reps) for _ in range(3)))]  # fmt: skip
    for name in names:
        qfn, dfn, _ = _kernel_fns(name, x, gs)
        for op, fn in (("encode", qfn), ("decode", dfn)):
            us = statistics.median(graph_time_us(fn, reps) for _ in range(3))
            out.append(dict(op=op, codec=name, graph_us=us))
    return out


def markdown(
    sizes: list[dict[str, Any]], small: list[dict[str, Any]], graph: list[dict[str, Any]] | None = None
) -> str:
    lines = [
        "| size | op | codec | impl | µs | GB/s (r+w) | % of copy | × vs torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sizes:
        sp = r.get("speedup_vs_torch")
        lines.append(
            f"| {r['size_bytes'] / KB:.0f} KB | {r['op']} | {r['codec']} | {r['impl']} | {r['us']:.1f} | "
            f"{r['gbps']:.1f} | {r['pct_copy']:.0f}% | {'' if sp is None else f'{sp:.1f}'} |"
        )
    lines += [
        "",
        "| decode-size call | codec | impl | check_finite | µs/call (wall) |",
        "|---|---|---|---|---|",
    ]
    for r in small:
        lines.append(f"| {r['op']} | {r['codec']} | {r['impl']} | {r['check_finite']} | {r['wall_us']:.1f} |")
    if graph:
        lines += ["", "| decode-size kernel in a CUDA graph | codec | µs/call |", "|---|---|---|"]
        lines += [f"| {r['op']} | {r['codec']} | {r['graph_us']:.2f} |" for r in graph]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "out" / "codec_kernels.json"
    )
    ap.add_argument("--codecs", default=",".join(QUANT), help="comma-separated codec names")
    args = ap.parse_args()
    names = args.codecs.split(",")
    for n in names:
        codecs.get(n)  # ValueError listing the valid names
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = CUDA_SIZES if device == "cuda" else CPU_SIZES
    size_rows = bench_sizes(device, args.group_size, args.hidden, sizes, names)
    small_rows = bench_decode_size(device, args.group_size, args.hidden, names)
    graph_rows = (
        bench_decode_size_graph(args.group_size, args.hidden, names=names) if device == "cuda" else []
    )
    meta: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, group_size=args.group_size, hidden=args.hidden,
        timer="triton.testing.do_bench median" if device == "cuda" else "perf_counter median",
    )  # fmt: skip
    if device == "cuda":
        import triton

        meta["triton"] = triton.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(meta=meta, sizes=size_rows, decode_size=small_rows, decode_size_graph=graph_rows), indent=1
        )
    )
    print(f"# codec kernels on {meta['device']} (group {args.group_size}, fp16 [rows, {args.hidden}])\n")
    print(markdown(size_rows, small_rows, graph_rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
