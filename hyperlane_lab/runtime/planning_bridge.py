"""Planning over real workers: profile each worker (Profile RPC), turn the measurements into
DeviceProfiles, and run a partitioner from ``hyperlane_lab.planning`` by name."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import parse_dtype
from hyperlane_lab.runtime.control import WorkerClient
from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
from hyperlane_lab.types import DeviceProfile, LinkProfile, Plan

__all__ = ["DEFAULT_LINK", "plan_for_workers", "profile_workers"]

log = logging.getLogger(__name__)
DEFAULT_LINK = LinkProfile(latency_s=0.3e-3, bandwidth=1e9 / 8)  # 1 Gbit/s Ethernet


def profile_workers(
    clients: Sequence[WorkerClient], spec: ModelSpec, dtype: str, context: int = 512
) -> list[DeviceProfile]:
    """Measure every worker in parallel; one DeviceProfile per worker, named by its address."""
    cfg = json.dumps(spec.to_hf_config_dict())

    def one(c: WorkerClient) -> DeviceProfile:
        info = c.worker_info()
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

    with ThreadPoolExecutor(max_workers=min(8, len(clients))) as pool:
        return list(pool.map(one, clients))


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
    devices = profile_workers(clients, spec, dtype, context=min(context, 512))
    profile = model_profile_from_spec(spec, dtype_bytes=parse_dtype(dtype).itemsize)
    options = PlanOptions(
        objective=objective, concurrency=concurrency, context=context, codec="fp16", headroom_bytes=64 * 2**20
    )
    return part(profile, tuple(devices), Links(link), options)
