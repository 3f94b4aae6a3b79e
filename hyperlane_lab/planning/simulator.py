"""Discrete-event simulation of a pipeline: pure, deterministic, emitting runtime-style traces.

The ring (same model as ``planning.table``): every step of a micro-batch goes
client →hop 0→ stage 0 →hop 1→ … → stage p−1 →hop p→ client; the last stage samples, the client
forwards the token to stage 0 for the next step. Step 0 is the prefill, steps 1..n are decode.

Servers: each stage serves one micro-batch at a time, FIFO. Each hop is a FIFO server for the
serialization time (payload / bandwidth) followed by a pure delay (latency) during which the link
can already push the next payload. The client takes no time. All m micro-batches are submitted at
t = 0 (seq0 first). Arrivals are processed in time order (ties: lower sequence, then step, then
prompt chunk, then position), so a FIFO server starts a job at max(arrival, free) — exact and
deterministic.

Decode steps all take the same time (the cost model's step at the plan's context); what varies
is queueing. Trace lanes are stages: stage compute is COMPUTE (and QUEUE while waiting for the
engine), a hop leaving stage i is SEND on lane i (serialization + latency), the client's hop into
stage 0 is RECEIVE on lane 0.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from hyperlane_lab.planning.cost import CLIENT, Links, codec_ratio, hop_bytes, stage_decode_s, stage_prefill_s
from hyperlane_lab.planning.table import PlanOptions
from hyperlane_lab.types import DeviceProfile, EventKind, LinkProfile, ModelProfile, Plan, TraceEvent

__all__ = ["PipelineTimes", "SimResult", "SimSummary", "pipeline_times", "simulate", "simulate_plan"]


@dataclass(frozen=True)
class PipelineTimes:
    """Service times of one micro-batch on every server of the ring (p stages, p+1 hops)."""

    prefill_s: tuple[float, ...]  # per stage
    decode_s: tuple[float, ...]  # per stage, one step
    hop_latency_s: tuple[float, ...]  # per hop: client→0, 0→1, …, p−1→client
    hop_prefill_ser_s: tuple[float, ...]
    hop_decode_ser_s: tuple[float, ...]
    hop_prefill_bytes: tuple[int, ...] | None = None  # for the trace only
    hop_decode_bytes: tuple[int, ...] | None = None
    prefill_tokens: int = 1  # prompt tokens per sequence (trace only)
    batch: int = 1  # sequences per micro-batch

    def __post_init__(self) -> None:
        p = len(self.prefill_s)
        if p < 1 or len(self.decode_s) != p:
            raise ValueError(
                f"need one prefill and one decode time per stage, got {p} and {len(self.decode_s)}"
            )
        for name in ("hop_latency_s", "hop_prefill_ser_s", "hop_decode_ser_s"):
            if len(getattr(self, name)) != p + 1:
                raise ValueError(f"{name} needs p+1 = {p + 1} entries (client→first … last→client)")
        values = [
            *self.prefill_s,
            *self.decode_s,
            *self.hop_latency_s,
            *self.hop_prefill_ser_s,
            *self.hop_decode_ser_s,
        ]
        if any(v < 0 for v in values):
            raise ValueError("service times must be >= 0")

    @property
    def n_stages(self) -> int:
        return len(self.prefill_s)

    @staticmethod
    def equal_stages(n_stages: int, prefill_s: float, decode_s: float, hop_s: float = 0.0) -> PipelineTimes:
        """p identical stages; hops have latency ``hop_s`` and no serialization time."""
        zeros = (0.0,) * (n_stages + 1)
        return PipelineTimes(
            (prefill_s,) * n_stages, (decode_s,) * n_stages, (hop_s,) * (n_stages + 1), zeros, zeros
        )


@dataclass(frozen=True)
class SimSummary:
    makespan_s: float  # first submission to the last token's arrival at the client
    tokens_per_s: float  # all generated tokens (first token of each prefill included) / makespan
    decode_tokens_per_s: float  # steady state: decode completions after the first round / their time
    latency_per_token_s: float  # mean decode time per token of one sequence (inter-token latency)
    ttft_s: float  # mean time to first token (prefill done and back at the client)
    busy_fraction: tuple[float, ...]  # per stage: compute time / makespan
    bubble_fraction: tuple[float, ...]  # per stage: 1 − busy (idle share of the makespan)


@dataclass(frozen=True)
class SimResult:
    events: tuple[TraceEvent, ...]
    summary: SimSummary


def simulate(
    times: PipelineTimes, concurrency: int = 1, decode_steps: int = 0, prefill_chunks: int = 1
) -> SimResult:
    """Run ``concurrency`` micro-batches through prefill and ``decode_steps`` decode steps each.

    ``prefill_chunks`` = k > 1: each prompt goes down the pipeline as k chunks (the runtime's
    ``prefill_chunk``), each taking 1/k of every stage's prefill time and of each hop's prefill
    serialization (the latency in full); only the last chunk's token goes back to the client. (Later
    chunks attend to a longer prefix; at prefill sizes the products dominate, so 1/k each. Short
    chunks are memory-bound instead: ``simulate_plan`` passes times that give each chunk its own.)"""
    if concurrency < 1 or decode_steps < 0 or prefill_chunks < 1:
        raise ValueError(
            "need concurrency >= 1, decode_steps >= 0 and prefill_chunks >= 1, got "
            f"{concurrency}, {decode_steps}, {prefill_chunks}"
        )
    p, k = times.n_stages, prefill_chunks
    last_pos = 2 * p  # positions: 2i = hop i, 2i+1 = stage i, 2p = hop p (to the client)
    free = [0.0] * (2 * p + 1)
    events: list[TraceEvent] = []
    busy = [0.0] * p
    done: dict[tuple[int, int], float] = {}  # (seq, step) -> arrival of its token at the client
    # (time, seq, step, chunk, position); decode steps are chunk 0 of 1
    heap = [(0.0, s, 0, c, 0) for s in range(concurrency) for c in range(k)]
    heapq.heapify(heap)
    while heap:
        t, seq, step, chunk, pos = heapq.heappop(heap)
        session = f"seq{seq}"
        start = max(t, free[pos])
        share = 1.0 / k if step == 0 else 1.0  # of the step's service and serialization times
        if pos % 2:  # a stage
            i = pos // 2
            service = (times.prefill_s[i] if step == 0 else times.decode_s[i]) * share
            end = start + service
            if start > t:
                events.append(TraceEvent(i, EventKind.QUEUE, t, start, session, step, source="simulated"))
            tokens = times.batch * (times.prefill_tokens if step == 0 else 1)
            events.append(
                TraceEvent(
                    i, EventKind.COMPUTE, start, end, session, step, tokens=round(tokens * share),
                    source="simulated",
                )
            )  # fmt: skip
            busy[i] += service
            free[pos] = end
            if step > 0 or chunk == k - 1 or pos + 1 < last_pos:  # a chunk's hidden ends at the last stage
                heapq.heappush(heap, (end, seq, step, chunk, pos + 1))
            continue
        h = pos // 2  # a hop
        frac = share if h < p else 1.0  # the hop to the client carries one token per sequence
        ser = (times.hop_prefill_ser_s[h] if step == 0 else times.hop_decode_ser_s[h]) * frac
        sizes = times.hop_prefill_bytes if step == 0 else times.hop_decode_bytes
        free[pos] = start + ser
        arrive = start + ser + times.hop_latency_s[h]
        kind, lane = (EventKind.RECEIVE, 0) if h == 0 else (EventKind.SEND, h - 1)
        nbytes = round(sizes[h] * frac) if sizes else 0
        events.append(TraceEvent(lane, kind, start, arrive, session, step, nbytes=nbytes, source="simulated"))
        if pos < last_pos:
            heapq.heappush(heap, (arrive, seq, step, chunk, pos + 1))
        else:
            done[(seq, step)] = arrive
            if step < decode_steps:
                heapq.heappush(heap, (arrive, seq, step + 1, 0, 0))
    return SimResult(tuple(events), _summarize(times, concurrency, decode_steps, done, busy))


def _summarize(
    times: PipelineTimes, m: int, steps: int, done: dict[tuple[int, int], float], busy: list[float]
) -> SimSummary:
    makespan = max(done.values())
    b = times.batch
    decode_done = sorted(t for (_, step), t in done.items() if step > 0)
    n = len(decode_done)
    if n > m and decode_done[-1] > decode_done[m - 1]:
        steady = b * (n - m) / (decode_done[-1] - decode_done[m - 1])
    else:
        steady = b * n / makespan if n else 0.0
    if steps:
        per_seq = [(done[(s, steps)] - done[(s, 0)]) / steps for s in range(m)]
        latency = sum(per_seq) / m
    else:
        latency = 0.0
    busy_frac = tuple(x / makespan if makespan > 0 else 0.0 for x in busy)
    return SimSummary(
        makespan_s=makespan,
        tokens_per_s=b * len(done) / makespan if makespan > 0 else 0.0,
        decode_tokens_per_s=steady,
        latency_per_token_s=latency,
        ttft_s=sum(done[(s, 0)] for s in range(m)) / m,
        busy_fraction=busy_frac,
        bubble_fraction=tuple(1.0 - x for x in busy_frac),
    )


def pipeline_times(
    plan: Plan,
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    links: Links | LinkProfile,
    options: PlanOptions | None = None,
    prompt_tokens: int = 128,
) -> PipelineTimes:
    """Service times of ``plan``'s servers from the cost model (decode at ``options.context``)."""
    o = options or PlanOptions()
    by_name = {d.name: d for d in devices}
    missing = [s.device for s in plan.stages if s.device not in by_name]
    if missing:
        raise ValueError(f"plan uses devices {missing} that are not in the device list {sorted(by_name)}")
    lk = Links.of(links)
    ratio = codec_ratio(o.codec, o.codec_ratios)
    names = [CLIENT, *(s.device for s in plan.stages), CLIENT]
    devs = [by_name[s.device] for s in plan.stages]
    pre = tuple(
        stage_prefill_s(model, d, s.span, o.batch, prompt_tokens, o.calibrated)
        for d, s in zip(devs, plan.stages)
    )
    dec = tuple(
        stage_decode_s(model, d, s.span, o.batch, o.context, o.calibrated) for d, s in zip(devs, plan.stages)
    )
    lat, pser, dser, pbytes, dbytes = [], [], [], [], []
    for h, (a, b) in enumerate(itertools.pairwise(names)):
        link = lk.between(a, b)
        client_hop = h in (0, len(names) - 2)
        r = 1.0 if client_hop else ratio
        pb = hop_bytes(model, o.batch * prompt_tokens, h == 0, h == len(names) - 2)
        if h == len(names) - 2:  # the last stage sends back one sampled token per sequence
            pb = hop_bytes(model, o.batch, False, True)
        db = hop_bytes(model, o.batch, h == 0, h == len(names) - 2)
        lat.append(link.latency_s)
        pser.append(pb * r / link.bandwidth)
        dser.append(db * r / link.bandwidth)
        pbytes.append(int(pb * r))
        dbytes.append(int(db * r))
    return PipelineTimes(
        pre, dec, tuple(lat), tuple(pser), tuple(dser), tuple(pbytes), tuple(dbytes), prompt_tokens, o.batch
    )


def simulate_plan(
    plan: Plan,
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    links: Links | LinkProfile,
    options: PlanOptions | None = None,
    prompt_tokens: int = 128,
    decode_steps: int = 32,
    prefill_chunks: int = 1,
) -> SimResult:
    """Simulate ``plan`` at ``options.concurrency`` micro-batches in flight (prompts in
    ``prefill_chunks`` chunks, as ``AutoDistributedModel.prefill_chunk`` sends them).

    A chunk costs what the cost model says for its own ceil(prompt_tokens / k) tokens, not 1/k of
    the whole prompt: every chunk reads the stage's weights again, so short chunks are
    memory-bound and chunking a short prompt makes its first token later, not earlier."""
    if not 1 <= prefill_chunks <= prompt_tokens:
        raise ValueError(f"need 1 <= prefill_chunks <= prompt_tokens ({prompt_tokens}), got {prefill_chunks}")
    o = options or PlanOptions()
    times = pipeline_times(plan, model, devices, links, o, prompt_tokens)
    if prefill_chunks > 1:  # ``simulate`` gives each chunk 1/k of these: k x one chunk's times
        k = prefill_chunks
        one = pipeline_times(plan, model, devices, links, o, -(-prompt_tokens // k))
        times = dataclasses.replace(
            times,
            prefill_s=tuple(k * t for t in one.prefill_s),
            # the hop back to the client carries one token per sequence, chunked or not
            hop_prefill_ser_s=(*(k * t for t in one.hop_prefill_ser_s[:-1]), times.hop_prefill_ser_s[-1]),
        )
    return simulate(times, o.concurrency, decode_steps, prefill_chunks)
