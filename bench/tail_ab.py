"""The 1-GPU decode step's tail, A/B in one process: the final norm and LM head, and the greedy choice.

Variants (each on the same stage and weights, the whole-model in-process default otherwise: the all-Triton
layer with PDL and the first tile early):
  torch_tail  the torch norm + LM head product + the torch greedy ops (~10 small kernels)
  greedy      the torch norm + LM head product, the one-launch Triton greedy kernel (kernels/greedy.py):
              the default since the twenty-third session
  head_plain  the norm folded into the LM head's Triton GEMV (its fastest config without split-K, as the
              layer's qkv product folds its norm), launched plainly, + the greedy kernel (this script's own
              head, patched into ``decode_static._head``: not in the library, it measured no gain)
  head_pdl    that GEMV launched with PDL and its first tile early, + the greedy kernel
  untuned     the default with the layer's configs as timed alone (HYPERLANE_LAYER_TUNE=0; the default until
              the twenty-fourth session), not tuned by timing the whole step (models/layer_tune.py)
  tuned_replay  the default with the layer's configs tuned by timing bare back-to-back replays of the step
              (layer_tune.StepTimer's "replay" mode) rather than steps as a session runs them
  pin:SPEC    the default with GEMV configs pinned (HYPERLANE_GEMV_PIN's form, "+" between shapes, e.g.
              pin:12288x4096=4x1024w4s3+4096x4096=8x512w4s3); every variant's GEMVs are timed again when its
              pins differ from the one before it, so pin every role to compare one product's config alone
Run in the order given, then reversed (A B C D D C B A), so drift shows. Per variant: generate() decode
tok/s (run-ahead loop) and the device step (host free to run ahead), with the weight-read roofline from a
device-to-device copy in the same process. Writes JSON and prints a table. Usage:
  PYTHONPATH=$PWD python3 bench/tail_ab.py --out $OUT/tail_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_pipeline as gp  # bench/gpu_pipeline.py: the shared measurements

from hyperlane_lab.codecs._kernels import kernel_module
from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.models import TorchStage, decode_static
from hyperlane_lab.models.cuda_decode import GraphDecoder
from hyperlane_lab.models.decode_linear import gemv_pins
from hyperlane_lab.types import LayerSpan

VARIANTS = ("torch_tail", "greedy", "head_plain", "head_pdl", "untuned", "tuned_replay")
TORCH_HEAD = decode_static._head


def folded_head(gd: GraphDecoder, pdl: bool) -> Any:
    """A ``decode_static._head`` with the final RMSNorm folded into the LM head's Triton GEMV (the fastest
    timed config without split-K), then the fp32 logits as the torch head gives them."""
    gk = kernel_module("gemv")
    lm = gd.stage.weights.lm_head
    assert lm is not None
    by_name = gk.configs_by_name()
    times = gd.gemv_choice[f"{lm.shape[0]}x{lm.shape[1]}"]["us"]
    cfg = by_name[min((n for n in times if n in by_name and by_name[n].split_k == 1), key=times.__getitem__)]

    def head(stage: TorchStage, h: torch.Tensor, lin: Any) -> torch.Tensor:
        if not stage.is_last:
            return h
        w = stage.weights
        y = gk.gemv(
            h, w.lm_head, None, cfg, norm_weight=w.norm, eps=stage.spec.rms_eps, pdl=pdl, prefetch=pdl
        )
        return y.float()[:, 0]  # type: ignore[no-any-return]

    return head


def variant_pins(name: str) -> dict[str, str]:
    """The GEMV pins of a ``pin:SPEC`` variant ({} for the others); ValueError on a bad SPEC."""
    if not name.startswith("pin:"):
        return {}
    return gemv_pins({"HYPERLANE_GEMV_PIN": name[len("pin:") :].replace("+", ",")})


def set_variant(gd: GraphDecoder, name: str) -> None:
    """Put the decoder in one variant; its graphs are captured again at the next session."""
    gd.configure(gd.compile_layers)
    gd.layer_tune_enabled = name != "untuned"
    gd.layer_tune_mode = "replay" if name == "tuned_replay" else "session"
    pins = variant_pins(name)
    if pins != gd.gemv_pins:  # chosen again, with these pins
        gd.gemv_pins, gd._lin = pins, None
    gd.linear()  # the GEMV timings (kept across configure())
    gd.triton_greedy_enabled = name != "torch_tail"
    gd._greedy = False if name == "torch_tail" else None
    heads = {"head_plain": lambda: folded_head(gd, False), "head_pdl": lambda: folded_head(gd, True)}
    decode_static._head = heads[name]() if name in heads else TORCH_HEAD  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/out/tail_ab.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    bad = [n for n in names if n not in VARIANTS and not n.startswith("pin:")]
    if bad or len(set(names)) != len(names):
        raise SystemExit(
            f"unknown or repeated variants {bad or names}; valid: {', '.join(VARIANTS)}, pin:SPEC"
        )
    try:
        for n in names:
            variant_pins(n)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not torch.cuda.is_available():
        raise SystemExit("tail_ab.py needs a CUDA GPU")
    spec = gp.spec_for(args.model)
    stage = TorchStage.random(spec, LayerSpan(0, spec.n_layers), seed=0, dtype=torch.float16, device="cuda:0")
    bw = gp.copy_bandwidth()
    roof = bw / gp.stage_read_bytes(spec, LayerSpan(0, spec.n_layers))
    pipe = InProcessPipeline([stage], None, spec)
    prompt = gp.prompt_ids(32, spec.vocab_size)
    gd = stage.graph_decoder()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    try:
        for name in [*names, *reversed(names)]:
            set_variant(gd, name)
            d = gp.gen_decode(pipe, prompt, args.decode_tokens, args.reps)
            d["device_step_s"] = gp.device_step_s(stage)
            d["fallbacks"] = list(gd.fallbacks)
            d["triton_layer"] = gd.gemv_choice.get("triton_layer")  # the configs the layer ran
            d["triton_layer_tune"] = gd.gemv_choice.get("triton_layer_tune")  # none when not tuned
            runs[name].append(d)
            print(
                f"  {name}: {d['tok_s']:.1f} tok/s, device step {d['device_step_s'] * 1e6:.1f} µs", flush=True
            )
    finally:
        decode_static._head = TORCH_HEAD  # type: ignore[assignment]
    base = statistics.median(r["tok_s"] for r in runs[names[0]])
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "model": args.model,
        "copy_bw": bw,
        "roofline_tok_s": roof,
        "order": [*names, *reversed(names)],
        "variants": {
            n: {
                "tok_s": statistics.median(r["tok_s"] for r in rs),
                "device_step_us": statistics.median(r["device_step_s"] for r in rs) * 1e6,
                "runs": rs,
            }
            for n, rs in runs.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nGPU: {out['gpu']}; roofline {roof:.1f} tok/s at {bw / 1e12:.2f} TB/s (copy)\n")
    print("| variant | decode tok/s (both passes) | vs roofline | vs " + names[0] + " | device step µs |")
    print("|---|---|---|---|---|")
    for n, v in out["variants"].items():
        both = " / ".join(f"{r['tok_s']:.1f}" for r in v["runs"])
        print(f"| {n} | {v['tok_s']:.1f} ({both}) | {v['tok_s'] / roof:.1%} | {v['tok_s'] / base:.3f} | "
              f"{v['device_step_us']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
