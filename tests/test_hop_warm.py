"""A hop's warm-up (runtime/hop_warm.py): when the completion thread sends a WARM frame before a decode step's
frame, on which connection, and when it must not. CPU only: the step's events and the clock are stand-ins, so
each case checks the exact moment the WARM frame went out (the GPU start + the estimate - the lead)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hyperlane_lab.runtime import hop_warm
from hyperlane_lab.runtime.gpu_pending import _Pending
from hyperlane_lab.runtime.gpu_steps import GpuStepper
from hyperlane_lab.runtime.hop_warm import DEFAULT_LEAD_US, lead_from_env
from hyperlane_lab.runtime.worker import _Session

LEAD = DEFAULT_LEAD_US / 1e6


class _Clock:
    """``time`` for hop_warm: a clock only ``sleep`` moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []
        self.late = 0.0  # how late each sleep wakes

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.slept.append(s)
        self.now += s + self.late


class _Event:
    """A CUDA event stand-in: complete once the clock passes ``at``."""

    def __init__(self, clock: _Clock, at: float, fail: bool = False) -> None:
        self.clock, self.at, self.fail, self.syncs = clock, at, fail, 0

    def query(self) -> bool:
        return self.clock.now >= self.at

    def synchronize(self) -> None:
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.syncs += 1


class _Conn:
    def __init__(self, clock: _Clock, free: bool = True) -> None:
        self.clock, self.free, self.at = clock, free, []

    def warm(self) -> bool:
        if self.free:
            self.at.append(self.clock.now)
        return self.free


def _stepper(monkeypatch: Any, sess: _Session | None = None, env: dict[str, str] | None = None) -> Any:
    clock = _Clock()
    monkeypatch.setattr(hop_warm, "time", clock)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    st = object.__new__(GpuStepper)
    out = SimpleNamespace(conn=_Conn(clock), extra={"client:1": _Conn(clock), "first:2": _Conn(clock)})
    sessions = {"s": sess} if sess is not None else {}
    st.w = SimpleNamespace(out=out, sessions=sessions, stage_index=1)
    st._put, st._done = 1, 0
    st._init_hop_warm()
    return st, clock, out


def _step(
    clock: _Clock, mode: str = "hidden", step: int = 3, seq: int = 1, gpu_s: float = 2e-3, **kw: Any
) -> Any:
    start = clock.now
    end = _Event(clock, start + gpu_s)
    p = _Pending(
        "s", step, 1, seq, start, 1, b"", torch.zeros(1), _Event(clock, start), end, None, None, mode, **kw
    )
    return p


def test_a_lone_decode_step_warms_its_hop_lead_before_the_shortest_recent_step_ends(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    clock.late = 120e-6
    p0 = _step(clock)
    assert not st._warm_hop(p0)  # no GPU time known yet: nothing to place the warm-up by
    for s in (2.4e-3, 1.8e-3, 2.2e-3):
        st._note_gpu_time(p0, s)
    t0 = clock.now
    p = _step(clock, gpu_s=2.0e-3)
    assert st._warm_hop(p) and p.start.syncs == 1
    # the shortest recent step, less the lead, less 300 µs for a first sleep's lateness (here 120 µs)
    assert clock.slept == [pytest.approx(1.8e-3 - LEAD - 300e-6)]
    assert out.conn.at == [pytest.approx(t0 + 1.8e-3 - LEAD - 300e-6 + 120e-6)]
    assert st.hop_warmups == 1 and not p.end.query()
    t1 = clock.now  # then the lateness it saw: the WARM frame lead before the estimate's end
    assert st._warm_hop(_step(clock, gpu_s=2.0e-3))
    assert out.conn.at[-1] == pytest.approx(t1 + 1.8e-3 - LEAD)
    # only the last 4 GPU times count: 1.8 ms drops out after four more
    for s in (2.5e-3, 2.6e-3, 2.7e-3, 2.8e-3):
        st._note_gpu_time(p0, s)
    t2 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=3e-3))
    assert out.conn.at[-1] == pytest.approx(t2 + 2.5e-3 - LEAD)


def test_a_sleep_that_wakes_past_the_end_skips_the_warm_up_and_the_next_aims_earlier(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    clock.late = 1e-3
    st._note_gpu_time(_step(clock), 1.8e-3)
    t0 = clock.now
    p = _step(clock, gpu_s=1.8e-3)
    assert not st._warm_hop(p) and st.hop_late == 1 and out.conn.at == []
    assert clock.now == pytest.approx(t0 + 1.8e-3 - LEAD - 300e-6 + 1e-3)  # one late wake: the ship's cost
    t1 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=1.8e-3))  # aims 1 ms earlier: wakes lead before the end
    assert out.conn.at == [pytest.approx(t1 + 1.8e-3 - LEAD)] and st.hop_late == 1
    # the most of the last 8 sleeps' lateness counts: 8 prompt wakes later, the 1 ms is forgotten
    clock.late = 0.0
    for _ in range(8):
        st._warm_hop(_step(clock, gpu_s=1.8e-3))
    assert max(st._lateness) == 0.0 and st._late_guess() == 0.0


def test_a_short_step_is_warmed_at_once_without_a_sleep(monkeypatch):
    """Less than 100 µs to wait: a sleep that short may wake past the end, so the WARM frame goes at once."""
    st, clock, out = _stepper(monkeypatch, env={"HYPERLANE_HOP_WARM_LEAD_US": "20"})
    st._lateness.append(0.0)  # (no allowance for a late wake: what is timed here is the lead)
    st._note_gpu_time(_step(clock), 110e-6)  # wait 90 µs
    t0 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=110e-6))
    assert out.conn.at == [t0] and clock.slept == []
    st._gpu_times[1].clear()
    st._note_gpu_time(_step(clock), 200e-6)  # wait 180 µs: a sleep of it
    t1 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=200e-6))
    assert out.conn.at[-1] == pytest.approx(t1 + 180e-6) and clock.slept == [pytest.approx(180e-6)]


def test_the_estimate_is_per_session_mode_and_batch_and_decode_steps_only(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    st._note_gpu_time(_step(clock), 2e-3)
    other = _step(clock)
    other.sid = "t"
    assert not st._warm_hop(other)  # another session's step: its own GPU time is not known yet
    st._note_gpu_time(other, 2e-3)
    p = _step(clock)
    assert not st._warm_hop(p)  # the estimate follows the last session noted
    st._note_gpu_time(_step(clock, seq=16), 9e-3)  # a prompt chunk: not a decode step's time
    assert st._gpu_times is not None and list(st._gpu_times[1]) == [2e-3]
    assert not st._warm_hop(_step(clock, seq=16))
    batch2 = _step(clock)
    batch2.batch = 2
    assert not st._warm_hop(batch2)
    assert out.conn.at == []


@pytest.mark.parametrize(
    "why",
    ["in_flight", "too_short", "done_before", "done_while_asleep", "busy_conn", "chained", "prompt", "off"],
)
def test_no_warm_up_where_it_could_cost_the_step(monkeypatch, why):
    env = {"HYPERLANE_HOP_WARM": "0"} if why == "off" else None
    st, clock, out = _stepper(monkeypatch, env=env)
    st._note_gpu_time(_step(clock), 2 * LEAD - 1e-6 if why == "too_short" else 2e-3)
    mode = "none" if why == "prompt" else "hidden"
    p = _step(clock, mode=mode, gpu_s=1e-3 if why == "done_while_asleep" else 2e-3)
    if why == "prompt":
        st._note_gpu_time(p, 2e-3)
    if why == "in_flight":
        st._put = 2  # another step in flight here: the next stage is busy
    if why == "done_before":
        p.end.at = clock.now
    if why == "busy_conn":
        out.conn.free = False
    if why == "chained":
        p.chained = p.confirmed = True
    t0 = clock.now
    assert not st._warm_hop(p)
    assert out.conn.at == [] and st.hop_warmups == 0
    # never a wait past the step's end: at most one sleep, ending before the estimate's end
    assert clock.now <= t0 + 2e-3 - LEAD + 1e-12


def test_a_failing_event_turns_warm_ups_off_and_leaves_the_error_to_the_steps_wait(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    st._note_gpu_time(_step(clock), 2e-3)
    p = _step(clock)
    p.start.fail = True
    assert not st._warm_hop(p) and not st.hop_warm
    assert not st._warm_hop(_step(clock)) and out.conn.at == []


def _greedy_session(ring: Any, ring_here: bool = False) -> _Session:
    return _Session(1, 64, None, "client:1", ring=ring, ring_here=ring_here)


@pytest.mark.parametrize(
    "ring, ring_here, step, conn",
    [
        (("first:2", 10, frozenset()), False, 3, "first:2"),  # the ring frame to the first stage
        (None, False, 3, "client:1"),  # the client drives the loop: its tokens
        (("first:2", 10, frozenset()), True, 3, None),  # the loop stays in this worker (gpu_chain.py)
        (("first:2", 10, frozenset()), False, 9, None),  # the budget's last step: no ring frame follows
    ],
)
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_the_last_stage_warms_the_connection_its_next_frame_takes(
    monkeypatch, ring, ring_here, step, conn, mode
):
    st, clock, out = _stepper(monkeypatch, _greedy_session(ring, ring_here))
    st._note_gpu_time(_step(clock, mode=mode, step=step - 1), 2e-3)
    assert st._warm_hop(_step(clock, mode=mode, step=step)) == (conn is not None)
    sent = {a for a, c in out.extra.items() if c.at}
    assert sent == ({conn} if conn else set()) and out.conn.at == []


def test_a_closed_session_or_no_connection_warms_nothing(monkeypatch):
    st, clock, _ = _stepper(monkeypatch)  # no session "s"
    st._note_gpu_time(_step(clock, mode="greedy"), 2e-3)
    assert not st._warm_hop(_step(clock, mode="greedy"))
    st2, clock2, out2 = _stepper(monkeypatch)
    out2.conn = None  # not connected to a next stage (the step's own send reports it)
    st2._note_gpu_time(_step(clock2), 2e-3)
    assert not st2._warm_hop(_step(clock2))


@pytest.mark.parametrize("text, want", [("", LEAD), ("150", 150e-6), (" 10 ", 10e-6), ("100000", 0.1)])
def test_lead_from_the_environment(text, want):
    assert lead_from_env({"HYPERLANE_HOP_WARM_LEAD_US": text}) == pytest.approx(want)


@pytest.mark.parametrize("text", ["abc", "9", "0.2", "-5", "100001"])
def test_a_bad_lead_is_refused_with_the_fix(text):
    with pytest.raises(ValueError, match=r"HYPERLANE_HOP_WARM_LEAD_US .*10 to 100000.*unset it"):
        lead_from_env({"HYPERLANE_HOP_WARM_LEAD_US": text})
