"""Does programmatic dependent launch (PDL) shorten a decode step's chain of GEMVs? (issue 9, one GPU)

A batch-1 decode step on one H200 runs at 78.5-79% of the weight-read roofline (goal 81%, i.e. ~115 µs of a
~3.98 ms Llama-2-7B step). Inside the step's CUDA graph every kernel waits for the previous one to finish, then
launches, ramps up and drains: a fixed cost of a few µs per kernel against a 4096 x 4096 GEMV's ~8 µs of weight
reads. On Hopper (sm_90) a kernel launched with PDL may start while its predecessor still runs: its programs
become resident, can read what does not depend on the predecessor (the weights), and wait in ``griddepcontrol.wait``
for the predecessor's writes before reading its output. This script measures what that is worth on the card at hand
on a bare GEMV of its own (no fused norm / SwiGLU, and a switch to skip the wait for the negative control below);
the engine's GEMV (``kernels/gemv.py``, ``HYPERLANE_PDL`` / ``HYPERLANE_PDL_PREFETCH``) is measured in the pipeline
by ``bench/gpu_pipeline.py --variants graph_compile,graph_compile_pdl,...``.

The chain: Llama-2-7B's four decode products per layer (``wqkv`` 12288 x 4096, ``wo`` 4096 x 4096 plus a residual,
``w_gate_up`` 22016 x 4096, ``w_down`` 4096 x 11008 plus a residual), each reading the previous product's output,
for ``--layers`` layers with distinct weights (beyond L2, as in a step), captured in one CUDA graph. Variants:

- ``cublas``: ``torch.mv`` / ``torch.addmv`` (the residual products) into fixed buffers;
- ``triton``: this file's GEMV, launched normally;
- ``pdl``: the same kernel launched with PDL, waiting at its start;
- ``pdl_prefetch``: the same, each program loading its first weight tile before the wait;
- ``*_mixed``: the Triton variants with a small torch kernel (a copy of the product's input) before each product,
  as the default compiled layer has inductor's norm / SwiGLU / add kernels between its GEMVs: a kernel launched
  normally does not let its successor start early, so this is what PDL can give that layer.

Every variant's output is compared with ``triton``'s (the Triton variants must agree bit for bit: a missed
dependency would show as a difference), and the weight bytes read per µs with a 1 GiB device-to-device copy in
the same run. Writes ``$OUT/pdl_probe.json`` (else ``bench/out/pdl_probe.json``) and prints a table.

``pdl_nowait`` is the negative control: PDL launches whose kernel skips the wait, so a product may read its
input before the kernel writing it has finished; it should differ from ``triton`` (if it does not, the
comparison cannot see a missed dependency on this card, and equal bits prove less).

Usage: python3 bench/pdl_probe.py [--layers 32] [--replays 20] [--rounds 5] [--out FILE]
       TRITON_INTERPRET=1 python3 bench/pdl_probe.py --check   (the kernel against float64 on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from hyperlane_lab.codecs._kernels import kernel_module

# kernels/pdl.py: the grid dependency controls (module globals for the kernel below), the device check, the
# launch keyword
PDL = kernel_module("pdl")
gdc_launch_dependents, gdc_wait = PDL.gdc_launch_dependents, PDL.gdc_wait

# (name, N, K, residual): one layer's products in order; each reads the head of the previous output
SHAPES = (("wqkv", 12288, 4096, False), ("wo", 4096, 4096, True), ("gate_up", 22016, 4096, False),
          ("down", 4096, 11008, True))  # fmt: skip
CONFIGS = (
    (16, 256, 4, 4),
    (8, 512, 4, 3),
    (32, 256, 8, 3),
    (16, 512, 8, 3),
)  # BLOCK_N, BLOCK_K, warps, stages
VARIANTS = (
    "cublas",
    "triton",
    "pdl",
    "pdl_prefetch",
    "triton_mixed",
    "pdl_mixed",
    "pdl_prefetch_mixed",
    "pdl_nowait",
)


@triton.jit
def _gemv(x_ptr, w_ptr, r_ptr, y_ptr, K, RESID: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
          WAIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``y[n] = sum_k w[n, k] x[k] (+ r[n])`` for N % BLOCK_N == 0 and K % BLOCK_K == 0 (no masks).
    ``WAIT=False`` with ``PDL`` (the negative control): no wait, so the product may read its input early."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PDL:
        gdc_launch_dependents()  # the next kernel may become resident; it waits for this one's writes itself
    if PREFETCH:  # the weights do not depend on the previous kernel: start reading them before the wait
        w0 = tl.load(w_ptrs)
        if PDL and WAIT:
            gdc_wait()
        acc += w0.to(tl.float32) * tl.load(x_ptr + rk).to(tl.float32)[None, :]
    elif PDL and WAIT:
        gdc_wait()
    for k0 in range(BLOCK_K if PREFETCH else 0, K, BLOCK_K):
        w = tl.load(w_ptrs + k0)
        acc += w.to(tl.float32) * tl.load(x_ptr + k0 + rk).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if RESID:
        y += tl.load(r_ptr + rn).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))


def gemv_into(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None, cfg: tuple[int, ...],
              pdl: bool = False, prefetch: bool = False, wait: bool = True) -> None:  # fmt: skip
    """``y = w @ x[:K] (+ r)`` with the kernel above; ``x`` may be longer than K (its head is read)."""
    n, k = w.shape
    bn, bk, warps, stages = cfg
    if n % bn or k % bk or x.numel() < k or y.numel() != n:
        raise ValueError(f"pdl_probe gemv: {n}x{k} does not fit config {cfg} / x {x.numel()} / y {y.numel()}")
    extra = PDL.launch_options(pdl, x.device, "pdl_probe gemv")
    _gemv[(n // bn,)](
        x, w, r if r is not None else y, y, k, RESID=r is not None, PDL=pdl, PREFETCH=prefetch, WAIT=wait,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **extra,
    )  # fmt: skip


class Chain:
    """``layers`` x the four products, distinct weights, fixed buffers; ``run(variant)`` enqueues one chain."""

    def __init__(
        self,
        layers: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        shapes: tuple[tuple[str, int, int, bool], ...] = SHAPES,
    ) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.shapes = shapes
        self.w = [
            # 0.25 / sqrt(k): each product shrinks its input's scale, so 64 residual products stay finite in
            # fp16 (1 / sqrt(k) doubles the residual's variance per product: inf after ~30)
            [
                torch.randn(n, k, generator=g, device=device, dtype=dtype) * (0.25 / k**0.5)
                for _, n, k, _ in shapes
            ]
            for _ in range(layers)
        ]
        hidden = shapes[1][1]
        self.x0 = torch.randn(hidden, generator=g, device=device, dtype=dtype)
        self.h = (torch.empty_like(self.x0), torch.empty_like(self.x0))  # the residual stream, two buffers
        self.out = {name: torch.empty(n, device=device, dtype=dtype) for name, n, _, _ in shapes}
        self.staged = {name: torch.empty(k, device=device, dtype=dtype) for name, _, k, _ in shapes}
        self.cfg: dict[str, tuple[int, ...]] = {name: CONFIGS[0] for name, *_ in shapes}

    def poison(self) -> None:
        """NaN into every buffer a chain writes (before a replay whose output is checked)."""
        for t in (*self.h, *self.out.values(), *self.staged.values()):
            t.fill_(float("nan"))

    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for layer in self.w for w in layer)

    def run(self, variant: str) -> torch.Tensor:
        """One chain into fixed buffers (capturable); returns the last residual stream. The residual products
        read one residual buffer and write the other (no copy kernel between two products)."""
        cur, nxt = self.h
        cur.copy_(self.x0)
        src = cur
        for layer in self.w:
            for (name, _, k, resid), w in zip(self.shapes, layer, strict=True):
                dst = nxt if resid else self.out[name]
                if variant == "cublas":
                    if resid:
                        torch.addmv(cur, w, src[:k], out=dst)
                    else:
                        torch.mv(w, src[:k], out=dst)
                else:
                    x = src
                    if variant.endswith("_mixed"):  # a kernel launched normally before the product
                        x = self.staged[name]
                        x.copy_(src[:k])
                    gemv_into(x, w, dst, cur if resid else None, self.cfg[name],
                              pdl=variant.startswith("pdl"), prefetch=variant.startswith("pdl_prefetch"),
                              wait=variant != "pdl_nowait")  # fmt: skip
                if resid:
                    cur, nxt = nxt, cur
                src = dst
        return cur


def _capture(fn: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` warmed up, then captured in a CUDA graph (thread-local, as the decode graphs are) and replayed
    once; returns the graph and what the capture returned (its static output)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def _replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs per replay of ``graph`` (the engine's timer, ``kernels/gemv.replay_us``)."""
    return kernel_module("gemv").replay_us(graph, replays)  # type: ignore[no-any-return]


def _graph_us(fn: Any, replays: int) -> float:
    """µs per call of ``fn`` replayed from a CUDA graph: the median of three timings."""
    graph = _capture(fn)[0]
    return sorted(_replay_us(graph, replays) for _ in range(3))[1]


def _copy_gbps() -> float:
    """GB/s (read + written) of a 1 GiB device-to-device copy launched directly, as ``bench/gpu_pipeline.py``
    times it. (Replayed from a CUDA graph the same copy measured 2.7 TB/s on an H200 against 4.2 launched
    directly, probably as a memcpy node run by a copy engine: not the reference.)"""
    from gpu_pipeline import copy_bandwidth  # bench/, this script's folder

    return float(copy_bandwidth()) / 1e9


def check_cpu() -> int:
    """The kernel (every switch the interpreter can run) against a float64 product; 0 when all match."""
    torch.manual_seed(0)
    bad = 0
    for n, k, cfg, resid, prefetch in ((32, 512, (16, 256, 4, 4), True, True), (16, 256, (8, 64, 4, 3), False, False),
                                       (48, 768, (16, 256, 4, 4), False, True)):  # fmt: skip
        w = torch.randn(n, k, dtype=torch.float16)
        x = torch.randn(k + 8, dtype=torch.float16)
        r = torch.randn(n, dtype=torch.float16) if resid else None
        y = torch.empty(n, dtype=torch.float16)
        gemv_into(x, w, y, r, cfg, prefetch=prefetch)
        ref = w.double() @ x[:k].double() + (r.double() if r is not None else 0)
        err = (y.double() - ref).abs().max().item()
        ok = err <= 2e-3 * ref.abs().max().item() + 1e-3
        bad += not ok
        print(
            f"{n}x{k} cfg {cfg} resid {resid} prefetch {prefetch}: max error {err:.2e} {'ok' if ok else 'BAD'}"
        )
    try:
        gemv_into(torch.zeros(8), torch.zeros(10, 8), torch.zeros(10), None, (16, 256, 4, 4))
        bad += 1
        print("a shape that does not fit the config was accepted: BAD")
    except ValueError as e:
        print(f"misfit refused: {e}")
    # the chain's plumbing (which buffer each product reads and writes) on small shapes, against torch.mv
    small = (
        ("wqkv", 96, 32, False),
        ("wo", 32, 32, True),
        ("gate_up", 128, 32, False),
        ("down", 32, 64, True),
    )
    chain = Chain(2, torch.device("cpu"), torch.float32, shapes=small)
    chain.cfg = dict.fromkeys(chain.cfg, (16, 32, 4, 3))
    want = chain.run("cublas").double().clone()
    for variant in ("triton", "triton_mixed"):
        got = chain.run(variant).double()
        err = (got - want).abs().max().item()
        bad += err > 1e-4 * want.abs().max().item()
        print(f"2-layer chain, {variant} vs torch.mv: max error {err:.2e}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=20, help="replays per timing")
    ap.add_argument("--rounds", type=int, default=5, help="timings per variant, interleaved")
    ap.add_argument("--check", action="store_true", help="CPU check under TRITON_INTERPRET=1, then exit")
    ap.add_argument(
        "--out", default=str(Path(os.environ.get("OUT", Path(__file__).parent / "out")) / "pdl_probe.json")
    )
    a = ap.parse_args(argv)
    if a.check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--check runs the kernel on CPU: set TRITON_INTERPRET=1")
        return check_cpu()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --check with TRITON_INTERPRET=1)")
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    pdl_ok = PDL.pdl_supported(dev)
    chain = Chain(a.layers, dev, torch.float16)
    nbytes = chain.weight_bytes()
    copy_bw = _copy_gbps()
    # per product, the config the plain kernel runs fastest (a graph of every layer's copy of that product)
    for i, (name, n, k, _) in enumerate(SHAPES):
        x = torch.randn(max(k, 4096), device=dev, dtype=torch.float16)
        y = torch.empty(n, device=dev, dtype=torch.float16)
        best = None
        for cfg in CONFIGS:
            if n % cfg[0] or k % cfg[1]:
                continue
            us = _graph_us(
                lambda c=cfg, x=x, y=y, i=i: [gemv_into(x, lw[i], y, None, c) for lw in chain.w], a.replays
            )
            if best is None or us < best[0]:
                best = (us, cfg)
        assert best is not None
        chain.cfg[name] = best[1]
    skipped: dict[str, str] = {}
    graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    for variant in VARIANTS:
        if variant.startswith("pdl") and not pdl_ok:
            skipped[variant] = f"needs sm_90+ and Triton's gdc (capability {cap})"
            continue
        try:  # (a PDL kernel right after the graph's first copy node: how a capture takes it is card-dependent)
            graphs[variant] = _capture(lambda v=variant: chain.run(v))
        except Exception as e:  # keep the other variants
            skipped[variant] = f"capture failed: {type(e).__name__}: {e}"[:300]
    # interleaved: every round times each variant once, so a drift of the card's clocks hits them alike
    times: dict[str, list[float]] = {v: [] for v in graphs}
    for i in range(a.rounds):
        order = list(graphs)[i % len(graphs) :] + list(graphs)[: i % len(graphs)]
        for v in order:
            times[v].append(_replay_us(graphs[v][0], a.replays))
    # what each graph computes: the buffers poisoned with NaN, one replay (a product that read its input
    # before the kernel writing it had finished would differ from the plain launches)
    outs: dict[str, torch.Tensor] = {}
    for v, (graph, out) in graphs.items():
        chain.poison()
        graph.replay()
        torch.cuda.synchronize()
        outs[v] = out.clone()
    kernels = a.layers * len(SHAPES)
    rows: list[dict[str, Any]] = []
    for v in VARIANTS:
        if v in skipped:
            rows.append({"variant": v, "skipped": skipped[v]})
            continue
        us = statistics.median(times[v])
        rows.append({"variant": v, "us_per_chain": us, "us_per_kernel": us / kernels,
                     "us_rounds": times[v], "finite": bool(torch.isfinite(outs[v]).all()),
                     "weight_read_tbps": nbytes / us / 1e6,
                     "weight_read_pct_of_copy": 100.0 * (nbytes / us / 1e3) / copy_bw})  # fmt: skip
    for r in rows:
        name = "triton_mixed" if r["variant"].endswith("_mixed") else "triton"  # pdl_nowait: triton
        base = next((b for b in rows if b["variant"] == name), None)
        if "us_per_chain" in r and base is not None:
            r["baseline"] = name
            r["vs_triton"] = base["us_per_chain"] / r["us_per_chain"]
            r["saved_us_per_kernel"] = (base["us_per_chain"] - r["us_per_chain"]) / kernels
            ref = outs[name]
            diff = (outs[r["variant"]].float() - ref.float()).abs().max().item()
            r["max_abs_diff_vs_triton"] = diff
            # finite first: torch.equal(t, t) is true for the baseline itself even when t holds NaN (poison left
            # unwritten, or an overflow)
            r["bitwise_equal_to_triton"] = r["finite"] and bool(torch.equal(outs[r["variant"]], ref))
    result = {
        "device": torch.cuda.get_device_name(dev), "capability": list(cap), "torch": torch.__version__,
        "triton": triton.__version__, "layers": a.layers, "weight_bytes": nbytes,
        "copy_gbps": copy_bw, "configs": {k: list(v) for k, v in chain.cfg.items()}, "rows": rows,
    }  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{result['device']} (sm_{cap[0]}{cap[1]}), Triton {triton.__version__}; {a.layers} layers, "
          f"{nbytes / 1e9:.2f} GB of weights; 1 GiB copy {copy_bw:.0f} GB/s (read + write)")  # fmt: skip
    print("| variant | µs per chain | weight reads TB/s (% of the copy's) | speed vs baseline | saved µs per product | "
          "same bits as baseline (triton, or triton_mixed) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['variant']} | skipped: {r['skipped']} | | | | |")
            continue
        print(f"| {r['variant']} | {r['us_per_chain']:.0f} | {r['weight_read_tbps']:.2f} ({r['weight_read_pct_of_copy']:.0f}%) | "
              f"{r.get('vs_triton', 1.0):.3f}x | {r.get('saved_us_per_kernel', 0.0):+.2f} | "
              f"{r.get('bitwise_equal_to_triton', '')} (max diff {r.get('max_abs_diff_vs_triton', 0.0):.1e}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
