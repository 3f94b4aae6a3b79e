"""Accuracy of the wire codecs on a real model (default: the bundled stories260K), 3-stage split.

Runs ``hyperlane_lab.probes.probe_grid`` for fp16 and every registered int8 / int4 variant at group
sizes 32 / 64 / 128 (plus ``int4_outlier_k1``, a what-if int4_outlier with 1 outlier channel per row instead
of 8, i.e. about the wire bytes of int4 on a narrow model) on two evaluation sets:

- ``prompts``: ``probes.DEFAULT_PROMPTS`` (six TinyStories-like sentences, ~380 positions);
- ``sampled``: 24 stories sampled from the model itself (seeded, temperature 1, ~200 tokens each, ~4900
  positions), so that a top-1 agreement of 99.9 % is resolvable (one flip in 380 positions is 0.26 %).

Goals, on the whole-model rows (every boundary compressed) of each set:

- int8 (every group size): top-1 agreement >= 99.9 % and perplexity delta <= 0.1 %;
- the best int4 variant (lowest perplexity delta): perplexity delta <= 1 %.

Accuracy does not depend on the device (the codecs' Triton and torch paths give bitwise-identical payloads),
so CPU is the default; ``--device cuda`` runs the model there.

Sweeps: ``--codecs`` (registered names), ``--group-sizes`` and ``--outliers`` (the what-if int4_outlier
variants, one ``int4_outlier_k<n>`` per count; default ``1``, ``""`` for none) pick the grid; ``--summary``
appends a compact table of the whole-model rows (the columns of bench/RESULTS.md) and the best int4 setting
counting the what-if variants too (the goal lines above count only the registered codecs).

Writes ``bench/out/codec_probe.json`` and ``bench/out/codec_probe.md`` and prints the table.
Usage: python bench/codec_probe.py [--model PATH] [--stages 3] [--max-new-tokens 32] [--out PATH]
       [--codecs fp16,int8,...] [--group-sizes 32,64,128] [--outliers 1,2,4,16] [--summary]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.codecs.outlier import OutlierInt4Codec
from hyperlane_lab.probes import DEFAULT_PROMPTS, load_pipeline, probe_grid, probe_table

CODECS = ["fp16", "int8", "int4", "int4_outlier", "int4_hadamard", "int4_asym", "int4_outlier_asym"]
GROUP_SIZES = [32, 64, 128]
INT4 = tuple(c for c in CODECS if c.startswith("int4"))  # registered variants the goal is about
STARTS = ["Once upon a time", "One day", "Tom and Sue", "The little dog", "Lily wanted", "There was a big"]


def sampled_prompts(pipe: Any, n: int = 24, tokens: int = 200) -> list[list[int]]:
    """``n`` seeded temperature-1 samples of the model (prompt + continuation ids): in-distribution text."""
    out = []
    for i in range(n):
        r = pipe.generate(STARTS[i % len(STARTS)], max_tokens=tokens, temperature=1.0, seed=1000 + i)
        out.append(r.prompt_token_ids + r.token_ids)
    return out


def what_if_codecs(outliers: Sequence[int] = (1,), group_sizes: Sequence[int] = GROUP_SIZES) -> list[Any]:
    """``int4_outlier`` with ``k`` fp16 side channels per row instead of 8, named ``int4_outlier_k<k>``."""
    return [
        OutlierInt4Codec(f"int4_outlier_k{k}", 4, gs, "auto", outliers=k)
        for k in outliers
        for gs in group_sizes
    ]


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def best_int4(whole: Any, variants: Any) -> Any:
    """The whole-model row of lowest |ppl delta| among ``variants`` (a codec-name predicate), or None."""
    # ties (a group size >= H pads to the same groups) go to the fewer wire bytes
    int4 = whole[variants(whole.codec)].assign(abs_delta=lambda d: d.ppl_delta_rel.abs())
    int4 = int4.sort_values(["abs_delta", "ratio_vs_fp16"], ascending=[True, False])
    return int4 if len(int4) else None


def summary(df: Any) -> list[str]:
    """Whole-model rows as in bench/RESULTS.md, then the best int4 setting counting the what-if variants."""
    whole = df[df.boundary == "all"]
    lines = [
        "| codec / group | bytes/token | bytes vs fp16 | rel L2 | KL | top-1 agreement | perplexity delta |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _, r in whole.iterrows():
        group = f" / {r.group_size}" if r.group_size else ""
        lines.append(
            f"| {r.codec}{group} | {r.bytes_per_token} | 1/{r.ratio_vs_fp16:.2f} | {r.rel_l2:.2e} | {r.kl:.2e} "
            f"| {r.top1_agreement:.2%} | {r.ppl_delta_rel:+.3%} |"
        )
    ranked = best_int4(whole, lambda c: c.str.startswith("int4"))
    if ranked is not None:
        b = ranked.iloc[0]
        ok = ranked[ranked.abs_delta <= 0.01]
        fewest = ok.sort_values("ratio_vs_fp16", ascending=False).iloc[0] if len(ok) else None
        lines += [
            "",
            f"- best int4 setting (what-if variants included): {b.codec}/{b.group_size} ppl delta "
            f"{b.ppl_delta_rel:+.4%} at 1/{b.ratio_vs_fp16:.2f} of fp16 bytes",
            "- fewest bytes with |ppl delta| <= 1%: "
            + (
                f"{fewest.codec}/{fewest.group_size} ({fewest.ppl_delta_rel:+.4%}, 1/{fewest.ratio_vs_fp16:.2f})"
                if fewest is not None
                else "none"
            ),
        ]
    return lines


def goals(df: Any) -> dict[str, Any]:
    """Goal checks on the ``boundary == "all"`` rows."""
    whole = df[df.boundary == "all"]
    int8 = whole[whole.codec == "int8"]
    int4 = best_int4(whole, lambda c: c.isin(INT4))  # best = lowest |ppl delta|
    if int4 is None:
        return {}  # a sweep without the registered int4 variants: no goal lines
    best = int4.iloc[0]
    by_gs = {int(gs): str(g.iloc[0].codec) for gs, g in int4.groupby("group_size", sort=True)}
    return {
        "int8_top1_min": float(int8.top1_agreement.min()),
        "int8_top1_goal": 0.999,
        "int8_top1_ok": bool((int8.top1_agreement >= 0.999).all()),
        "int8_ppl_delta_max": float(int8.ppl_delta_rel.abs().max()),
        "int8_ppl_delta_goal": 0.001,
        "int8_ppl_ok": bool((int8.ppl_delta_rel.abs() <= 0.001).all()),
        "best_int4": {
            "codec": str(best.codec),
            "group_size": int(best.group_size),
            "ppl_delta_rel": float(best.ppl_delta_rel),
            "kl": float(best.kl),
            "top1_agreement": float(best.top1_agreement),
            "ratio_vs_fp16": float(best.ratio_vs_fp16),
        },
        "best_int4_per_group_size": by_gs,
        "best_int4_ppl_goal": 0.01,
        "best_int4_ppl_ok": bool(abs(best.ppl_delta_rel) <= 0.01),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: bundled stories260K)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval", default="prompts,sampled", help="evaluation sets: prompts, sampled")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "codec_probe.json"))
    ap.add_argument("--codecs", default=",".join(CODECS), help="registered codec names, comma-separated")
    ap.add_argument("--group-sizes", default=",".join(map(str, GROUP_SIZES)), help="e.g. 32,64,128")
    ap.add_argument(
        "--outliers", default="1", help='what-if int4_outlier_k<n> variants: outlier counts, "" for none'
    )
    ap.add_argument("--summary", action="store_true", help="append a table of the whole-model rows")
    args = ap.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    group_sizes = int_list(args.group_sizes)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, n_stages=args.stages, dtype=args.dtype, device=args.device)
    sets: dict[str, list[Any]] = {"prompts": list(DEFAULT_PROMPTS), "sampled": sampled_prompts(pipe)}
    frames, goal_by_set, md = {}, {}, []
    spans = ", ".join(str(s.span) for s in pipe.stages)
    for name in args.eval.split(","):
        grid = [*codecs, *what_if_codecs(int_list(args.outliers), group_sizes)]
        df = probe_grid(grid, group_sizes, model=pipe, prompts=sets[name], max_new_tokens=args.max_new_tokens)
        frames[name], goal_by_set[name] = df, goals(df)
        md += [
            f"## {name}: {len(sets[name])} prompts, {int(df.positions.iloc[0])} positions",
            "",
            probe_table(df),
            "",
        ]
        if args.summary:
            md += ["### whole model (every boundary compressed)", "", *summary(df), ""]
        if not goal_by_set[name]:
            continue
        g, best = goal_by_set[name], goal_by_set[name]["best_int4"]
        md += [
            f"- int8 top-1 agreement (all boundaries) min {g['int8_top1_min']:.4%} (goal >= 99.9%): "
            f"{'OK' if g['int8_top1_ok'] else 'MISSED'}",
            f"- int8 perplexity delta max {g['int8_ppl_delta_max']:.4%} (goal <= 0.1%): "
            f"{'OK' if g['int8_ppl_ok'] else 'MISSED'}",
            f"- best int4 variant: {best['codec']}/{best['group_size']} ppl delta {best['ppl_delta_rel']:+.4%} "
            f"(goal <= 1%): {'OK' if g['best_int4_ppl_ok'] else 'MISSED'}; "
            f"best per group size: {g['best_int4_per_group_size']}",
            "",
        ]
    elapsed = time.perf_counter() - t0
    result = {
        "bench": "codec_probe",
        "model": args.model or "bundled stories260K",
        "spans": [[s.span.start, s.span.end] for s in pipe.stages],
        "hidden_size": pipe.spec.hidden_size,
        "dtype": args.dtype,
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "codecs": codecs,
        "group_sizes": group_sizes,
        "outliers": int_list(args.outliers),
        "host": platform.node(),
        "torch": torch.__version__,
        "elapsed_s": round(elapsed, 2),
        "goals": goal_by_set,
        "rows": {k: df.to_dict(orient="records") for k, df in frames.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    head = f"# Codec probe: {result['model']} (H={pipe.spec.hidden_size}), stages {spans}, {args.dtype}\n"
    if max(group_sizes) > pipe.spec.hidden_size:
        head += (
            f"\nNote: a group size > H={pipe.spec.hidden_size} makes each token one zero-padded group: the "
            f"same scale granularity as group {pipe.spec.hidden_size}, more bytes.\n"
        )
    text = "\n".join([head, *md])
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')} in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
