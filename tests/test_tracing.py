"""hyperlane_lab.tracing: frames, bubble summaries (hand-computed and brute-force oracles), clock sync."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperlane_lab.tracing import (
    COLUMNS,
    clock_offset,
    clock_offset_bound,
    events_to_frame,
    frame_to_events,
    shift,
    summarize,
    union_length,
)
from hyperlane_lab.types import EventKind, TraceEvent

C, S, R, Q = EventKind.COMPUTE, EventKind.SEND, EventKind.RECEIVE, EventKind.QUEUE


def hand_trace() -> list[TraceEvent]:
    # stage 0: compute [0,2) and [1,3) overlap -> union [0,3); then [5,6): busy 4 s of a 10 s makespan
    # stage 1: compute [4,7): busy 3 s; the trace spans [0, 10) because of stage 1's queue event
    return [
        TraceEvent(0, C, 0.0, 2.0, session="a", step=0, tokens=3),
        TraceEvent(0, C, 1.0, 3.0, session="a", step=0, tokens=1),
        TraceEvent(0, S, 3.0, 3.5, session="a", step=0, nbytes=100),
        TraceEvent(0, C, 5.0, 6.0, session="a", step=1, tokens=1),
        TraceEvent(1, R, 3.5, 4.0, session="a", step=0, nbytes=100),
        TraceEvent(1, C, 4.0, 7.0, session="a", step=0, tokens=5),
        TraceEvent(1, S, 7.0, 8.0, session="a", step=0, nbytes=40),
        TraceEvent(1, Q, 8.0, 10.0, session="a", step=1),
    ]


def test_frame_has_one_row_per_event_and_round_trips() -> None:
    events = hand_trace()
    df = events_to_frame(events)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(events)
    assert df["kind"].tolist() == [e.kind.value for e in events]
    assert df["duration"].tolist() == pytest.approx([e.end - e.start for e in events])
    assert frame_to_events(df) == events


def test_empty_frame_keeps_columns_and_summarizes_to_nothing() -> None:
    df = events_to_frame([])
    assert list(df.columns) == list(COLUMNS)
    assert len(summarize(df)) == 0
    assert frame_to_events(df) == []


def test_frame_to_events_names_missing_columns() -> None:
    df = events_to_frame(hand_trace()).drop(columns=["kind"])
    with pytest.raises(ValueError, match="kind"):
        frame_to_events(df)


def test_summary_matches_hand_computed_oracle() -> None:
    s = summarize(hand_trace()).set_index("stage")
    assert s.loc[0, "makespan_s"] == pytest.approx(10.0)
    assert s.loc[0, "busy_pct"] == pytest.approx(40.0)
    assert s.loc[0, "bubble_pct"] == pytest.approx(60.0)
    assert s.loc[0, "tokens"] == 5
    assert s.loc[0, "tokens_per_s"] == pytest.approx(0.5)
    assert s.loc[0, "bytes_sent"] == 100  # receives are not counted as sent
    assert s.loc[0, "events"] == 4
    assert s.loc[1, "busy_pct"] == pytest.approx(30.0)
    assert s.loc[1, "bubble_pct"] == pytest.approx(70.0)
    assert s.loc[1, "bytes_sent"] == 40
    assert s.loc[1, "events"] == 4
    # a frame gives the same summary as the event list
    assert summarize(events_to_frame(hand_trace())).equals(summarize(hand_trace()))


def test_summary_separates_sources() -> None:
    sim = [
        TraceEvent(0, C, 100.0, 101.0, source="simulated"),
        TraceEvent(1, C, 101.0, 104.0, source="simulated"),
    ]
    s = summarize(hand_trace() + sim)
    measured = s[s.source == "measured"].set_index("stage")
    simulated = s[s.source == "simulated"].set_index("stage")
    assert measured.loc[0, "busy_pct"] == pytest.approx(40.0)  # unaffected by the simulated rows
    assert simulated.loc[0, "makespan_s"] == pytest.approx(4.0)
    assert simulated.loc[0, "busy_pct"] == pytest.approx(25.0)
    assert simulated.loc[1, "busy_pct"] == pytest.approx(75.0)


def test_busy_kinds_can_include_more_kinds() -> None:
    s = summarize(hand_trace(), busy_kinds=("compute", "send")).set_index("stage")
    assert s.loc[0, "busy_pct"] == pytest.approx(45.0)  # [0,3) + [3,3.5) + [5,6)
    assert s.loc[1, "busy_pct"] == pytest.approx(40.0)  # [4,7) + [7,8)


intervals = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(intervals)
def test_union_length_matches_brute_force(raw: list[tuple[int, int]]) -> None:
    ivs = [(float(a), float(a + w)) for a, w in raw]
    covered = {t for a, b in ivs for t in range(int(a), int(b))}  # unit cells [t, t+1) covered
    assert union_length(ivs) == pytest.approx(len(covered))


def test_clock_offset_exact_with_symmetric_fastest_sample() -> None:
    rng = random.Random(7)
    theta = 123.456  # remote clock = local clock + theta
    samples = []
    for _ in range(20):  # slow, asymmetric round trips
        t0 = rng.uniform(0, 100)
        d_out, d_back = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2)
        samples.append((t0, t0 + d_out + theta, t0 + d_out + d_back))
    t0 = 50.0  # the fastest round trip, 1 ms each way
    samples.append((t0, t0 + 0.001 + theta, t0 + 0.002))
    rng.shuffle(samples)
    assert clock_offset(samples) == pytest.approx(theta, abs=1e-9)
    _off, bound = clock_offset_bound(samples)
    assert bound == pytest.approx(0.001)


@settings(max_examples=100, deadline=None)
@given(
    st.floats(-1e4, 1e4),
    st.lists(
        st.tuples(st.floats(0, 1e3), st.floats(1e-5, 0.5), st.floats(1e-5, 0.5)), min_size=1, max_size=20
    ),
)
def test_clock_offset_within_its_bound(theta: float, trips: list[tuple[float, float, float]]) -> None:
    samples = [(t0, t0 + a + theta, t0 + a + b) for t0, a, b in trips]
    off, bound = clock_offset_bound(samples)
    assert abs(off - theta) <= bound + 1e-6
    best = min(trips, key=lambda t: t[1] + t[2])  # the estimate comes from the minimum-RTT trip
    assert bound == pytest.approx((best[1] + best[2]) / 2, abs=1e-6)


def test_clock_offset_four_stamps_remove_remote_processing() -> None:
    theta = -5.0
    # 10 ms out, 30 ms processing on the remote, 10 ms back
    sample = (1.0, 1.010 + theta, 1.040 + theta, 1.050)
    assert clock_offset([sample]) == pytest.approx(theta)
    assert clock_offset_bound([sample])[1] == pytest.approx(0.010)


def test_clock_offset_rejects_bad_samples() -> None:
    with pytest.raises(ValueError):
        clock_offset([])
    with pytest.raises(ValueError, match="round trip"):
        clock_offset([(2.0, 1.0, 1.0)])
    with pytest.raises(ValueError, match="got 2 values"):
        clock_offset([(1.0, 2.0)])


def test_shift_moves_remote_events_onto_local_clock() -> None:
    theta = 42.0
    local_truth = hand_trace()
    remote = shift(local_truth, theta)  # what the worker recorded on its own clock
    assert remote[0].start == pytest.approx(42.0) and remote[0].end == pytest.approx(44.0)
    samples = [(10.0, 10.001 + theta, 10.002)]
    back = shift(remote, -clock_offset(samples))
    for a, b in zip(back, local_truth):
        assert a.start == pytest.approx(b.start) and a.end == pytest.approx(b.end)
        assert (a.stage, a.kind, a.tokens, a.nbytes) == (b.stage, b.kind, b.tokens, b.nbytes)


# ---------------------------------------------------------------- against the planning simulator


def test_summary_agrees_with_simulator_bookkeeping() -> None:
    simulator = pytest.importorskip("hyperlane_lab.planning.simulator")
    times = simulator.PipelineTimes(
        prefill_s=(0.010, 0.020, 0.005),
        decode_s=(0.002, 0.004, 0.001),
        hop_latency_s=(1e-4, 2e-4, 3e-4, 1e-4),
        hop_prefill_ser_s=(0.0,) * 4,
        hop_decode_ser_s=(0.0,) * 4,
    )
    res = simulator.simulate(times, concurrency=3, decode_steps=6)
    s = summarize(res.events)
    # the simulator's makespan ends when the last token reaches the client = the last event's end
    assert s["makespan_s"].iloc[0] == pytest.approx(res.summary.makespan_s)
    assert (s["busy_pct"] / 100).tolist() == pytest.approx(list(res.summary.busy_fraction))
    assert set(s["source"]) == {"simulated"}


def test_simulate_from_trace_reproduces_a_simulated_pipeline() -> None:
    simulator = pytest.importorskip("hyperlane_lab.planning.simulator")
    from hyperlane_lab.tracing import max_concurrent_sessions, simulate_from_trace

    times = simulator.PipelineTimes(
        prefill_s=(0.010, 0.020, 0.004),
        decode_s=(0.002, 0.004, 0.001),
        hop_latency_s=(1e-4, 2e-4, 3e-4, 5e-4),
        hop_prefill_ser_s=(0.0,) * 4,
        hop_decode_ser_s=(0.0,) * 4,
    )
    one = simulator.simulate(times, concurrency=1, decode_steps=5)
    assert max_concurrent_sessions(one.events) == 1
    again = simulate_from_trace(one.events)  # service and hop times measured back from the trace
    assert again.summary.makespan_s == pytest.approx(one.summary.makespan_s)
    assert again.summary.busy_fraction == pytest.approx(one.summary.busy_fraction)
    assert summarize(again.events)["bubble_pct"].tolist() == pytest.approx(
        summarize(one.events)["bubble_pct"].tolist()
    )
    # from the uncontended trace, predict 3 requests in flight: same as simulating the true times
    three = simulator.simulate(times, concurrency=3, decode_steps=5)
    pred = simulate_from_trace(one.events, concurrency=3)
    assert pred.summary.makespan_s == pytest.approx(three.summary.makespan_s)
    assert pred.summary.decode_tokens_per_s == pytest.approx(three.summary.decode_tokens_per_s)
    assert max_concurrent_sessions(three.events) == 3


def test_max_concurrent_sessions_counts_overlap_only() -> None:
    from hyperlane_lab.tracing import max_concurrent_sessions

    ev = [
        TraceEvent(0, C, 0, 1, session="a"),
        TraceEvent(0, C, 1, 2, session="b"),  # back to back
        TraceEvent(1, C, 1.5, 3, session="c"),
    ]
    assert max_concurrent_sessions(ev) == 2
    assert max_concurrent_sessions([]) == 0
