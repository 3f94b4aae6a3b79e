"""Solve time of the partitioners on large instances (pure CPU; no GPU involved).

Goals: fixed-order 'dp' on 80 layers × 8 devices < 10 ms; 'dp_select' on 12 devices < 1 s.
Times cover the whole call (cost table + solver + plan evaluation): wall-clock median and min of
--repeat runs, and median CPU time of this process (less sensitive to a busy machine).

    python bench/plan_solve.py [--repeat 20] [--ilp]

Writes bench/out/plan_solve.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from hyperlane_lab.planning import PARTITIONERS, Links, PlanOptions, device_from_catalog, preset_profile
from hyperlane_lab.types import LinkProfile

OUT = Path(__file__).resolve().parent / "out"
MIX12 = [
    "rtx3090",
    "rtx4090",
    "a6000",
    "a5000",
    "rtx3090",
    "rtx4090",
    "l40s",
    "rtx3090",
    "a6000",
    "rtx4090",
    "a5000",
    "l4",
]
# twelve different cards: no interchangeable devices, the worst case of dp_select
DISTINCT12 = [
    "rtx3090", "rtx4090", "a6000", "a5000", "l40s", "l4", "rtx5090", "a4000", "rtx4080", "a100-40gb", "rtx3060",
    "rtx4060ti-16gb",
]  # fmt: skip
GOALS_S = {("dp", 8): 0.010, ("dp_select", 12): 1.0}


def devices(n: int, distinct: bool = False) -> tuple[Any, ...]:
    names = DISTINCT12 if distinct else MIX12
    return tuple(device_from_catalog(name, f"{name}#{i}") for i, name in enumerate(names[:n]))


def links(devs: tuple[Any, ...], per_hop: bool) -> Links:
    default = LinkProfile(latency_s=0.3e-3, bandwidth=10e9 / 8)
    if not per_hop:
        return Links(default)
    slow = LinkProfile(latency_s=1e-3, bandwidth=1e9 / 8)  # a few slower hops break the symmetry
    return Links(default, (("client", devs[0].name, slow), (devs[1].name, devs[2].name, slow)))


def time_case(
    name: str, n_dev: int, objective: str, per_hop: bool, repeat: int, distinct: bool = False
) -> dict[str, Any]:
    model = preset_profile("llama-2-70b")
    devs = devices(n_dev, distinct)
    opts = PlanOptions(objective=objective, concurrency=8, context=4096)
    lk = links(devs, per_hop)
    fn = PARTITIONERS.get(name)
    times, cpu, plan = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = fn(model, devs, lk, opts)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert plan is not None
    goal = GOALS_S.get((name, n_dev))
    med = statistics.median(times)
    return {
        "partitioner": name,
        "layers": model.n_layers,
        "devices": n_dev,
        "objective": objective,
        "per_hop_links": per_hop,
        "distinct_devices": distinct,
        "repeat": repeat,
        "median_s": med,
        "min_s": min(times),
        "median_cpu_s": statistics.median(cpu),
        "stages": len(plan.stages),
        "tokens_per_s": plan.predicted_tokens_per_s,
        "goal_s": goal,
        "meets_goal": None if goal is None else med < goal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--ilp", action="store_true", help="also time 'ilp' on 80 layers × 8 devices (slow)")
    args = ap.parse_args()
    cases: list[tuple[str, int, int]] = [
        ("uniform", 8, args.repeat),
        ("greedy_memory", 8, args.repeat),
        ("knapsack", 8, args.repeat),
        ("dp", 8, args.repeat),
        ("dp", 12, args.repeat),
        ("dp_select", 8, max(3, args.repeat // 4)),
        ("dp_select", 12, max(3, args.repeat // 10)),
    ]
    if args.ilp:
        cases.append(("ilp", 8, 1))
    rows = []
    for name, n, rep in cases:
        for objective in ("latency", "throughput"):
            for per_hop in (False, True):
                if not per_hop and name not in ("dp", "dp_select"):
                    continue
                rows.append(time_case(name, n, objective, per_hop, rep))
    for objective in ("latency", "throughput"):
        for per_hop in (False, True):
            rows.append(
                time_case("dp_select", 12, objective, per_hop, max(3, args.repeat // 10), distinct=True)
            )
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    (OUT / "plan_solve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(
        "| partitioner | L × D | devices | objective | per-hop links | median ms | min ms | CPU ms | stages "
        "| goal | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        goal = "" if r["goal_s"] is None else f"< {r['goal_s'] * 1e3:g} ms"
        ok = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "NO")
        print(
            f"| {r['partitioner']} | {r['layers']} × {r['devices']} | {'distinct' if r['distinct_devices'] else 'mix'} | "
            f"{r['objective']} | {r['per_hop_links']} | "
            f"{r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f} | {r['median_cpu_s'] * 1e3:.2f} | "
            f"{r['stages']} | {goal} | {ok} |"
        )


if __name__ == "__main__":
    main()
