"""GPU speed of the torch engine, in process and split over worker processes (one per GPU).

Parts (``--parts``, comma-separated):
  1gpu    Llama-2-7B shape, random fp16, batch 1, in process: decode tok/s (eager / CUDA graph /
          graph + torch.compile), device-only step time, prefill 512 and 2048 tok/s, the weight-read
          roofline (bytes a decode step must read / device-to-device copy bandwidth, both measured
          here), per-linear GEMV bandwidth, and a kernel-time profile of one decode step.
  hf      transformers: random-init ``LlamaForCausalLM`` (fp16, same GPU): eager ``generate`` and a
          forward loop (decode), and prefill forwards.
  splitN  (split2, split4, split8, ...)
          the same model over N worker processes (LocalCluster, TCP over loopback): batch-1
          decode, prefill 512/2048, throughput with m = 1, 2, 4, 8, 16 sequences in flight
          (concurrent generate calls), per-hop overhead vs a raw-socket round trip of the same
          payload, bubble % from the traces vs (p-1)/(m+p-1), simulator predictions.
  70b     Llama-2-70B shape over 4 worker processes, with its split roofline; ``70bN`` over N
          (e.g. 70b8: 8 stages, m = 8, 16, 32 in flight).
On CPU (or ``--model bundled``) the same code runs on the bundled tiny model's shape (smoke test).

Writes JSON to ``--out`` (default ``$OUT/gpu_pipeline.json`` or ``bench/out/gpu_pipeline.json``);
parts already in that file are kept. Prints a markdown table last (``--table FILE ...`` prints the
table of saved results only). Usage:
  PYTHONPATH=$PWD python3 bench/gpu_pipeline.py --parts 1gpu,hf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_pipeline_parts as parts  # bench/gpu_pipeline_parts.py: the hf, split and 70b parts

from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.models import PRESETS, ModelSpec, TorchStage, bundled_model_path
from hyperlane_lab.runtime.local_cluster import mps_active
from hyperlane_lab.types import LayerSpan

CUDA = torch.cuda.is_available()
med = statistics.median
SAVE: list[Any] = []  # main() puts a function here that writes the results so far


# ---------------------------------------------------------------------- shared measurements


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cuda:0", nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of ``reps``)."""
    if not CUDA:
        return 0.0
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / med(times)


def spec_for(name: str) -> ModelSpec:
    return ModelSpec.from_pretrained(bundled_model_path()) if name == "bundled" else PRESETS[name]


def stage_read_bytes(spec: ModelSpec, span: LayerSpan, itemsize: int = 2) -> int:
    """Bytes of weights one decode step must read: the span's layers, plus the final norm and LM head
    on the last stage (the embedding table is not read: one row per token)."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    per_layer = (spec.n_heads + 2 * spec.n_kv_heads) * d * h + h * spec.n_heads * d + 3 * h * f + 2 * h
    if spec.qkv_bias:
        per_layer += (spec.n_heads + 2 * spec.n_kv_heads) * d
    n = per_layer * len(span)
    if span.end == spec.n_layers:
        n += spec.vocab_size * h + h
    return n * itemsize


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def gen_decode(model: Any, prompt: list[int], n: int, reps: int) -> dict[str, Any]:
    model.generate(prompt, max_tokens=n)  # warm-up (captures graphs, fills pools)
    rates = [model.generate(prompt, max_tokens=n).timings.decode_tokens_per_s for _ in range(reps)]
    return {"tok_s": med(rates), "runs": rates, "prompt": len(prompt), "new_tokens": n}


def gen_prefill(model: Any, length: int, vocab: int, reps: int) -> dict[str, Any]:
    ids = prompt_ids(length, vocab, seed=length)
    model.generate(ids, max_tokens=1)
    times = [model.generate(ids, max_tokens=1).timings.prefill_s for _ in range(reps)]
    return {"tok_s": length / med(times), "prefill_s": med(times), "runs_s": times}


# ---------------------------------------------------------------------- 1 GPU, in process


# The 1gpu part's decode variants: name -> (CUDA graphs, torch.compile, run-ahead loop, Triton GEMV where it
# wins, one-kernel attention, all-Triton batch-1 layer where the timings favour it[, PDL, first tile early]);
# "graph_compile" is the default engine on GPUs without PDL, and "graph_compile_layer_pdl_prefetch" (its
# configs tuned in the step) that of every stage on sm_90+; "_sync" = the loop reads
# each token before enqueueing the next step (the run-ahead loop is generate()'s default for
# greedy on CUDA); "_cublas" = every product on cuBLAS; "_layer" = the five-launch
# Triton layer (HYPERLANE_TRITON_LAYER=1); "_pdl" = the step's Triton kernels launched with
# programmatic dependent launch (HYPERLANE_PDL=1, sm_90+; "_prefetch": the GEMVs read their first weight
# tile before the wait, HYPERLANE_PDL_PREFETCH=1); "_unfused" = the plain attention ops (RoPE, cache
# writes, scores, softmax: ~9 kernels a layer)
DECODE_VARIANTS = {
    "eager": (False, False, True, False, False, False),
    "graph": (True, False, True, True, True, False),
    "graph_compile": (True, True, True, True, True, False),
    "graph_compile_sync": (True, True, False, True, True, False),
    "graph_compile_cublas": (True, True, True, False, True, False),
    "graph_compile_layer": (True, True, True, True, True, True),
    "graph_compile_pdl": (True, True, True, True, True, False, True),
    "graph_compile_pdl_prefetch": (True, True, True, True, True, False, True, True),
    "graph_compile_layer_pdl": (True, True, True, True, True, True, True),
    "graph_compile_layer_pdl_prefetch": (True, True, True, True, True, True, True, True),
    "graph_compile_unfused": (True, True, True, True, False, False),
}


def device_step_s(stage: TorchStage, steps: int = 50) -> float:
    """Per decode step with the host free to run ahead (no token read back): device time when the
    host enqueues faster than the GPU computes."""
    sid = uuid.uuid4().hex
    stage.open_session(sid, 1, 40 + steps + 8)
    stage.forward(sid, torch.tensor([prompt_ids(32, stage.spec.vocab_size)]), torch.arange(32)[None])
    x = torch.tensor([[7]])
    for k in range(5):
        stage.forward(sid, x, torch.tensor([[32 + k]]))
    sync()
    t0 = time.perf_counter()
    for k in range(steps):
        stage.forward(sid, x, torch.tensor([[37 + k]]))
    sync()
    dt = (time.perf_counter() - t0) / steps
    stage.close_session(sid)
    return dt


def matmul_flops(n: int = 8192, reps: int = 10) -> float:
    """fp16 n x n x n matrix product rate on random data (the compute ceiling for prefill)."""
    a = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b = torch.randn(n, n, dtype=torch.float16, device="cuda")
    for _ in range(3):
        a @ b
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        a @ b
    e1.record()
    e1.synchronize()
    return 2 * n**3 * reps / (e0.elapsed_time(e1) / 1e3)


def prefill_device_s(stage: TorchStage, length: int, reps: int = 5) -> float:
    """Seconds per prefill of ``length`` tokens, back to back without reading results (GPU time when
    the host enqueues faster than the GPU runs)."""
    ids = torch.tensor([prompt_ids(length, stage.spec.vocab_size, seed=length)])
    pos = torch.arange(length)[None]
    sids = [uuid.uuid4().hex for _ in range(reps + 1)]
    for sid in sids:
        stage.open_session(sid, 1, length + 1)
    stage.forward(sids[0], ids, pos)
    sync()
    t0 = time.perf_counter()
    for sid in sids[1:]:
        stage.forward(sid, ids, pos)
    sync()
    dt = (time.perf_counter() - t0) / reps
    for sid in sids:
        stage.close_session(sid)
    return dt


def _is_kernel(e: Any) -> bool:
    """A device-side event (a kernel or copy), not an operator that launched it."""
    kind = getattr(e, "device_type", None)
    return kind is None or kind == torch.autograd.DeviceType.CUDA


def prefill_profile(stage: TorchStage, length: int) -> dict[str, Any]:
    """One prefill under torch.profiler: wall time vs summed kernel time (host- or GPU-bound?)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.tensor([prompt_ids(length, stage.spec.vocab_size, seed=length)])
    pos = torch.arange(length)[None]
    sid = uuid.uuid4().hex
    stage.open_session(sid, 1, length + 1)
    stage.forward(sid, ids, pos)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        stage.forward(sid, ids, pos)
        sync()
        wall = time.perf_counter() - t0
    stage.close_session(sid)
    kern, cpu = [], []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count and _is_kernel(e):
            kern.append((e.key[:80], round(t, 1), e.count))
        if e.self_cpu_time_total > 0:
            cpu.append((e.key[:60], round(e.self_cpu_time_total, 1), e.count))
    kern.sort(key=lambda r: -r[1])
    cpu.sort(key=lambda r: -r[1])
    kernel_us = sum(k[1] for k in kern)
    return {
        "wall_us": wall * 1e6,
        "kernel_us_lower_bound": kernel_us,
        "top_kernels": kern[:10],
        "top_cpu": cpu[:10],
    }


def _graph_matmul_us(gk: Any, mats: list[torch.Tensor]) -> float:
    """µs per ``x @ W`` (W [K, N]) replayed from a CUDA graph, rotating over ``mats``."""
    x = torch.randn(1, 1, mats[0].shape[0], dtype=mats[0].dtype, device=mats[0].device)
    it = iter(range(1 << 62))
    return float(gk.graph_time_us(lambda: torch.matmul(x, mats[next(it) % len(mats)]), 4 * len(mats)))


def _configure(
    gd: Any,
    comp: bool,
    triton_gemv: bool,
    fused: bool,
    layer: bool,
    pdl: bool = False,
    prefetch: bool = False,
) -> None:
    """Set a GraphDecoder to one bench variant (``None`` = decide on the card, as by default)."""
    gd._lin = None if triton_gemv else torch.nn.functional.linear  # None: choose per shape
    gd._attn = None if fused else False
    gd.configure(comp)
    gd.triton_layer_enabled = layer
    gd.pdl_enabled, gd.pdl_prefetch = pdl, prefetch
    # each piece as the variant says (not the default's rule); with the all-Triton layer PDL launches that
    # layer only (the LM head's product and batch > 1 steps plain), as the default does (in-process since
    # the twenty-second session, everywhere since the twenty-fifth); without it, the compiled layer's
    # kernels (the variant's point).
    # Until the twenty-third session the layer variants also launched the LM head's product with PDL.
    gd._layer_auto = False
    gd._pdl_auto = layer
    gd.fallbacks.clear()  # configure() keeps them; each variant records only its own


def gemv_bandwidth(spec: ModelSpec, bw: float) -> dict[str, Any]:
    """Bandwidth of each decode linear (x [1,1,K] @ W[N,K]^T), rotating weight copies, timed from a
    CUDA graph as the decode step runs them: cuBLAS, the weight stored transposed (another cuBLAS
    kernel), and every Triton GEMV candidate (``kernels/gemv.py``; best one reported)."""
    from hyperlane_lab.codecs._kernels import kernel_module

    gk = kernel_module("gemv")
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    shapes = {
        "wqkv": ((spec.n_heads + 2 * spec.n_kv_heads) * d, h),
        "wo": (h, spec.n_heads * d),
        "w_gate_up": (2 * f, h),
        "w_down": (h, f),
        "lm_head": (spec.vocab_size, h),
    }
    out: dict[str, Any] = {}
    for name, (n, k) in shapes.items():
        copies = max(2, -(-(512 << 20) // (n * k * 2)))  # > 10x the L2
        ws = [torch.empty(n, k, dtype=torch.float16, device="cuda").normal_(0, 0.02) for _ in range(copies)]
        cfg, times = gk.choose_config(ws, timer="graph")
        t = times["cublas"] / 1e6
        out[name] = {
            "shape": [n, k],
            "us": t * 1e6,
            "bytes_per_s": n * k * 2 / t,
            "of_copy_bw": n * k * 2 / t / bw,
            "triton_us": times,
            "triton_choice": None if cfg is None else gk.config_name(cfg),
        }
        tri = min(v for key, v in times.items() if key != "cublas") / 1e6
        out[name]["triton_best_of_copy_bw"] = n * k * 2 / tri / bw
        # the same product with the weight stored transposed ([K, N], x @ W^T): another cuBLAS kernel
        wts = [w.t().contiguous() for w in ws]
        del ws
        tt = _graph_matmul_us(gk, wts) / 1e6
        out[name]["transposed_us"] = tt * 1e6
        out[name]["transposed_of_copy_bw"] = n * k * 2 / tt / bw
        del wts
    torch.cuda.empty_cache()
    return out


def kernel_profile(stage: TorchStage, steps: int = 5) -> dict[str, Any]:
    """Kernel time per decode step by kernel (torch.profiler), for the stage's current mode."""
    from torch.profiler import ProfilerActivity, profile

    sid = uuid.uuid4().hex
    stage.open_session(sid, 1, 64)
    stage.forward(sid, torch.tensor([prompt_ids(16, stage.spec.vocab_size)]), torch.arange(16)[None])
    x = torch.tensor([[7]])
    for k in range(3):
        stage.forward(sid, x, torch.tensor([[16 + k]]))
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            stage.forward(sid, x, torch.tensor([[19 + k]]))
        sync()
    stage.close_session(sid)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count > 0 and _is_kernel(e):
            rows.append((e.key, t / steps, e.count // steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    gemm = sum(
        r[1]
        for r in rows
        if any(s in r[0].lower() for s in ("gemm", "gemv", "xmma", "cutlass", "splitk", "nvjet"))
    )
    return {
        "kernel_us_per_step": total,
        "gemm_us_per_step": gemm,
        "kernels_per_step": sum(r[2] for r in rows),
        "top": [{"kernel": k[:90], "us_per_step": round(t, 1), "calls_per_step": c} for k, t, c in rows[:12]],
        "sequence": device_sequence(prof.events(), steps),
    }


def device_sequence(events: Any, steps: int) -> dict[str, Any]:
    """The device events of the profiled steps in start order, each with what it added to the GPU's busy
    time: ``added`` = its end past the latest end before it (a kernel launched with PDL starts early and
    waits, so its own duration overlaps its predecessor's; ``added`` does not), ``gap`` = idle time
    before it. Returns the middle step's list and, per event name, the added µs per step over all."""
    ev = sorted((e for e in events if _is_kernel(e) and e.time_range.end > e.time_range.start),
                key=lambda e: e.time_range.start)  # fmt: skip
    t0 = end = ev[0].time_range.start if ev else 0.0  # the busy time so far ends at ``end``
    rows = []
    by_name: dict[str, float] = {}
    gaps = 0.0
    for e in ev:
        s, f, name = e.time_range.start, e.time_range.end, e.name[:60]
        gap, added = max(0.0, s - end), max(0.0, f - max(s, end))
        end = max(end, f)
        gaps += gap
        by_name[name] = by_name.get(name, 0.0) + added
        rows.append((name, round(s - t0, 2), round(f - s, 2), round(added, 2), round(gap, 2)))
    n = len(rows) // max(1, steps)
    mid = rows[n * (steps // 2) : n * (steps // 2 + 1)] if n else rows
    return {
        "events_per_step": n,
        "uneven": len(rows) != n * steps,  # steps of unequal event counts: middle_step may straddle two
        "span_us_per_step": (end - t0) / steps,
        "gap_us_per_step": gaps / steps,
        "added_us_per_step": {
            k: round(v / steps, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
        },
        "middle_step": [dict(zip(("name", "start_us", "dur_us", "added_us", "gap_us"), r)) for r in mid],
    }


def part_1gpu(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    spec = spec_for(args.model)
    dev = "cuda:0" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    t0 = time.perf_counter()
    stage = TorchStage.random(spec, LayerSpan(0, spec.n_layers), seed=0, dtype=dtype, device=dev)
    sync()
    out: dict[str, Any] = {"model": args.model, "build_s": time.perf_counter() - t0}
    out["weight_bytes"] = stage.weights.nbytes()
    out["read_bytes_per_step"] = stage_read_bytes(spec, LayerSpan(0, spec.n_layers), dtype.itemsize)
    bw = copy_bandwidth() if CUDA else 0.0
    out["copy_bw"] = bw
    if bw:
        out["roofline_tok_s"] = bw / out["read_bytes_per_step"]
        out["roofline_all_weights_tok_s"] = bw / out["weight_bytes"]
    pipe = InProcessPipeline([stage], None, spec)
    prompt = prompt_ids(32, spec.vocab_size)
    n = args.decode_tokens
    names = args.variants.split(",") if CUDA else ["eager"]
    variants = {k: DECODE_VARIANTS[k] for k in names}
    out["decode"] = {}
    from hyperlane_lab.generation import pipeline as pl

    run_ahead = pl._LocalSession.can_run_ahead
    for name, flags in variants.items():
        graphs, comp, ahead = flags[:3]
        stage.cuda_graphs = graphs
        if graphs:
            _configure(stage.graph_decoder(), comp, *flags[3:])
        pl._LocalSession.can_run_ahead = run_ahead if ahead else (lambda self: False)  # type: ignore[method-assign]
        try:
            t1 = time.perf_counter()
            d = gen_decode(pipe, prompt, n, args.reps)
            d["first_call_s"] = time.perf_counter() - t1
            d["device_step_s"] = device_step_s(stage)
            if CUDA and args.profile:
                d["profile"] = kernel_profile(stage)
            if graphs and stage.graph_decoder()._broken:
                d["note"] = "graph capture failed; ran eagerly"
            if graphs and flags[3]:
                d["gemv_choice"] = stage.graph_decoder().gemv_choice
            if graphs:
                d["fallbacks"] = list(stage.graph_decoder().fallbacks)
        except Exception as e:  # keep the other variants
            d = {"error": f"{type(e).__name__}: {e}"}
        out["decode"][name] = d
        print(f"  decode {name}: {d.get('tok_s', d.get('error'))}", flush=True)
        res["1gpu"] = out
        for f in SAVE:
            f()
    pl._LocalSession.can_run_ahead = run_ahead  # type: ignore[method-assign]
    ok = {k: v for k, v in out["decode"].items() if "tok_s" in v}
    best = max(ok, key=lambda k: ok[k]["tok_s"])
    out["best_decode"] = best
    flags = variants[best]
    stage.cuda_graphs = flags[0]
    if flags[0]:
        _configure(stage.graph_decoder(), flags[1], *flags[3:])
    out["prefill"] = {str(s): gen_prefill(pipe, s, spec.vocab_size, args.reps) for s in args.prefill}
    if CUDA:
        for s in args.prefill:
            out["prefill"][str(s)]["device_s"] = prefill_device_s(stage, s)
        out["matmul_flops"] = matmul_flops()
        if args.profile:
            try:
                out["prefill_profile_512"] = prefill_profile(stage, 512)
            except Exception as e:
                out["prefill_profile_512"] = {"error": str(e)}
        if args.gemv:
            out["gemv"] = gemv_bandwidth(spec, bw)
    del pipe, stage
    import gc

    gc.collect()  # the stage and its graph decoder reference each other
    if CUDA:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------- table


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    card = res.get("meta", {}).get("gpus", ["cpu"])
    g1, hf = res.get("1gpu"), res.get("hf")
    if g1:
        best = g1["decode"].get(g1["best_decode"], {})
        for k, v in g1["decode"].items():
            if "tok_s" in v:
                rows.append(
                    (
                        f"1 GPU decode ({k})",
                        f"{v['tok_s']:.1f} tok/s",
                        f"device step {v['device_step_s'] * 1e3:.2f} ms",
                        "",
                    )
                )
        if "roofline_tok_s" in g1:
            r = best["tok_s"] / g1["roofline_tok_s"]
            rows.append(
                (
                    "  vs weight-read roofline",
                    f"{r:.1%}",
                    f"roofline {g1['roofline_tok_s']:.0f} tok/s @ {g1['copy_bw'] / 1e12:.2f} TB/s",
                    "PASS" if r >= 0.81 else "MISS (goal 81%)",
                )
            )
        for s, v in g1["prefill"].items():
            goal = ("PASS" if v["tok_s"] >= 20100 else "MISS (goal 20,100)") if s == "512" else ""
            dev = f"device-only {int(s) / v['device_s']:.0f} tok/s" if v.get("device_s") else ""
            rows.append((f"1 GPU prefill {s}", f"{v['tok_s']:.0f} tok/s", dev, goal))
        if hf:
            for key, ours in (
                ("decode_generate", best.get("tok_s")),
                ("prefill_512", g1["prefill"].get("512", {}).get("tok_s")),
            ):
                ref = hf.get(key, {}).get("tok_s")
                if ref and ours:
                    rows.append(
                        (
                            f"  vs transformers {key}",
                            f"{ours / ref:.1f}x",
                            f"hf {ref:.1f} tok/s",
                            "PASS" if ours / ref >= 10 else "MISS (goal 10x)",
                        )
                    )
    for key in sorted(k for k in res if re.fullmatch(SPLIT_PART_RE, k)):
        rows += parts.table_rows(key, res.get(key), g1)
    mps = (
        " (split parts: workers sharing it through MPS, bench/with_mps.sh)"
        if res.get("meta", {}).get("mps")
        else ""
    )
    lines = [f"GPU: {', '.join(card)}{mps}", "", "| metric | value | detail | goal |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


# splitN / 70b[N], then @NAME of a --worker-variant, then #N (groups: N of split, N of 70b, NAME)
SPLIT_PART_RE = r"(?:split(\d+)|70b(\d*))(?:@(\w+))?(?:#\d+)?"
PART_RE = rf"1gpu|hf|{SPLIT_PART_RE}"
PARTS_VALID = (
    "valid: 1gpu, hf, splitN (e.g. split2), 70b, 70bN (e.g. 70b8), each split or 70b part optionally "
    "@NAME of a --worker-variant, then optionally #N to run it again under its own key (split4#2: an A/B "
    "run as A,B,B#2,A#2 shows what the order alone does)"
)


def check_lists(args: argparse.Namespace) -> None:
    """SystemExit, with what is valid, for an unknown or repeated part or decode variant, or an @NAME that
    names no --worker-variant: fail now, not hours into a run."""
    names = args.parts.split(",")
    bad = [n for n in names if not re.fullmatch(PART_RE, n)]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; {PARTS_VALID}")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        again = [f"{n}#2" for n in twice if "#" not in n and n not in ("1gpu", "hf")]
        hint = f" (a split or 70b part runs again under a key of its own, e.g. {again[0]})" if again else ""
        raise SystemExit(f"part(s) {twice} given twice{hint}")
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in DECODE_VARIANTS]:
        raise SystemExit(f"unknown decode variant(s) {unknown}; valid: {', '.join(DECODE_VARIANTS)}")
    if twice := sorted({v for v in variants if variants.count(v) > 1}):
        raise SystemExit(
            f"decode variant(s) {twice} given twice: each runs once (repeat a run with another --out)"
        )
    try:
        parts.worker_variants(args.worker_variant)
        for n in names:
            if m := re.fullmatch(SPLIT_PART_RE, n):
                parts.worker_flags(args, m.group(3))
    except ValueError as e:
        raise SystemExit(str(e)) from e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1gpu,hf" if CUDA else "1gpu,split2")
    ap.add_argument("--model", default="llama-2-7b" if CUDA else "bundled")
    ap.add_argument("--decode-tokens", type=int, default=128 if CUDA else 16)
    ap.add_argument(
        "--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048] if CUDA else [64]
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--prefill-chunk",
        type=lambda s: [x if x == "auto" else int(x) for x in s.split(",") if x],
        default=["auto"],
        help='split parts: also measure prefill with the prompt sent in chunks of these many tokens ("auto": '
        "the client's default rule)",
    )
    ap.add_argument("--compression", default="raw", help="split parts: the codec of every hand-off")
    ap.add_argument(
        "--ms", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 4, 8, 16], help='"" = none'
    )
    ap.add_argument("--compile", choices=["0", "1"], default=os.environ.get("HYPERLANE_COMPILE", "1"))
    ap.add_argument("--profile", type=int, default=1)
    ap.add_argument("--gemv", type=int, default=1)
    ap.add_argument(
        "--variants",
        default="eager,graph,graph_compile,graph_compile_layer_pdl_prefetch",
        help="1gpu decode variants",
    )
    ap.add_argument(
        "--cpu-latency-us", type=int, default=None, help="split parts: workers hold this PM QoS CPU latency"
    )
    ap.add_argument(
        "--worker-variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help='extra worker flags for parts named PART@NAME, e.g. spin="--busy-poll-us 20000"; VAR=value words '
        'set the workers\' environment instead, e.g. c="HYPERLANE_TRITON_LAYER=0 HYPERLANE_PDL=0"',
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", nargs="*", help="print the table of saved JSON files and exit")
    args = ap.parse_args()
    if args.table is not None:
        merged: dict[str, Any] = {}
        for f in args.table:
            merged.update(json.loads(Path(f).read_text()))
        print(table(merged))
        return 0
    check_lists(args)  # before anything is written or started
    os.environ["HYPERLANE_COMPILE"] = args.compile  # worker processes inherit it
    out_dir = os.environ.get("OUT")
    path = Path(
        args.out
        or (
            Path(out_dir) / "gpu_pipeline.json"
            if out_dir
            else Path(__file__).parent / "out" / "gpu_pipeline.json"
        )
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res["meta"] = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if CUDA
        else ["cpu"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compile_in_workers": args.compile,
        "command": " ".join(sys.argv),
        # several workers on one GPU through MPS (bench/with_mps.sh): their kernels run side by side
        "mps": mps_active(os.environ),
    }

    def save() -> None:
        path.write_text(json.dumps(res, indent=1, default=str))

    SAVE.append(save)

    def run_part(name: str) -> dict[str, Any]:
        # 1gpu | hf | splitN (N worker processes, one per GPU) | 70b (4 stages) | 70bN (N stages)
        if name == "1gpu":
            return part_1gpu(args, res)
        if name == "hf":
            return parts.part_hf(args, res)
        if m := re.fullmatch(SPLIT_PART_RE, name):
            flags = parts.worker_flags(args, m.group(3))  # splitN@NAME: workers with --worker-variant NAME
            if m.group(1):
                return parts.part_split(args, res, int(m.group(1)), name, flags)
            return parts.part_70b(args, res, int(m.group(2) or 4), name, flags)
        raise ValueError(f"unknown part {name!r}; {PARTS_VALID}")

    for name in args.parts.split(","):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res[name] = run_part(name)
        except Exception as e:
            import traceback

            traceback.print_exc()
            res[name] = {**(res.get(name) or {}), "error": f"{type(e).__name__}: {e}"}
        res[name]["part_s"] = time.perf_counter() - t0
        save()  # partial results survive a timeout
    print(f"wrote {path}")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
