"""Benchmark the onnxruntime engine against the torch engine.

For each model (the bundled stories260K and a random ~33M-parameter GQA Llama; on CUDA also the
``tiny-100m`` preset shape):
  * export: a 2-stage split exported fresh (temp cache): export seconds and file size per stage;
  * decode: the whole model as one stage, greedy decode of ``--steps`` tokens after a ``--prompt``
    token prefill, for each batch size; tokens/s = batch * steps / decode time. Both engines run the
    identical loop in the same process, with the same thread count on CPU, after a warm-up, ``--reps``
    times interleaved (the best run of each is reported); ``same_tokens`` says whether both engines
    produced the same greedy tokens.
On CPU: ORT CPUExecutionProvider vs torch CPU (fp32). On CUDA: ORT CUDAExecutionProvider (needs
onnxruntime-gpu) vs torch CUDA (fp16), plus the CPU rows.

Writes ``bench/out/onnx_engine.json`` and ``bench/out/onnx_engine.md`` and prints the tables.
Usage: python bench/onnx_engine.py [--steps 64] [--prompt 32] [--batch 1,4] [--threads N] [--no-cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.engines.ort_engine import OrtStage, ort_available_providers
from hyperlane_lab.models import ModelSpec, TorchStage, bundled_model_path, load_stage
from hyperlane_lab.onnx import export_stage
from hyperlane_lab.types import LayerSpan

RANDOM_33M = ModelSpec("llama", 8, 512, 8, 4, 64, 1536, 8000, max_position=2048, name="random-33m")


def _torch_stage(model: str, span: LayerSpan, dtype: torch.dtype, device: str) -> TorchStage:
    if model == "bundled":
        return load_stage(str(bundled_model_path()), span, dtype, device)
    spec = RANDOM_33M if model == "random-33m" else ModelSpec.preset(model)
    return TorchStage.random(spec, span, seed=0, dtype=dtype, device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _decode(stage: Any, batch: int, prompt: int, steps: int, device: str) -> dict[str, Any]:
    """Prefill ``prompt`` random tokens per row, then ``steps`` greedy one-token steps."""
    vocab = stage.spec.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(prompt).repeat(batch, 1).to(device)
    sid = f"bench-{time.monotonic_ns()}"
    stage.open_session(sid, batch, prompt + steps + 1)
    try:
        _sync(device)
        t0 = time.perf_counter()
        nxt = stage.forward(sid, ids, pos).argmax(-1)
        _sync(device)
        prefill = time.perf_counter() - t0
        tokens, step_times = [nxt.cpu()], []
        for i in range(steps):
            p = torch.full((batch, 1), prompt + i, dtype=torch.int64, device=device)
            t0 = time.perf_counter()
            nxt = stage.forward(sid, nxt[:, None], p).argmax(-1)
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            tokens.append(nxt.cpu())
    finally:
        stage.close_session(sid)
    total = sum(step_times)
    return {
        "prefill_ms": round(prefill * 1e3, 3),
        "ms_per_step": round(statistics.median(step_times) * 1e3, 3),
        "decode_tok_s": round(batch * steps / total, 1),
        "tokens": torch.stack(tokens, 1).tolist(),
    }


def bench_model(
    model: str, args: argparse.Namespace, device: str, dtype: torch.dtype, cache: Path
) -> dict[str, Any]:
    n_layers = _torch_stage(model, LayerSpan(0, 1), dtype, "cpu").spec.n_layers
    dname = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    exports = []
    for span in LayerSpan.split_uniform(n_layers, 2):
        t0 = time.perf_counter()
        res = export_stage(_torch_stage(model, span, dtype, "cpu"), cache_dir=cache)
        exports.append(
            {
                "model": model,
                "dtype": dname,
                "span": str(span),
                "exporter": res.exporter,
                "export_s": round(res.export_s, 3),
                "export_and_check_s": round(time.perf_counter() - t0, 3),
                "size_mb": round(res.size_bytes / 1e6, 3),
                "max_abs_err": res.max_abs_err,
            }
        )
    full = LayerSpan(0, n_layers)
    onnx_path = export_stage(_torch_stage(model, full, dtype, "cpu"), cache_dir=cache).path
    ref = _torch_stage(model, full, dtype, device)
    ort = OrtStage(onnx_path, device, threads=args.threads)
    rows = []
    for batch in args.batch:
        for st in (ref, ort):  # warm-up: lazy inits, allocator, ORT's first-run shape inference
            _decode(st, batch, args.prompt, 4, device)
        ts, os_ = [], []
        for _ in range(args.reps):  # interleaved, so load from other processes hits both engines alike
            ts.append(_decode(ref, batch, args.prompt, args.steps, device))
            os_.append(_decode(ort, batch, args.prompt, args.steps, device))
        t = max(ts, key=lambda r: r["decode_tok_s"])
        o = max(os_, key=lambda r: r["decode_tok_s"])
        same = t.pop("tokens") == o.pop("tokens")
        for engine, r in (
            ("torch", t),
            (f"onnxruntime ({ort.providers[0].replace('ExecutionProvider', '')})", o),
        ):
            rows.append(
                {
                    "model": model,
                    "params_m": round(ref.spec.n_params / 1e6, 1),
                    "engine": engine,
                    "device": device,
                    "dtype": dname,
                    "batch": batch,
                    **r,
                    "same_tokens": same,
                }
            )
        rows[-1]["speedup_vs_torch"] = round(o["decode_tok_s"] / t["decode_tok_s"], 2)
    return {"exports": exports, "decode": rows}


def _md(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per engine (best is reported)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for both engines (default: torch's)"
    )
    ap.add_argument("--models", default=None, help="comma-separated: bundled, random-33m, or a preset name")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "onnx_engine.json"))
    args = ap.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.no_cuda
    cuda_ep = "CUDAExecutionProvider" in ort_available_providers()
    import onnxruntime

    report: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda_ep": cuda_ep,
        "steps": args.steps,
        "prompt": args.prompt,
        "reps": args.reps,
        "exports": [],
        "decode": [],
        "notes": [],
    }
    runs: list[tuple[str, str, torch.dtype]] = [(m, "cpu", torch.float32) for m in ["bundled", "random-33m"]]
    if cuda:
        if cuda_ep:
            runs += [(m, "cuda", torch.float16) for m in ["bundled", "random-33m", "tiny-100m"]]
        else:
            report["notes"].append(
                "CUDA present but onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu"
            )
    if args.models:
        keep = set(args.models.split(","))
        runs = [r for r in runs if r[0] in keep]
    with tempfile.TemporaryDirectory(prefix="hl-onnx-bench-") as tmp:
        for model, device, dtype in runs:
            r = bench_model(model, args, device, dtype, Path(tmp) / device)
            report["exports"] += [e for e in r["exports"] if e not in report["exports"]]
            report["decode"] += r["decode"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"ONNX engine benchmark — torch {report['torch']}, onnxruntime {report['onnxruntime']}, "
        f"{args.threads} CPU threads, GPU: {report['gpu'] or 'none'}; prompt {args.prompt}, {args.steps} decode steps, "
        f"best of {args.reps}",
        "",
        _md(
            report["exports"],
            [
                "model",
                "dtype",
                "span",
                "exporter",
                "export_s",
                "export_and_check_s",
                "size_mb",
                "max_abs_err",
            ],
        ),
        "",
        _md(
            report["decode"],
            [
                "model",
                "params_m",
                "engine",
                "device",
                "dtype",
                "batch",
                "prefill_ms",
                "ms_per_step",
                "decode_tok_s",
                "speedup_vs_torch",
                "same_tokens",
            ],
        ),
    ] + [f"\nnote: {n}" for n in report["notes"]]
    text = "\n".join(md) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
