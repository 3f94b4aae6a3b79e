"""Frozen dataclasses shared by every layer of hyperlane_lab.

Conventions: layer spans are half-open ``[start, end)``; sizes are bytes, times are seconds,
rates are per second (FLOP/s, B/s) unless a field name says otherwise. Every constructor
validates its inputs and raises ``ValueError`` saying what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "DeviceProfile",
    "EventKind",
    "LayerSpan",
    "LinkProfile",
    "ModelProfile",
    "Plan",
    "SamplingParams",
    "StagePlan",
    "TraceEvent",
    "WorkerInfo",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True, order=True)
class LayerSpan:
    """Decoder layers ``[start, end)`` owned by one pipeline stage."""

    start: int
    end: int

    def __post_init__(self) -> None:
        _require(
            isinstance(self.start, int) and isinstance(self.end, int),
            f"LayerSpan bounds must be ints, got {self.start!r}, {self.end!r}",
        )
        _require(
            0 <= self.start < self.end,
            f"LayerSpan [{self.start}, {self.end}) is empty or negative; need 0 <= start < end",
        )

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def layers(self) -> range:
        return range(self.start, self.end)

    def check_within(self, n_layers: int) -> None:
        """Raise if the span does not fit a model of ``n_layers`` layers."""
        _require(
            self.end <= n_layers,
            f"layer span [{self.start}, {self.end}) is out of range for a model with {n_layers} layers; "
            f"use spans within [0, {n_layers})",
        )

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    @staticmethod
    def split_uniform(n_layers: int, n_stages: int) -> tuple[LayerSpan, ...]:
        """Contiguous spans with layer counts differing by at most one (earlier stages get more)."""
        _require(n_stages >= 1, f"need at least one stage, got {n_stages}")
        _require(
            n_stages <= n_layers,
            f"cannot split {n_layers} layers into {n_stages} stages; use at most {n_layers} stages",
        )
        base, extra = divmod(n_layers, n_stages)
        spans, start = [], 0
        for i in range(n_stages):
            end = start + base + (1 if i < extra else 0)
            spans.append(LayerSpan(start, end))
            start = end
        return tuple(spans)


@dataclass(frozen=True)
class SamplingParams:
    """How the last stage turns logits into the next token. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self) -> None:
        _require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _require(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------- planning profiles


@dataclass(frozen=True)
class DeviceProfile:
    """What a partitioner knows about one device (a catalog card, a profiled worker, a what-if)."""

    name: str
    memory_bytes: int  # usable device memory
    flops: float  # dense fp16/bf16 matmul throughput, FLOP/s
    mem_bw: float  # memory bandwidth, B/s
    layer_decode_s: float | None = None  # measured time of one decoder layer, batch-1 decode
    layer_prefill_s_per_token: float | None = None  # measured prefill time per token per layer
    address: str | None = None  # host:port of the worker, when it is a real one

    def __post_init__(self) -> None:
        _require(bool(self.name), "DeviceProfile needs a non-empty name")
        _require(self.memory_bytes > 0, f"device {self.name!r}: memory_bytes must be > 0")
        _require(self.flops > 0, f"device {self.name!r}: flops must be > 0")
        _require(self.mem_bw > 0, f"device {self.name!r}: mem_bw must be > 0")
        for label, value in (
            ("layer_decode_s", self.layer_decode_s),
            ("layer_prefill_s_per_token", self.layer_prefill_s_per_token),
        ):
            _require(value is None or value > 0, f"device {self.name!r}: {label} must be > 0 or None")


@dataclass(frozen=True)
class LinkProfile:
    """A network hop: time(bytes) = latency_s + bytes / bandwidth."""

    latency_s: float
    bandwidth: float  # B/s

    def __post_init__(self) -> None:
        _require(self.latency_s >= 0, f"link latency must be >= 0, got {self.latency_s}")
        _require(self.bandwidth > 0, f"link bandwidth must be > 0, got {self.bandwidth}")

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class ModelProfile:
    """Per-layer costs of a decoder model, enough to plan without weights."""

    name: str
    n_layers: int
    layer_flops_per_token: tuple[
        float, ...
    ]  # forward FLOPs of each layer for one token (excl. attention over context)
    layer_weight_bytes: tuple[int, ...]  # weight bytes of each layer at the plan's dtype
    kv_bytes_per_token: int  # K+V bytes one layer stores for one token
    act_bytes_per_token: int  # hidden-state bytes crossing a stage boundary per token (fp16)
    embed_bytes: int  # embedding table (first stage)
    head_bytes: int  # final norm + LM head (last stage)
    head_flops_per_token: float  # LM head FLOPs per token
    attn_flops_per_token_per_ctx: float = 0.0  # extra attention FLOPs per token per context token per layer
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        _require(self.n_layers >= 1, f"model {self.name!r}: n_layers must be >= 1")
        _require(
            len(self.layer_flops_per_token) == self.n_layers
            and len(self.layer_weight_bytes) == self.n_layers,
            f"model {self.name!r}: per-layer tuples must have n_layers={self.n_layers} entries",
        )
        _require(
            all(f >= 0 for f in self.layer_flops_per_token) and all(b >= 0 for b in self.layer_weight_bytes),
            f"model {self.name!r}: per-layer costs must be >= 0",
        )
        _require(
            self.kv_bytes_per_token >= 0 and self.act_bytes_per_token > 0, f"model {self.name!r}: bad sizes"
        )


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan: which device runs which layers, and what is predicted for it."""

    device: str
    span: LayerSpan
    memory_bytes: int = 0  # predicted memory use (weights + KV + activations + headroom)
    predicted_s: float = 0.0  # predicted time of one decode step of this stage
    codec: str = "fp16"  # codec of the boundary leaving this stage
    address: str | None = None  # worker address, once bound to a real worker

    def __post_init__(self) -> None:
        _require(bool(self.device), "StagePlan needs a device name")
        _require(self.memory_bytes >= 0 and self.predicted_s >= 0, "StagePlan predictions must be >= 0")


@dataclass(frozen=True)
class Plan:
    """Ordered stages covering layers ``[0, n_layers)`` contiguously."""

    stages: tuple[StagePlan, ...]
    partitioner: str = "uniform"
    objective: str = "latency"
    predicted_latency_s: float = 0.0  # batch-1 decode time per token
    predicted_tokens_per_s: float = 0.0  # throughput at the plan's concurrency
    bottleneck_s: float = 0.0  # slowest stage (incl. its outgoing link)
    solve_s: float = 0.0

    def __post_init__(self) -> None:
        _require(len(self.stages) >= 1, "a Plan needs at least one stage")
        expected = 0
        for i, st in enumerate(self.stages):
            _require(
                st.span.start == expected,
                f"plan stage {i} starts at layer {st.span.start}, expected {expected}: spans must be contiguous",
            )
            expected = st.span.end

    @property
    def n_layers(self) -> int:
        return self.stages[-1].span.end

    @property
    def spans(self) -> tuple[LayerSpan, ...]:
        return tuple(s.span for s in self.stages)


# ---------------------------------------------------------------- traces


class EventKind(str, Enum):
    """What a stage was doing during a trace event."""

    RECEIVE = "receive"
    DECODE = "decode"  # dequantize / unpack an incoming payload
    COMPUTE = "compute"
    QUANTIZE = "quantize"
    SEND = "send"
    QUEUE = "queue"  # waiting for a free engine
    SAMPLE = "sample"
    LAUNCH = "launch"  # CUDA workers: host staging and enqueueing of a step


@dataclass(frozen=True)
class TraceEvent:
    """One interval on one stage's lane. Times are seconds on the client's clock."""

    stage: int
    kind: EventKind
    start: float
    end: float
    session: str = ""
    step: int = 0  # 0 = prefill, k = k-th decode step
    nbytes: int = 0  # payload bytes (receive/send)
    tokens: int = 0  # tokens processed (compute)
    source: str = "measured"  # "measured" or "simulated"

    def __post_init__(self) -> None:
        _require(self.stage >= 0, f"trace stage must be >= 0, got {self.stage}")
        _require(self.end >= self.start, f"trace event ends before it starts ({self.start} > {self.end})")

    @property
    def duration(self) -> float:
        return self.end - self.start


# ---------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as discovered (mDNS TXT) or asked (gRPC Info)."""

    worker_id: str
    host: str
    grpc_port: int
    data_port: int
    device_kind: str = "cpu"  # "cpu" | "cuda"
    gpu_name: str = ""
    total_memory: int = 0  # bytes
    free_memory: int = 0  # bytes
    compute_capability: str = ""
    host_ram: int = 0  # bytes
    flops: float = 0.0  # measured matmul FLOP/s, 0 until profiled
    mem_bw: float = 0.0  # measured memory B/s, 0 until profiled
    shard_loaded: bool = False
    auth_required: bool = False
    protocol_version: int = 1
    device: str = "cpu"  # torch device string on the worker, e.g. "cuda:0"

    def __post_init__(self) -> None:
        _require(bool(self.worker_id), "WorkerInfo needs a worker_id")
        _require(0 < self.grpc_port < 65536, f"worker {self.worker_id}: bad grpc port {self.grpc_port}")
        _require(0 <= self.data_port < 65536, f"worker {self.worker_id}: bad data port {self.data_port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"
