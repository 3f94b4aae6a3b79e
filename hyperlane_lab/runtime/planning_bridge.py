"""Planning over real workers: profile each worker (Profile RPC), turn the measurements into
DeviceProfiles, and run a partitioner from ``hyperlane_lab.planning`` by name.

Calibration: the Profile RPC times ONE decoder layer at ``profiled_context`` cached tokens, while
the cost model reads ``DeviceProfile.layer_decode_s`` as a batch-1 step at context 0 and scales it
up to the plan's context; ``calibrate_decode`` divides out the analytic growth from 0 to
``profiled_context`` so the context is not counted twice. Workers that share hardware (CPU
workers of one host, several workers on one GPU) are profiled one at a time: measured together
they would each time the others' load.

Known gaps (bench/plan_fidelity.py measures them): a lone layer whose weights fit the last-level
cache (e.g. 25 MB layers against a 260 MB CPU L3) is timed faster than it runs inside a stage that
streams many layers; the embedding and LM head are costed analytically (roofline with the copy
bandwidth); per-hop runtime overhead (framing, thread hand-offs) is not part of the link model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import parse_dtype
from hyperlane_lab.runtime.control import WorkerClient
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.types import DeviceProfile, LinkProfile, ModelProfile, Plan

__all__ = ["DEFAULT_LINK", "calibrate_decode", "plan_for_workers", "profile_workers"]

log = logging.getLogger(__name__)
DEFAULT_LINK = LinkProfile(latency_s=0.3e-3, bandwidth=1e9 / 8)  # 1 Gbit/s Ethernet


def profile_workers(
    clients: Sequence[WorkerClient], spec: ModelSpec, dtype: str, context: int = 512
) -> list[DeviceProfile]:
    """One DeviceProfile per worker, named by its address. Workers that share hardware (CPU workers
    of one host, or one GPU) are measured one after another, so none of them times the others'
    load; distinct devices are measured in parallel."""
    cfg = json.dumps(spec.to_hf_config_dict())
    infos = {c.address: c.worker_info() for c in clients}

    def one(c: WorkerClient) -> DeviceProfile:
        info = infos[c.address]
        r = c.call(
            "Profile", pb.ProfileRequest(model_config_json=cfg, dtype=dtype, context=context), timeout=600
        )
        log.info(
            "profiled %s: %.2f TFLOP/s, %.1f GB/s, layer %.3f ms",
            c.address,
            r.flops / 1e12,
            r.mem_bw / 1e9,
            r.layer_decode_s * 1e3,
        )
        return DeviceProfile(
            name=c.address,
            memory_bytes=max(1, info.free_memory),
            flops=r.flops,
            mem_bw=r.mem_bw,
            layer_decode_s=r.layer_decode_s or None,
            layer_prefill_s_per_token=r.layer_prefill_s_per_token or None,
            address=c.address,
        )

    def shared_hardware(c: WorkerClient) -> tuple[str, str]:
        info = infos[c.address]
        return info.host, info.device if info.device_kind == "cuda" else "cpu"

    groups: dict[tuple[str, str], list[WorkerClient]] = {}
    for c in clients:
        groups.setdefault(shared_hardware(c), []).append(c)
    with ThreadPoolExecutor(max_workers=min(8, len(groups))) as pool:
        measured = pool.map(lambda group: {c.address: one(c) for c in group}, groups.values())
        by_address = {a: d for part in measured for a, d in part.items()}
    return [by_address[c.address] for c in clients]


def calibrate_decode(device: DeviceProfile, model: ModelProfile, profiled_context: int) -> DeviceProfile:
    """``device`` with its one-layer decode time, measured at ``profiled_context`` cached tokens,
    moved to the cost model's reference point (batch 1, context 0) with the analytic ratio."""
    from dataclasses import replace

    from hyperlane_lab.planning.cost import layer_decode_s

    if device.layer_decode_s is None or profiled_context <= 0:
        return device
    analytic = replace(device, layer_decode_s=None)  # the cost model's roofline for this device
    layer = max(range(model.n_layers), key=lambda i: model.layer_weight_bytes[i])
    at_profiled = layer_decode_s(model, layer, analytic, 1, profiled_context, calibrated=False)
    at_zero = layer_decode_s(model, layer, analytic, 1, 0, calibrated=False)
    if at_profiled <= 0:
        return device
    return replace(device, layer_decode_s=device.layer_decode_s * at_zero / at_profiled)


def plan_for_workers(
    spec: ModelSpec,
    clients: Sequence[WorkerClient],
    partitioner: str,
    objective: str,
    concurrency: int,
    context: int,
    dtype: str,
    link: LinkProfile = DEFAULT_LINK,
) -> Plan:
    from hyperlane_lab.planning import Links, PlanOptions, get_partitioner, model_profile_from_spec

    part = get_partitioner(partitioner)  # ValueError listing valid names before any profiling
    profiled_context = min(context, 512)
    profile = model_profile_from_spec(spec, dtype_bytes=parse_dtype(dtype).itemsize)
    devices = [
        calibrate_decode(d, profile, profiled_context)
        for d in profile_workers(clients, spec, dtype, context=profiled_context)
    ]
    options = PlanOptions(
        objective=objective, concurrency=concurrency, context=context, codec="fp16", headroom_bytes=64 * 2**20
    )
    return part(profile, tuple(devices), Links(link), options)
