"""Steady-state greedy decode speed: the in-process pipeline (1 and 3 stages) vs transformers.

Same run, same prompt, same number of new tokens, same weights (our stages are loaded from the
folder transformers loads). Prefill is excluded on both sides:

* ours: ``GenerationTimings`` splits prefill from decode; "loop" = (generate wall time - prefill)
  / decode steps, so it includes sampling, detokenization and the Python token loop; "step" = the
  stage calls and sampling alone.
* transformers: a logits processor timestamps every generated token; decode = last - first stamp
  over N - 1 steps (``generate``'s own loop, DynamicCache, greedy).

Models: the bundled stories260K (0.3M params) and a random Llama shaped like the ``tiny-100m``
preset (~125M params with its 32k vocab), saved to a temp folder. Default one torch thread on CPU
(stable numbers on a shared machine); ``--threads`` to change. Runs on CUDA with ``--device cuda``.

    python bench/cpu_decode.py [--tokens 64] [--reps 5] [--threads 1] [--models bundled,tiny-100m]

Writes bench/out/cpu_decode.json (or $OUT/cpu_decode.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_decode(model: Any, prompt_ids: list[int], n: int, device: str) -> tuple[float, list[int]]:
    """transformers greedy generate; returns (decode tokens/s excluding prefill, new ids)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())  # called once per new token, after its forward
            return scores

    ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
            pad_token_id=0,
        )
    new = out[0, len(prompt_ids) :].tolist()
    assert len(stamps) == n == len(new), (len(stamps), len(new))
    return (n - 1) / (stamps[-1] - stamps[0]), new


def ours_decode(pipe: Any, prompt: Any, n: int) -> tuple[float, float, list[int]]:
    """(loop tokens/s, step tokens/s, new ids) of one greedy generate, prefill excluded."""
    t0 = time.perf_counter()
    res = pipe.generate(prompt, max_tokens=n)
    wall = time.perf_counter() - t0
    t = res.timings
    assert len(res.token_ids) == n and t.decode_steps == n - 1, (len(res.token_ids), t.decode_steps)
    return t.decode_steps / (wall - t.prefill_s), t.decode_tokens_per_s, res.token_ids


def build_model(name: str, tmp: Path, device: str) -> tuple[str, Any, Any, Any]:
    """(folder, transformers model, prompt for ours, prompt ids for transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from hyperlane_lab.models import ModelSpec, bundled_model_path

    if name == "bundled":
        folder = str(bundled_model_path())
        prompt = "Once upon a time"
        ids = AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]
    else:
        s = ModelSpec.preset(name)
        cfg = LlamaConfig(
            vocab_size=s.vocab_size,
            hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            head_dim=s.head_dim,
            max_position_embeddings=s.max_position,
            rms_norm_eps=s.rms_eps,
            rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=None,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        folder = str(tmp / name)
        model.save_pretrained(folder)
        del model
        ids = [1, *torch.randint(3, s.vocab_size, (15,), generator=torch.Generator().manual_seed(0)).tolist()]
        prompt = ids  # token ids: the random model has no tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return folder, model, prompt, ids


def pipeline(folder: str, n_stages: int, device: str, tokenizer: bool) -> Any:
    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.models import ModelSpec, load_stage, load_tokenizer
    from hyperlane_lab.types import LayerSpan

    spec = ModelSpec.from_pretrained(folder)
    spec = dataclasses.replace(spec, eos_token_ids=spec.eos_token_ids if tokenizer else ())
    stages = [
        load_stage(folder, sp, "fp32", device, spec)
        for sp in LayerSpan.split_uniform(spec.n_layers, n_stages)
    ]
    return InProcessPipeline(stages, load_tokenizer(folder) if tokenizer else None, spec)


def run(models: list[str], n: int, reps: int, device: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            folder, hf, prompt, ids = build_model(name, Path(tmp), device)
            pipes = {k: pipeline(folder, k, device, tokenizer=name == "bundled") for k in (1, 3)}
            hf_decode(hf, ids, 4, device)  # warm-up
            for p in pipes.values():
                p.generate(prompt, max_tokens=4)
            hf_rates: list[float] = []
            ours: dict[int, list[tuple[float, float]]] = {k: [] for k in pipes}
            hf_ids: list[int] = []
            match: dict[int, bool] = {k: True for k in pipes}
            for _ in range(reps):  # interleaved, so load drift hits every runner alike
                rate, hf_ids = hf_decode(hf, ids, n, device)
                hf_rates.append(rate)
                for k, p in pipes.items():
                    loop, step, got = ours_decode(p, prompt, n)
                    ours[k].append((loop, step))
                    match[k] &= got == hf_ids
            hf_med = statistics.median(hf_rates)
            n_params = sum(t.numel() for t in hf.parameters())
            rows.append(
                {
                    "model": name,
                    "params": n_params,
                    "runner": "transformers generate",
                    "stages": 1,
                    "decode_tok_s": hf_med,
                    "all": hf_rates,
                    "vs_transformers": 1.0,
                    "tokens_match": True,
                }
            )
            for k, vals in ours.items():
                loop = statistics.median(v[0] for v in vals)
                rows.append(
                    {
                        "model": name,
                        "params": n_params,
                        "runner": "hyperlane in-process",
                        "stages": k,
                        "decode_tok_s": loop,
                        "step_tok_s": statistics.median(v[1] for v in vals),
                        "all": [v[0] for v in vals],
                        "vs_transformers": loop / hf_med,
                        "tokens_match": match[k],
                    }
                )
            del hf, pipes
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | runner | stages | decode tok/s (median) | step-only tok/s | vs transformers | same tokens |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        step = f"{r['step_tok_s']:.1f}" if "step_tok_s" in r else "-"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['runner']} | {r['stages']} | {r['decode_tok_s']:.1f} "
            f"| {step} | {r['vs_transformers']:.2f}x | {'yes' if r['tokens_match'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generate")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="bundled,tiny-100m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    rows = run(args.models.split(","), args.tokens, args.reps, args.device)
    result = {
        "bench": "cpu_decode",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.tokens,
        "reps": args.reps,
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu_decode.json").write_text(json.dumps(result, indent=2))
    print(
        f"decode, greedy, {args.tokens} new tokens, median of {args.reps}, device {args.device}, "
        f"{result['threads']} thread(s), torch {torch.__version__}, transformers {transformers.__version__}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
