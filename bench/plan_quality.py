"""Plan quality: predicted speed of each partitioner relative to the optimum, on mixed catalog clusters.

For every (cluster, model, objective) the score of a plan is its predicted tokens/s (throughput
objective, at the given concurrency) or 1 / latency (latency objective, i.e. tokens/s of one
sequence). "% of optimum" divides by the score of 'dp_select' (the exact optimum over device
subsets and orders); "% of fixed" by 'dp' (the exact optimum for the listed device order).
The optimum plan is also run through the simulator as a check of the analytic prediction.

    python bench/plan_quality.py [--ilp]

Pure CPU. Writes bench/out/plan_quality.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from hyperlane_lab.errors import InfeasiblePlanError
from hyperlane_lab.planning import (
    PARTITIONERS,
    Links,
    PlanOptions,
    device_from_catalog,
    preset_profile,
    simulate_plan,
)
from hyperlane_lab.types import LinkProfile, Plan

OUT = Path(__file__).resolve().parent / "out"
GBIT = 1e9 / 8

# name -> (cards in pipeline order, link Gbit/s, link latency ms)
CLUSTERS: dict[str, tuple[list[str], float, float]] = {
    "home-3": (["rtx4090", "rtx3090", "rtx3060"], 1.0, 0.3),
    "gamer-4": (["rtx3060", "rtx4070", "rtx3080", "rtx4090"], 1.0, 0.3),
    "ws-4": (["a6000", "a5000", "a4000", "rtx3090"], 10.0, 0.1),
    "consumer-8": (
        ["rtx3090", "rtx3090", "rtx4090", "rtx4090", "rtx3060", "rtx3060", "rtx5090", "rtx5090"],
        2.5,
        0.2,
    ),
    "dc-5": (["a100-40gb", "a100-80gb", "l40s", "l4", "h100-pcie"], 100.0, 0.02),
    "slow-tail-6": (["rtx4090", "rtx4090", "rtx4060ti-16gb", "rtx3060", "l4", "rtx3070"], 2.5, 0.2),
}
MODELS = ["llama-3-8b", "llama-2-13b", "qwen2-7b", "llama-2-70b"]
HEURISTICS = ["uniform", "greedy_memory", "knapsack"]


def score(plan: Plan, objective: str) -> float:
    return plan.predicted_tokens_per_s if objective == "throughput" else 1.0 / plan.predicted_latency_s


def run_case(cluster: str, model_name: str, objective: str, partitioners: list[str]) -> dict[str, Any] | None:
    cards, gbit, lat_ms = CLUSTERS[cluster]
    devices = tuple(device_from_catalog(c, f"{c}#{i}") for i, c in enumerate(cards))
    links = Links(LinkProfile(lat_ms / 1e3, gbit * GBIT))
    model = preset_profile(model_name)
    m = len(devices) if objective == "throughput" else 1
    opts = PlanOptions(objective=objective, concurrency=m, context=2048)
    plans: dict[str, Plan | None] = {}
    for name in partitioners:
        try:
            plans[name] = PARTITIONERS.get(name)(model, devices, links, opts)
        except InfeasiblePlanError:
            plans[name] = None
    best = plans.get("dp_select")
    if best is None:
        return None  # the model does not fit this cluster at all
    fixed = plans.get("dp")
    sim = simulate_plan(best, model, devices, links, opts, prompt_tokens=128, decode_steps=64).summary
    row: dict[str, Any] = {
        "cluster": cluster,
        "model": model_name,
        "objective": objective,
        "concurrency": m,
        "optimum_tokens_per_s": best.predicted_tokens_per_s,
        "optimum_latency_ms": best.predicted_latency_s * 1e3,
        "optimum_stages": [f"{s.device}:{len(s.span)}" for s in best.stages],
        "sim_over_predicted": (
            sim.decode_tokens_per_s / best.predicted_tokens_per_s
            if objective == "throughput"
            else best.predicted_latency_s / sim.latency_per_token_s
        ),
        "pct_of_optimum": {},
        "pct_of_fixed": {},
    }
    for name, plan in plans.items():
        row["pct_of_optimum"][name] = (
            None if plan is None else 100 * score(plan, objective) / score(best, objective)
        )
        row["pct_of_fixed"][name] = (
            None if plan is None or fixed is None else 100 * score(plan, objective) / score(fixed, objective)
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ilp", action="store_true", help="include 'ilp' (slow; equals 'dp')")
    args = ap.parse_args()
    partitioners = [*HEURISTICS, "dp", *(["ilp"] if args.ilp else []), "dp_select"]
    rows = []
    for cluster in CLUSTERS:
        for model in MODELS:
            for objective in ("latency", "throughput"):
                row = run_case(cluster, model, objective, partitioners)
                if row is not None:
                    rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plan_quality.json").write_text(json.dumps({"partitioners": partitioners, "rows": rows}, indent=1))

    def cell(v: float | None) -> str:
        return "infeasible" if v is None else f"{v:.1f}"

    for objective in ("latency", "throughput"):
        sub = [r for r in rows if r["objective"] == objective]
        print(
            f"\n### {objective}: % of optimum (dp_select){' at concurrency = #devices' if objective == 'throughput' else ''}\n"
        )
        print("| cluster | model | optimum tok/s | " + " | ".join(partitioners) + " | sim/pred |")
        print("|---|---|---|" + "---|" * len(partitioners) + "---|")
        for r in sub:
            opt = r["optimum_tokens_per_s"] if objective == "throughput" else 1e3 / r["optimum_latency_ms"]
            cells = " | ".join(cell(r["pct_of_optimum"][p]) for p in partitioners)
            print(f"| {r['cluster']} | {r['model']} | {opt:.1f} | {cells} | {r['sim_over_predicted']:.3f} |")
        means = []
        for p in partitioners:
            vals = [r["pct_of_optimum"][p] for r in sub if r["pct_of_optimum"][p] is not None]
            n_inf = sum(r["pct_of_optimum"][p] is None for r in sub)
            gm = math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")
            means.append(f"{gm:.1f} ({n_inf} inf.)")
        print("| **geo-mean over feasible** | | | " + " | ".join(means) + " | |")


if __name__ == "__main__":
    main()
