"""Pure planning layer: model shapes, device catalog, cost model, partitioners, simulator.

Quick use::

    from hyperlane_lab.planning import load_cluster, plan_model
    plan = plan_model("llama-2-13b", load_cluster("experiments/clusters/home-lab.yaml"),
                      partitioner="dp", objective="throughput", concurrency=4)

Nothing here does I/O except ``load_cluster`` (reads one file); scipy is imported only by 'ilp'.
"""

from __future__ import annotations

import os
from typing import Any

from hyperlane_lab.planning.catalog import CATALOG, CatalogEntry, catalog_names, device_from_catalog
from hyperlane_lab.planning.cluster import Cluster, cluster_from_dict, load_cluster
from hyperlane_lab.planning.cost import (
    CODEC_RATIOS,
    Links,
    codec_ratio,
    stage_decode_s,
    stage_memory,
    stage_prefill_s,
)
from hyperlane_lab.planning.partitioners import PARTITIONERS, Partitioner, get_partitioner
from hyperlane_lab.planning.shapes import (
    PRESET_SHAPES,
    ShapeSpec,
    model_profile_from_spec,
    preset_names,
    preset_profile,
    shape_from_hf_config,
)
from hyperlane_lab.planning.simulator import (
    PipelineTimes,
    SimResult,
    SimSummary,
    pipeline_times,
    simulate,
    simulate_plan,
)
from hyperlane_lab.planning.table import OBJECTIVES, CostTable, Evaluation, PlanOptions, build_table, evaluate
from hyperlane_lab.types import ModelProfile, Plan

__all__ = [
    "CATALOG",
    "CODEC_RATIOS",
    "OBJECTIVES",
    "PARTITIONERS",
    "PRESET_SHAPES",
    "CatalogEntry",
    "Cluster",
    "CostTable",
    "Evaluation",
    "Links",
    "Partitioner",
    "PipelineTimes",
    "PlanOptions",
    "ShapeSpec",
    "SimResult",
    "SimSummary",
    "build_table",
    "catalog_names",
    "cluster_from_dict",
    "codec_ratio",
    "device_from_catalog",
    "evaluate",
    "get_partitioner",
    "load_cluster",
    "model_profile_from_spec",
    "pipeline_times",
    "plan_model",
    "plan_options",
    "preset_names",
    "preset_profile",
    "shape_from_hf_config",
    "simulate",
    "simulate_plan",
    "stage_decode_s",
    "stage_memory",
    "stage_prefill_s",
]


def plan_options(
    cluster: Cluster, objective: str = "latency", concurrency: int = 1, **overrides: Any
) -> PlanOptions:
    """PlanOptions with the cluster's context and headroom (``overrides`` win)."""
    fields: dict[str, Any] = {
        "objective": objective,
        "concurrency": concurrency,
        "context": cluster.context,
        "headroom_bytes": cluster.headroom_bytes,
    }
    fields.update(overrides)
    return PlanOptions(**fields)


def plan_model(
    model: ModelProfile | str,
    cluster: Cluster | str | os.PathLike[str],
    partitioner: str = "dp",
    objective: str = "latency",
    concurrency: int = 1,
    **overrides: Any,
) -> Plan:
    """Plan ``model`` (a ModelProfile or preset name) on ``cluster`` (a Cluster or a YAML path).

    ``overrides`` are further PlanOptions fields (batch, context, codec, allow_skip, ...).
    """
    if not isinstance(cluster, Cluster):
        cluster = load_cluster(cluster)
    profile = preset_profile(model, cluster.dtype_bytes) if isinstance(model, str) else model
    options = plan_options(cluster, objective, concurrency, **overrides)
    return get_partitioner(partitioner)(profile, cluster.devices, cluster.links, options)
