"""``hyperlane plan MODEL --cluster cluster.yaml``: partition a model over a cluster, print the plan.

MODEL is a preset name (``hyperlane_lab.planning.preset_names()``) or a checkpoint folder / GGUF
file / hub id, whose config alone is read. ``--compare`` runs every partitioner side by side.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "load_model_profile", "plan_json", "run"]

GIB = 2**30
COMPARE_MAX_ASSIGNMENTS = 200_000  # brute-force oracles are skipped above this in --compare


def add_parser(subparsers: Any) -> None:
    # no planning import here: building the CLI parser stays cheap; names are checked in run()
    p = subparsers.add_parser(
        "plan",
        help="partition a model's layers over a cluster (no GPUs needed)",
        description="Plan which device runs which layers, and predict latency and throughput.",
    )
    p.add_argument("model", help="preset (e.g. llama-2-7b) or checkpoint folder / GGUF file / hub id")
    p.add_argument("--cluster", required=True, help="cluster YAML (devices, links, context, dtype)")
    p.add_argument(
        "--partitioner",
        default="dp",
        help="uniform, greedy_memory, knapsack, dp, dp_select, ilp, exhaustive, exhaustive_select (default dp)",
    )
    p.add_argument(
        "--objective", default="latency", choices=("latency", "throughput"), help="default: latency"
    )
    p.add_argument("--concurrency", type=int, default=1, help="micro-batches in flight (default 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument(
        "--context", type=int, default=None, help="KV tokens per sequence (default: the cluster's)"
    )
    p.add_argument("--codec", default="fp16", help="boundary codec: fp16, int8, int4 (default fp16)")
    p.add_argument("--allow-skip", action="store_true", help="fixed-order partitioners may leave devices out")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--compare", action="store_true", help="run every partitioner and compare to the optimum")
    p.set_defaults(func=run)


def load_model_profile(model: str, dtype_bytes: int) -> Any:
    """ModelProfile of a preset, or of a checkpoint's config (path / GGUF / hub id)."""
    from hyperlane_lab.planning import (
        PRESET_SHAPES,
        model_profile_from_spec,
        preset_profile,
        shape_from_hf_config,
    )

    if model in PRESET_SHAPES:
        return preset_profile(model, dtype_bytes)
    try:
        from hyperlane_lab.models.loading import load_hf_config

        cfg = load_hf_config(model)
    except ImportError:  # model core not installed: read the config with transformers directly
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{model!r} is not a preset ({', '.join(sorted(PRESET_SHAPES))}) and its config could not be read: {e}"
        ) from e
    return model_profile_from_spec(shape_from_hf_config(cfg, name=model), dtype_bytes)


def plan_json(plan: Any) -> dict[str, Any]:
    """The ``--json`` shape of one plan."""
    return {
        "stages": [
            {
                "device": s.device,
                "layers": [s.span.start, s.span.end],
                "memory_gib": round(s.memory_bytes / GIB, 3),
                "predicted_ms": round(s.predicted_s * 1e3, 4),
            }
            for s in plan.stages
        ],
        "predicted": {
            "latency_ms_per_token": round(plan.predicted_latency_s * 1e3, 4),
            "tokens_per_s": round(plan.predicted_tokens_per_s, 3),
            "bottleneck_ms": round(plan.bottleneck_s * 1e3, 4),
        },
        "solve_ms": round(plan.solve_s * 1e3, 3),
    }


def _print_plan(plan: Any, cluster: Any, options: Any, model_name: str) -> None:
    from hyperlane_lab.cli.common import format_table

    rows = [
        {
            "stage": i,
            "device": s.device,
            "layers": str(s.span),
            "n": len(s.span),
            "memory GiB": f"{s.memory_bytes / GIB:.2f}",
            "of GiB": f"{next(d.memory_bytes for d in cluster.devices if d.name == s.device) / GIB:.1f}",
            "step ms": f"{s.predicted_s * 1e3:.3f}",
        }
        for i, s in enumerate(plan.stages)
    ]
    print(f"{model_name} on {cluster.source or 'cluster'}: {plan.partitioner}, objective {plan.objective}")
    print(format_table(rows))
    print(
        f"latency {plan.predicted_latency_s * 1e3:.3f} ms/token (one micro-batch alone); "
        f"{plan.predicted_tokens_per_s:.2f} tokens/s at concurrency {options.concurrency} × batch {options.batch}; "
        f"bottleneck {plan.bottleneck_s * 1e3:.3f} ms; solved in {plan.solve_s * 1e3:.2f} ms"
    )


def _compare(profile: Any, cluster: Any, options: Any, as_json: bool) -> int:
    from dataclasses import replace

    from hyperlane_lab.cli.common import format_table
    from hyperlane_lab.errors import InfeasiblePlanError
    from hyperlane_lab.planning import PARTITIONERS
    from hyperlane_lab.planning.partitioners.exhaustive import count_assignments

    opts = replace(options, ilp_time_limit_s=min(options.ilp_time_limit_s, 20.0))
    results: dict[str, Any] = {}
    for name in PARTITIONERS.names():
        if name.startswith("exhaustive"):
            n = count_assignments(
                profile.n_layers, len(cluster.devices), name.endswith("select"), opts.allow_skip
            )
            if n > COMPARE_MAX_ASSIGNMENTS:
                results[name] = f"skipped ({n} assignments)"
                continue
        try:
            results[name] = PARTITIONERS.get(name)(profile, cluster.devices, cluster.links, opts)
        except (InfeasiblePlanError, ValueError) as e:
            results[name] = f"failed: {str(e).splitlines()[0]}"
    plans = {k: v for k, v in results.items() if not isinstance(v, str)}

    def score(plan: Any) -> float:  # higher is better
        if opts.objective == "latency":
            return 1.0 / float(plan.predicted_latency_s)
        return float(plan.predicted_tokens_per_s)

    best = max((score(p) for p in plans.values()), default=0.0)
    if as_json:
        out = {
            name: (
                {"error": v}
                if isinstance(v, str)
                else {**plan_json(v), "pct_of_optimum": 100 * score(v) / best}
            )
            for name, v in results.items()
        }
        print(json.dumps({"objective": opts.objective, "partitioners": out}))
        return 0 if plans else 1
    rows = []
    for name, v in results.items():
        if isinstance(v, str):
            rows.append({"partitioner": name, "stages": v})
            continue
        rows.append(
            {
                "partitioner": name,
                "stages": " ".join(f"{s.device}:{len(s.span)}" for s in v.stages),
                "ms/token": f"{v.predicted_latency_s * 1e3:.3f}",
                "tokens/s": f"{v.predicted_tokens_per_s:.2f}",
                "% of optimum": f"{100 * score(v) / best:.1f}",
                "solve ms": f"{v.solve_s * 1e3:.2f}",
            }
        )
    print(
        f"objective {opts.objective}, concurrency {opts.concurrency}, batch {opts.batch}, context {opts.context}"
    )
    print(format_table(rows, ["partitioner", "stages", "ms/token", "tokens/s", "% of optimum", "solve ms"]))
    return 0 if plans else 1


def run(args: argparse.Namespace) -> int:
    from hyperlane_lab.planning import PARTITIONERS, load_cluster, plan_options

    cluster = load_cluster(args.cluster)
    profile = load_model_profile(args.model, cluster.dtype_bytes)
    overrides: dict[str, Any] = {"batch": args.batch, "codec": args.codec, "allow_skip": args.allow_skip}
    if args.context is not None:
        overrides["context"] = args.context
    options = plan_options(cluster, args.objective, args.concurrency, **overrides)
    if args.compare:
        return _compare(profile, cluster, options, args.json)
    plan = PARTITIONERS.get(args.partitioner)(profile, cluster.devices, cluster.links, options)
    if args.json:
        print(json.dumps(plan_json(plan)))
    else:
        _print_plan(plan, cluster, options, args.model)
    return 0
