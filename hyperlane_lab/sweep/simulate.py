"""Simulate-mode points: plan with a partitioner over a (catalog / what-if) cluster and run the
pipeline simulator on the plan. Pure computation: no processes, no weights.

A point's ``cluster`` is a cluster YAML (``planning.cluster`` format; a relative path is looked up
next to the sweep file first), or catalog cards: a list ``[rtx4090, rtx3090]`` or one string
``"rtx4090+2xrtx3060"``. ``link_gbps`` / ``link_latency_ms`` override the cluster's default link.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperlane_lab.planning.cluster import Cluster
    from hyperlane_lab.sweep.config import PointConfig
    from hyperlane_lab.sweep.runner import SweepContext
    from hyperlane_lab.types import ModelProfile

__all__ = ["cards_of", "point_cluster", "point_model_profile", "simulate_point"]

_MULT = re.compile(r"^(\d+)\s*[x*]\s*(.+)$")


def cards_of(spec: str | tuple[str, ...]) -> list[str]:
    """``"rtx4090+2xrtx3060"`` or a list of such items -> ``["rtx4090", "rtx3060", "rtx3060"]``."""
    items = spec.split("+") if isinstance(spec, str) else list(spec)
    cards: list[str] = []
    for item in items:
        item = item.strip()
        m = _MULT.match(item)
        cards += [m.group(2).strip()] * int(m.group(1)) if m else [item]
    return [c for c in cards if c]


def point_cluster(point: PointConfig, base_dir: str | Path | None = None) -> Cluster:
    """The planning Cluster a point names (YAML file or catalog cards), with its link overrides."""
    from hyperlane_lab.planning.cluster import cluster_from_dict, load_cluster
    from hyperlane_lab.types import LinkProfile

    spec = point.cluster
    if isinstance(spec, int):
        raise ValueError(
            f"simulate mode needs devices, got cluster: {spec}; name catalog cards (cluster: [rtx4090, rtx3090]) "
            "or a cluster YAML"
        )
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).is_file():
            path = Path(base_dir) / path
        cluster = load_cluster(path)
    else:
        cluster = cluster_from_dict(
            {"devices": [{"name": c} for c in cards_of(spec)]}, source=f"cluster {spec!r}"
        )
    if point.link_gbps is not None or point.link_latency_ms is not None:
        d = cluster.links.default
        link = LinkProfile(
            latency_s=point.link_latency_ms / 1e3 if point.link_latency_ms is not None else d.latency_s,
            bandwidth=point.link_gbps * 1e9 / 8 if point.link_gbps is not None else d.bandwidth,
        )
        cluster = dataclasses.replace(cluster, links=dataclasses.replace(cluster.links, default=link))
    return cluster


def point_model_profile(model: str | None, dtype_bytes: int) -> ModelProfile:
    """A planner ModelProfile: a preset name (``llama-2-7b``), else a checkpoint (None = bundled model)."""
    from hyperlane_lab.planning.shapes import model_profile_from_spec, preset_names, preset_profile

    if model is not None and model in preset_names():
        return preset_profile(model, dtype_bytes)
    from hyperlane_lab.models import ModelSpec, resolve_model

    source = resolve_model(model)
    return model_profile_from_spec(
        ModelSpec.from_pretrained(source), dtype_bytes, name=str(model or "bundled")
    )


def simulate_point(point: PointConfig, ctx: SweepContext) -> list[dict[str, Any]]:
    from hyperlane_lab.errors import InfeasiblePlanError
    from hyperlane_lab.planning.partitioners import get_partitioner
    from hyperlane_lab.planning.simulator import simulate_plan
    from hyperlane_lab.planning.table import PlanOptions

    base_dir = Path(ctx.cfg.source).parent if ctx.cfg.source and ctx.cfg.source != "<dict>" else None
    cluster = point_cluster(point, base_dir)
    model = point_model_profile(point.model, cluster.dtype_bytes)
    options = PlanOptions(
        objective=point.objective,
        concurrency=point.concurrency,
        context=point.context if point.context is not None else cluster.context,
        headroom_bytes=cluster.headroom_bytes,
        codec=point.codec,
    )
    partition = get_partitioner(point.partitioner)
    row: dict[str, Any] = {"devices": len(cluster.devices)}
    try:
        plan = partition(model, cluster.devices, cluster.links, options)
    except InfeasiblePlanError as e:
        # deterministic, so the point is done: record it rather than retrying on resume
        return [{**row, "feasible": False, "note": str(e).splitlines()[0]}]
    sim = simulate_plan(
        plan, model, cluster.devices, cluster.links, options, point.prompt_tokens, point.max_tokens
    )
    s = sim.summary
    by_name = {d.name: d for d in cluster.devices}
    row.update(
        feasible=True,
        stages=len(plan.stages),
        spans=";".join(f"{st.device}{st.span}" for st in plan.stages),
        predicted_latency_ms=plan.predicted_latency_s * 1e3,
        predicted_tokens_per_s=plan.predicted_tokens_per_s,
        bottleneck_ms=plan.bottleneck_s * 1e3,
        solve_ms=plan.solve_s * 1e3,
        max_memory_frac=max(st.memory_bytes / by_name[st.device].memory_bytes for st in plan.stages),
        sim_tokens_per_s=s.tokens_per_s,
        sim_decode_tokens_per_s=s.decode_tokens_per_s,
        sim_latency_per_token_ms=s.latency_per_token_s * 1e3,
        sim_ttft_ms=s.ttft_s * 1e3,
        bubble_pct_mean=100.0 * sum(s.bubble_fraction) / len(s.bubble_fraction),
        bubble_pct_max=100.0 * max(s.bubble_fraction),
    )
    return [row]
