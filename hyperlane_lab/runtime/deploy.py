"""Deploying a model onto workers: plan, check memory, ship shards, load them, wire the ring."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hyperlane_lab.errors import InfeasiblePlanError
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import parse_dtype
from hyperlane_lab.runtime.control import WorkerClient
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.types import LayerSpan, Plan, StagePlan, WorkerInfo

__all__ = ["deploy", "make_plan", "stage_weight_bytes"]

log = logging.getLogger(__name__)


def stage_weight_bytes(spec: ModelSpec, span: LayerSpan, dtype: str) -> int:
    """Weight bytes of a stage (layers, plus embedding / head where it owns them)."""
    itemsize = parse_dtype(dtype).itemsize
    emb = spec.vocab_size * spec.hidden_size
    per_layer = (spec.n_params - emb * (1 if spec.tie_embeddings else 2) - spec.hidden_size) / spec.n_layers
    n = per_layer * len(span)
    if span.start == 0:
        n += emb
    if span.end == spec.n_layers:
        n += spec.hidden_size + (0 if spec.tie_embeddings and span.start == 0 else emb)
    return int(n * itemsize)


def make_plan(
    spec: ModelSpec,
    clients: Sequence[WorkerClient],
    infos: Sequence[WorkerInfo],
    partitioner: str,
    objective: str,
    concurrency: int,
    context: int,
    dtype: str,
) -> Plan:
    """``uniform`` splits layers evenly in the given order; any other name profiles the workers
    and runs that partitioner of ``hyperlane_lab.planning`` (which may reorder or skip workers)."""
    if partitioner == "uniform":
        n = min(len(infos), spec.n_layers)
        spans = LayerSpan.split_uniform(spec.n_layers, n)
        return Plan(
            tuple(StagePlan(device=i.address, span=s, address=i.address) for s, i in zip(spans, infos)),
            partitioner="uniform",
            objective=objective,
        )
    from hyperlane_lab.runtime.planning_bridge import plan_for_workers

    return plan_for_workers(spec, clients, partitioner, objective, concurrency, context, dtype)


def _check_memory(spec: ModelSpec, plan: Plan, infos: dict[str, WorkerInfo], dtype: str) -> None:
    problems = []
    for st in plan.stages:
        info = infos[st.device]
        need = stage_weight_bytes(spec, st.span, dtype)
        if info.free_memory and need > info.free_memory:
            problems.append(
                f"  {info.address} ({info.gpu_name or info.device_kind}) layers {st.span}: needs "
                f"{need / 2**30:.2f} GiB, has {info.free_memory / 2**30:.2f} GiB free"
            )
    if problems:
        raise InfeasiblePlanError(
            "the model does not fit the workers:\n"
            + "\n".join(problems)
            + "\nadd workers, use dtype fp16/bf16, or a partitioner that respects memory (partitioner='dp')"
        )


def deploy(
    source: str,
    spec: ModelSpec,
    clients: list[WorkerClient],
    *,
    partitioner: str = "uniform",
    compression: str | Sequence[str] = "raw",
    group_size: int = 64,
    engine: str | Sequence[str] = "torch",
    dtype: str = "fp32",
    ship_weights: bool = True,
    progress: bool = True,
    objective: str = "latency",
    concurrency: int = 1,
    context: int = 2048,
    random_weights: bool = False,
    seed: int = 0,
) -> tuple[Plan, list[WorkerClient]]:
    from hyperlane_lab.runtime.client import _codec_list
    from hyperlane_lab.runtime.shipping import build_shard_payload

    parse_dtype(dtype)
    infos = {c.address: c.worker_info() for c in clients}  # WorkerError names an unreachable address
    plan = make_plan(spec, clients, list(infos.values()), partitioner, objective, concurrency, context, dtype)
    by_addr = {c.address: c for c in clients}
    ordered = [by_addr[st.device] for st in plan.stages]
    for c in clients:
        if c not in ordered:
            log.info("worker %s is left out by the plan", c.address)
            c.close()
    n = len(plan.stages)
    codecs = _codec_list("raw" if compression == "auto" else compression, n)  # auto: decided once wired
    engines = [engine] * n if isinstance(engine, str) else list(engine)
    if len(engines) != n:
        raise ValueError(f"engine lists {len(engines)} engines but the plan has {n} stages")
    _check_memory(spec, plan, infos, dtype)

    ship = ship_weights or random_weights
    payloads = (
        [
            build_shard_payload(source, spec, st.span, e, dtype=dtype, random_weights=random_weights)
            for st, e in zip(plan.stages, engines)
        ]
        if ship
        else [None] * n
    )
    bar = _progress(sum(p.nbytes for p in payloads if p is not None), progress)

    def load(i: int) -> None:
        st, c, e, p = plan.stages[i], ordered[i], engines[i], payloads[i]
        req = pb.LoadShardRequest(
            start=st.span.start,
            end=st.span.end,
            dtype=dtype,
            engine=e,
            stage_index=i,
            random_weights=random_weights,
            seed=seed,
        )
        if p is None:
            req.model_path = source
        else:
            req.config_sha256 = c.upload_blob(p.config, bar)
            if p.weights is not None:
                req.weights_sha256 = c.upload_blob(p.weights, bar)
            if p.onnx is not None:
                req.onnx_sha256 = c.upload_blob(p.onnx, bar)
        reply = c.call("LoadShard", req, timeout=600)
        log.info("stage %d %s on %s loaded in %.2fs", i, st.span, c.address, reply.load_s)

    try:
        with ThreadPoolExecutor(max_workers=min(8, n)) as pool:  # workers load their shards in parallel
            for f in [pool.submit(load, i) for i in range(n)]:
                f.result()
    finally:
        if bar is not None:
            bar.close()
    for i, c in enumerate(ordered):
        nxt = ordered[i + 1].data_address if i + 1 < n else ""
        c.call("Connect", pb.ConnectRequest(next_address=nxt, codec=codecs[i], group_size=group_size))
    stages = tuple(
        StagePlan(
            device=st.device,
            span=st.span,
            memory_bytes=st.memory_bytes,
            predicted_s=st.predicted_s,
            codec=codecs[i],
            address=ordered[i].address,
        )
        for i, st in enumerate(plan.stages)
    )
    return Plan(
        stages,
        plan.partitioner,
        plan.objective,
        plan.predicted_latency_s,
        plan.predicted_tokens_per_s,
        plan.bottleneck_s,
        plan.solve_s,
    ), ordered


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="shipping shards", leave=False)
