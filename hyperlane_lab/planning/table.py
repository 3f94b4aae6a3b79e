"""Plan options, the precomputed cost table every partitioner shares, and plan evaluation.

Pipeline model (all partitioners, the ILP and the simulator agree on it). A decode step of one
micro-batch (``batch`` sequences) goes around a ring: client → stage 0 → … → stage p−1 → client,
over p+1 hops. Each stage is a FIFO server with service time ``s_i`` (its decode step); each hop
is a FIFO server with service time ``σ_h`` = payload / bandwidth (serialization, the part that
queues) followed by a pure delay = its latency (propagation, which overlaps freely).

* Latency: one micro-batch alone in the ring needs ``R = Σ s_i + Σ (latency_h + σ_h)`` per token.
* Throughput: with ``m`` micro-batches circulating, the ring is a closed cyclic network of
  deterministic FIFO servers (a timed event graph). Its cycle time — seconds between two
  completions of a micro-batch step in steady state — is the largest circuit mean
  ``λ = max(R / m, max_i s_i, max_h σ_h)``: the big circuit holds m tokens and weighs R; each
  server's self-loop holds one token and weighs its service time. Tokens/s = batch / λ.
  m = 1 gives λ = R (latency); m → ∞ gives the classic ``1 / slowest stage``.

The latency objective minimizes R; the throughput objective minimizes λ.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hyperlane_lab.planning.cost import (
    ACT_WORKSPACE_FACTOR,
    CLIENT,
    CODEC_RATIOS,
    Links,
    codec_ratio,
    embed_s,
    head_s,
    hop_bytes,
    layer_decode_s,
    link_s,
    link_serialization_s,
    stage_memory,
)
from hyperlane_lab.types import DeviceProfile, LayerSpan, ModelProfile

__all__ = ["OBJECTIVES", "CostTable", "Evaluation", "PlanOptions", "build_table", "evaluate"]

OBJECTIVES = ("latency", "throughput")
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PlanOptions:
    """What to optimize and under which workload."""

    objective: str = "latency"  # "latency" (min R) | "throughput" (min λ)
    concurrency: int = 1  # m: micro-batches in flight (each holds its own KV cache)
    batch: int = 1  # sequences per micro-batch
    context: int = 4096  # tokens of KV cache reserved per sequence; decode is costed at this context
    headroom_bytes: int = 512 * 2**20  # per stage: CUDA context, allocator slack
    allow_skip: bool = False  # fixed-order partitioners: may a device get no layers (and leave the ring)?
    codec: str = "fp16"  # boundary codec between stages
    codec_ratios: Mapping[str, float] = field(
        default_factory=lambda: CODEC_RATIOS, hash=False
    )  # codec -> wire ratio
    calibrated: bool = True  # use measured layer times of DeviceProfile when present
    prefill_tokens: int | None = None  # tokens one forward pass may carry per sequence (None = context)
    ilp_time_limit_s: float = 60.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; valid objectives: {', '.join(OBJECTIVES)}"
            )
        for name in ("concurrency", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0 or self.headroom_bytes < 0:
            raise ValueError("context and headroom_bytes must be >= 0")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1 or None, got {self.prefill_tokens}")
        codec_ratio(self.codec, self.codec_ratios)  # validates the codec name

    @property
    def kv_tokens(self) -> int:
        """Cached tokens per layer: every resident sequence at full context."""
        return self.concurrency * self.batch * self.context

    @property
    def act_tokens(self) -> int:
        return self.batch * max(1, self.prefill_tokens if self.prefill_tokens is not None else self.context)


@dataclass(frozen=True, eq=False)
class CostTable:
    """Everything a solver needs, as arrays. Devices are indexed 0..D−1; index D is the client.

    stage_s[k, j, e]: decode-step time of device k running layers [j, e) (inf if e <= j);
    need[j, e]: bytes a stage [j, e) needs (same on every device); fits[k, j, e]: need <= memory.
    link_time[a, b] = latency + σ of one decode payload from a to b; link_ser[a, b] = σ alone.
    """

    model: ModelProfile
    devices: tuple[DeviceProfile, ...]
    links: Links
    options: PlanOptions
    stage_s: F64
    need: I64
    fits: npt.NDArray[np.bool_]
    link_time: F64
    link_ser: F64

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @property
    def client(self) -> int:
        return len(self.devices)

    def service(self) -> F64:
        """stage_s with memory-infeasible spans set to inf."""
        return np.where(self.fits, self.stage_s, np.inf)

    def memory_of(self, span: LayerSpan) -> int:
        o = self.options
        return stage_memory(self.model, span, o.kv_tokens, o.act_tokens, o.headroom_bytes).total


def build_table(
    model: ModelProfile, devices: Sequence[DeviceProfile], links: Links, options: PlanOptions
) -> CostTable:
    devs = tuple(devices)
    if not devs:
        raise ValueError("no devices to plan for; give at least one device")
    names = [d.name for d in devs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"device names must be unique, repeated: {', '.join(dupes)}; rename them (e.g. 'gpu#2')"
        )
    if CLIENT in names:
        raise ValueError(f"{CLIENT!r} is reserved for the client end of the ring; rename that device")
    L, D, o = model.n_layers, len(devs), options

    # stage times from per-layer prefix sums: stage_s[k, j, e] = P[k, e] − P[k, j] (+ embed, + head)
    per_layer = np.array(
        [[layer_decode_s(model, i, d, o.batch, o.context, o.calibrated) for i in range(L)] for d in devs],
        dtype=np.float64,
    )
    prefix = np.concatenate([np.zeros((D, 1)), np.cumsum(per_layer, axis=1)], axis=1)  # (D, L+1)
    stage = prefix[:, None, :] - prefix[:, :, None]  # (D, L+1, L+1)
    stage[:, 0, :] += np.array([embed_s(model, d, o.batch) for d in devs])[:, None]
    stage[:, :, L] += np.array([head_s(model, d, o.batch) for d in devs])[:, None]
    upper = np.triu(np.ones((L + 1, L + 1), dtype=bool), k=1)  # j < e
    stage = np.where(upper[None], stage, np.inf)

    # memory need of [j, e): weights (+embed, +head) + KV + activations + headroom; exact in int64
    wprefix = np.concatenate([[0], np.cumsum(np.array(model.layer_weight_bytes, dtype=np.int64))])
    idx = np.arange(L + 1, dtype=np.int64)
    length = idx[None, :] - idx[:, None]
    need = wprefix[None, :] - wprefix[:, None] + length * (o.kv_tokens * model.kv_bytes_per_token)
    need = need + ACT_WORKSPACE_FACTOR * o.act_tokens * model.act_bytes_per_token + o.headroom_bytes
    need[0, :] += model.embed_bytes
    need[:, L] += model.head_bytes
    need = np.where(upper, need, 0).astype(np.int64)
    mem = np.array([d.memory_bytes for d in devs], dtype=np.int64)
    fits = upper[None] & (need[None] <= mem[:, None, None])

    ends = [*names, CLIENT]
    ratio = codec_ratio(o.codec, o.codec_ratios)
    ltime = np.full((D + 1, D + 1), np.inf)
    lser = np.full((D + 1, D + 1), np.inf)
    for a in range(D + 1):
        for b in range(D + 1):
            if a == b:
                continue
            link = links.between(ends[a], ends[b])
            nbytes = hop_bytes(model, o.batch, a == D, b == D)
            r = 1.0 if D in (a, b) else ratio
            ltime[a, b] = link_s(link, nbytes, r)
            lser[a, b] = link_serialization_s(link, nbytes, r)
    return CostTable(model, devs, links, o, stage, need, fits, ltime, lser)


@dataclass(frozen=True)
class Evaluation:
    """Predictions of one assignment: devices ``order`` run spans ``[bounds[i], bounds[i+1])``."""

    order: tuple[int, ...]
    bounds: tuple[int, ...]
    stage_s: tuple[float, ...]
    hop_s: tuple[float, ...]  # p+1 hops: client→first, …, last→client
    hop_ser_s: tuple[float, ...]
    memory: tuple[int, ...]
    available: tuple[int, ...]
    round_trip_s: float  # R
    bottleneck_s: float  # slowest server (stage or hop serialization)
    cycle_s: float  # λ = max(R/m, bottleneck)

    @property
    def feasible(self) -> bool:
        return all(n <= a for n, a in zip(self.memory, self.available))

    def objective(self, name: str) -> float:
        return self.round_trip_s if name == "latency" else self.cycle_s


def evaluate(table: CostTable, order: Sequence[int], bounds: Sequence[int]) -> Evaluation:
    """Predictions of an assignment; sums in ring order, exactly as the DP solvers do."""
    order_t, bounds_t = tuple(int(k) for k in order), tuple(int(b) for b in bounds)
    L = table.n_layers
    if len(bounds_t) != len(order_t) + 1 or bounds_t[0] != 0 or bounds_t[-1] != L:
        raise ValueError(f"bounds {bounds_t} must run 0 .. {L} with one more entry than order {order_t}")
    if len(set(order_t)) != len(order_t):
        raise ValueError(f"order {order_t} uses a device twice")
    c = table.client
    ring = [c, *order_t, c]
    hops = [float(table.link_time[a, b]) for a, b in itertools.pairwise(ring)]
    sers = [float(table.link_ser[a, b]) for a, b in itertools.pairwise(ring)]
    stages, memory = [], []
    total = hops[0]
    for i, k in enumerate(order_t):
        j, e = bounds_t[i], bounds_t[i + 1]
        s = float(table.stage_s[k, j, e])
        stages.append(s)
        memory.append(table.memory_of(LayerSpan(j, e)))
        total = total + s
        total = total + hops[i + 1]
    bottleneck = max([*stages, *sers])
    return Evaluation(
        order=order_t,
        bounds=bounds_t,
        stage_s=tuple(stages),
        hop_s=tuple(hops),
        hop_ser_s=tuple(sers),
        memory=tuple(memory),
        available=tuple(table.devices[k].memory_bytes for k in order_t),
        round_trip_s=total,
        bottleneck_s=bottleneck,
        cycle_s=max(total / table.options.concurrency, bottleneck),
    )
