"""The discrete-event simulator against closed-form pipeline results."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperlane_lab.planning import (
    PARTITIONERS,
    PipelineTimes,
    PlanOptions,
    preset_profile,
    simulate,
    simulate_plan,
)
from hyperlane_lab.planning.catalog import device_from_catalog
from hyperlane_lab.types import EventKind, LinkProfile


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 16])
def test_gpipe_bubble_for_one_pass_of_m_microbatches(p: int, m: int) -> None:
    # GPipe setting: m micro-batches pass once (forward only = our prefill step, no decode) through
    # p equal stages with free communication; makespan (m+p-1)·t, each stage busy m·t.
    t = 0.25
    res = simulate(PipelineTimes.equal_stages(p, prefill_s=t, decode_s=1.0), concurrency=m, decode_steps=0)
    assert res.summary.makespan_s == pytest.approx((m + p - 1) * t, rel=1e-12)
    for bubble in res.summary.bubble_fraction:
        assert bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


def _random_times(draw: st.DrawFn, p: int) -> PipelineTimes:
    ms = st.integers(1, 100).map(lambda x: x * 1e-4)
    small = st.integers(0, 20).map(lambda x: x * 1e-4)
    return PipelineTimes(
        prefill_s=tuple(draw(ms) for _ in range(p)),
        decode_s=tuple(draw(ms) for _ in range(p)),
        hop_latency_s=tuple(draw(small) for _ in range(p + 1)),
        hop_prefill_ser_s=tuple(draw(small) for _ in range(p + 1)),
        hop_decode_ser_s=tuple(draw(small) for _ in range(p + 1)),
    )


@st.composite
def rings(draw: st.DrawFn) -> tuple[PipelineTimes, int]:
    p = draw(st.integers(1, 5))
    return _random_times(draw, p), draw(st.integers(1, 8))


@settings(deadline=None, max_examples=60, derandomize=True)
@given(rings())
def test_steady_state_matches_cycle_time_formula(ring: tuple[PipelineTimes, int]) -> None:
    times, m = ring
    R = sum(times.decode_s) + sum(times.hop_latency_s) + sum(times.hop_decode_ser_s)
    slowest = max([*times.decode_s, *times.hop_decode_ser_s])
    res = simulate(times, concurrency=m, decode_steps=150)
    cycle = max(R / m, slowest)
    assert res.summary.decode_tokens_per_s == pytest.approx(1.0 / cycle, rel=5e-3)
    if m == 1:  # alone in the ring: every step takes exactly R
        assert res.summary.latency_per_token_s == pytest.approx(R, rel=1e-9)


def test_large_m_throughput_is_one_over_slowest_stage() -> None:
    times = PipelineTimes(
        prefill_s=(0.01, 0.02, 0.01),
        decode_s=(0.003, 0.005, 0.002),
        hop_latency_s=(0.001,) * 4,
        hop_prefill_ser_s=(0.0,) * 4,
        hop_decode_ser_s=(0.0001,) * 4,
        batch=2,
    )
    res = simulate(times, concurrency=32, decode_steps=60)
    assert res.summary.decode_tokens_per_s == pytest.approx(2 / 0.005, rel=1e-3)
    busy = res.summary.busy_fraction
    assert busy[1] == max(busy) and busy[1] > 0.9


@settings(deadline=None, max_examples=30, derandomize=True)
@given(rings(), st.integers(0, 6))
def test_trace_is_consistent(ring: tuple[PipelineTimes, int], steps: int) -> None:
    times, m = ring
    res = simulate(times, concurrency=m, decode_steps=steps)
    p = times.n_stages
    computes = defaultdict(list)
    for ev in res.events:
        assert ev.source == "simulated" and 0 <= ev.stage < p and 0 <= ev.step <= steps
        if ev.kind is EventKind.COMPUTE:
            computes[ev.stage].append(ev)
    for _stage, evs in computes.items():
        assert len(evs) == m * (steps + 1)  # each sequence, each step, once
        evs.sort(key=lambda e: e.start)
        for a, b in itertools.pairwise(evs):
            assert b.start >= a.end - 1e-15  # one micro-batch at a time
    sessions = {ev.session for ev in res.events}
    assert sessions == {f"seq{i}" for i in range(m)}
    for seq in range(m):  # each step flows stage 0 -> ... -> p-1
        for step in range(steps + 1):
            starts = [
                next(e.start for e in computes[i] if e.session == f"seq{seq}" and e.step == step)
                for i in range(p)
            ]
            assert starts == sorted(starts)


def test_simulated_plan_matches_plan_predictions() -> None:
    model = preset_profile("llama-2-13b")
    devices = tuple(device_from_catalog(n, f"{n}-{i}") for i, n in enumerate(["rtx4090", "rtx3090", "a5000"]))
    links = LinkProfile(2e-4, 1e9 / 8)
    for m in (1, 3, 12):
        opts = PlanOptions(objective="throughput", concurrency=m, context=1024)
        plan = PARTITIONERS.get("dp")(model, devices, links, opts)
        res = simulate_plan(plan, model, devices, links, opts, prompt_tokens=32, decode_steps=80)
        assert res.summary.decode_tokens_per_s == pytest.approx(plan.predicted_tokens_per_s, rel=0.02)
        if m == 1:
            assert res.summary.latency_per_token_s == pytest.approx(plan.predicted_latency_s, rel=1e-9)


def _flow_shop_makespan(services: list[float], jobs: int) -> float:
    """Brute force: ``jobs`` identical jobs through FIFO servers in series, all released at 0."""
    free = [0.0] * len(services)
    end = 0.0
    for _ in range(jobs):
        t = 0.0
        for i, s in enumerate(services):
            t = max(t, free[i]) + s
            free[i] = t
        end = t
    return end


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_chunked_prefill_is_a_flow_shop_of_k_chunks(k):
    """A prompt in k chunks: each chunk takes 1/k of every stage's prefill and of each inter-stage
    hop's serialization; the time to first token equals the flow-shop makespan of k identical
    chunks (brute force), plus the one hop of the token back to the client."""
    pre, ser = (0.03, 0.05, 0.02), (0.004, 0.012, 0.006, 0.001)
    times = PipelineTimes(pre, (0.001,) * 3, (0.0,) * 4, ser, (0.0,) * 4)
    r = simulate(times, prefill_chunks=k)
    chain = [ser[0] / k, pre[0] / k, ser[1] / k, pre[1] / k, ser[2] / k, pre[2] / k]
    assert r.summary.ttft_s == pytest.approx(_flow_shop_makespan(chain, k) + ser[3])
    if k > 1:  # chunks overlap the stages: faster than one frame
        assert r.summary.ttft_s < simulate(times).summary.ttft_s
    sends = [e for e in r.events if e.kind == EventKind.SEND and e.stage == 2]
    assert len(sends) == 1  # only the last chunk's token goes back to the client
    # equal stages, no hops: T/k * (k + p - 1)
    eq = simulate(PipelineTimes.equal_stages(4, 0.08, 0.01), prefill_chunks=k, decode_steps=3)
    assert eq.summary.ttft_s == pytest.approx(0.08 / k * (k + 3))


def test_chunked_prefill_rejects_zero_chunks():
    with pytest.raises(ValueError, match="prefill_chunks >= 1"):
        simulate(PipelineTimes.equal_stages(2, 0.1, 0.01), prefill_chunks=0)


def test_simulated_plan_charges_each_chunk_its_own_weight_reads() -> None:
    """simulate_plan: a chunk costs the cost model's time for its own tokens (each chunk reads the
    weights again): chunking a short, memory-bound prompt delays its first token, chunking a long,
    compute-bound one brings it forward."""
    model = preset_profile("llama-2-13b")
    devices = tuple(device_from_catalog(n, f"{n}-{i}") for i, n in enumerate(["rtx4090", "rtx3090", "a5000"]))
    links = LinkProfile(2e-4, 1e9 / 8)
    opts = PlanOptions(context=4096)
    plan = PARTITIONERS.get("dp")(model, devices, links, opts)

    def ttft(prompt: int, k: int) -> float:
        return simulate_plan(plan, model, devices, links, opts, prompt, 0, prefill_chunks=k).summary.ttft_s

    assert ttft(16, 8) > ttft(16, 1)
    assert ttft(4096, 4) < ttft(4096, 1)
    with pytest.raises(ValueError, match="prefill_chunks <= prompt_tokens"):
        ttft(4, 8)
