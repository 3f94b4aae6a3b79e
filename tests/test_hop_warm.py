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


def _known(st: Any, clock: _Clock, seconds: float, mode: str = "hidden", step: int = 2) -> None:
    """Two earlier decode steps of ``seconds`` (one alone is not enough: it may be a graph capture's)."""
    for _ in range(2):
        st._note_gpu_time(_step(clock, mode=mode, step=step), seconds)


def _step(
    clock: _Clock, mode: str = "hidden", step: int = 3, seq: int = 1, gpu_s: float = 2e-3, **kw: Any
) -> Any:
    start = clock.now
    end = _Event(clock, start + gpu_s)
    kw.setdefault("t_run", start)  # (its launch began as the GPU started)
    p = _Pending(
        "s", step, 1, seq, start, 1, b"", torch.zeros(1), _Event(clock, start), end, None, None, mode, **kw
    )
    return p


def test_a_lone_decode_step_warms_its_hop_lead_before_the_shortest_recent_step_ends(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    clock.late = 120e-6
    p0 = _step(clock)
    assert not st._warm_hop(p0)  # no GPU time known yet: nothing to place the warm-up by
    st._note_gpu_time(p0, 2.4e-3)
    assert not st._warm_hop(_step(clock))  # one alone may be a graph capture's: not enough
    for s in (1.8e-3, 2.2e-3):
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


def test_a_graph_captures_seconds_never_set_the_sleep(monkeypatch):
    """A session's first decode step captures its graph: its "GPU time" holds the host's capture (seconds). With
    the next step's real time beside it, the estimate is the real one; the warm-up lands before the step ends."""
    st, clock, out = _stepper(monkeypatch)
    st._note_gpu_time(_step(clock, step=1), 0.5)  # the capture step
    t0 = clock.now
    p = _step(clock, step=2, gpu_s=2e-3)
    assert not st._warm_hop(p) and clock.now == t0  # no sleep on that time alone
    st._note_gpu_time(p, 2e-3)
    t1 = clock.now
    p3 = _step(clock, step=3, gpu_s=2e-3)
    assert st._warm_hop(p3) and out.conn.at == [pytest.approx(t1 + 2e-3 - LEAD - 300e-6)]  # (a first sleep)
    assert clock.now < p3.end.at
    st2, clock2, _ = _stepper(monkeypatch)  # steps longer than 50 ms: none is warmed
    _known(st2, clock2, 0.06)
    assert not st2._warm_hop(_step(clock2, gpu_s=0.06)) and clock2.slept == []


def test_a_sleep_that_wakes_past_the_end_skips_the_warm_up_and_the_next_aims_earlier(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    clock.late = 1e-3
    _known(st, clock, 2.5e-3)
    t0 = clock.now
    p = _step(clock, gpu_s=2.5e-3)
    assert not st._warm_hop(p) and st.hop_late == 1 and out.conn.at == []
    assert clock.now == pytest.approx(t0 + 2.5e-3 - LEAD - 300e-6 + 1e-3)  # one late wake: the ship's cost
    t1 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=2.5e-3))  # aims 1 ms earlier: wakes lead before the end
    assert out.conn.at == [pytest.approx(t1 + 2.5e-3 - LEAD)] and st.hop_late == 1
    # the most of the last 8 sleeps' lateness counts: 8 prompt wakes later, the 1 ms is forgotten
    clock.late = 0.0
    for _ in range(8):
        st._warm_hop(_step(clock, gpu_s=2.5e-3))
    assert st._late_guess() == pytest.approx(0.0, abs=1e-12)


def test_one_very_late_wake_never_stops_the_sleeps_that_age_it_out(monkeypatch):
    """A preempted thread woke 1.7 ms late once: the next sleeps allow at most half the wait for it, so they go on,
    measure on-time wakes and forget it; the WARM frames land lead before the end again."""
    st, clock, out = _stepper(monkeypatch)
    _known(st, clock, 2e-3)
    st._lateness.append(1.7e-3)
    for _ in range(8):
        t = clock.now
        assert st._warm_hop(_step(clock, gpu_s=2e-3))
        assert out.conn.at[-1] == pytest.approx(t + (2e-3 - LEAD) / 2)  # half the wait allowed for it
    t = clock.now
    assert st._warm_hop(_step(clock, gpu_s=2e-3))
    assert out.conn.at[-1] == pytest.approx(t + 2e-3 - LEAD) and len(clock.slept) == 9


def test_a_short_step_is_warmed_at_once_without_a_sleep(monkeypatch):
    """Less than 100 µs to wait: a sleep that short may wake past the end, so the WARM frame goes at once."""
    st, clock, out = _stepper(monkeypatch, env={"HYPERLANE_HOP_WARM_LEAD_US": "20"})
    st._lateness.append(0.0)  # (no allowance for a late wake: what is timed here is the lead)
    _known(st, clock, 110e-6)  # wait 90 µs
    t0 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=110e-6))
    assert out.conn.at == [t0] and clock.slept == []
    st._gpu_times[1].clear()
    _known(st, clock, 200e-6)  # wait 180 µs: a sleep of it
    t1 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=200e-6))
    assert out.conn.at[-1] == pytest.approx(t1 + 180e-6) and clock.slept == [pytest.approx(180e-6)]


def test_the_estimate_is_per_session_mode_and_batch_and_decode_steps_only(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    _known(st, clock, 2e-3)
    other = _step(clock)
    other.sid = "t"
    assert not st._warm_hop(other)  # another session's step: its own GPU time is not known yet
    st._note_gpu_time(other, 2e-3)
    st._note_gpu_time(other, 2e-3)
    assert not st._warm_hop(_step(clock))  # the estimate follows the last session noted
    st._note_gpu_time(_step(clock, seq=16), 9e-3)  # a prompt chunk: not a decode step's time
    assert st._gpu_times is not None and list(st._gpu_times[1]) == [2e-3, 2e-3]
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
    _known(st, clock, 2 * LEAD - 1e-6 if why == "too_short" else 2e-3)
    mode = "none" if why == "prompt" else "hidden"
    p = _step(clock, mode=mode, gpu_s=1e-3 if why == "done_while_asleep" else 2e-3)
    if why == "prompt":
        _known(st, clock, 2e-3, mode="none")
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
    if why == "done_while_asleep":  # a step shorter than every recent one by more than the lead: the one case
        assert (
            st.hop_late == 1
        )  # where the ship waits for the wake (at most the estimate's end, less the lead)
        assert p.end.at < clock.now <= t0 + 2e-3 - LEAD + 1e-12
    else:
        assert clock.now <= p.end.at and st.hop_late == 0  # never a wait past the step's end


def test_a_failing_event_turns_warm_ups_off_and_leaves_the_error_to_the_steps_wait(monkeypatch):
    st, clock, out = _stepper(monkeypatch)
    _known(st, clock, 2e-3)
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
    _known(st, clock, 2e-3, mode=mode, step=step - 1)
    assert st._warm_hop(_step(clock, mode=mode, step=step)) == (conn is not None)
    sent = {a for a, c in out.extra.items() if c.at}
    assert sent == ({conn} if conn else set()) and out.conn.at == []


def test_a_closed_session_or_no_connection_warms_nothing(monkeypatch):
    st, clock, _ = _stepper(monkeypatch)  # no session "s"
    _known(st, clock, 2e-3, mode="greedy")
    assert not st._warm_hop(_step(clock, mode="greedy"))
    st2, clock2, out2 = _stepper(monkeypatch)
    out2.conn = None  # not connected to a next stage (the step's own send reports it)
    _known(st2, clock2, 2e-3)
    assert not st2._warm_hop(_step(clock2))


@pytest.mark.parametrize("text, want", [("", LEAD), ("150", 150e-6), (" 10 ", 10e-6), ("100000", 0.1)])
def test_lead_from_the_environment(text, want):
    assert lead_from_env({"HYPERLANE_HOP_WARM_LEAD_US": text}) == pytest.approx(want)


@pytest.mark.parametrize("text", ["abc", "9", "0.2", "-5", "100001"])
def test_a_bad_lead_is_refused_with_the_fix(text):
    with pytest.raises(ValueError, match=r"HYPERLANE_HOP_WARM_LEAD_US .*10 to 100000.*unset it"):
        lead_from_env({"HYPERLANE_HOP_WARM_LEAD_US": text})


class _Sock:
    """A socket stand-in for ``SocketSender.warm``: ``send`` takes ``take`` bytes (or raises ``first``), then
    ``sendmsg`` (the rest of a partial header) raises ``rest`` if set."""

    def __init__(self, take: int = 64, first: OSError | None = None, rest: OSError | None = None) -> None:
        self.take, self.first, self.rest = take, first, rest
        self.data = b""
        self.closed = False

    def send(self, buf: Any, flags: int) -> int:
        import socket

        assert flags & socket.MSG_DONTWAIT  # a warm-up never waits for the socket
        if self.first is not None:
            raise self.first
        self.data += bytes(buf[: self.take])
        return min(self.take, len(buf))

    def sendmsg(self, bufs: list[Any]) -> int:
        if self.rest is not None:
            raise self.rest
        n = sum(len(b) for b in bufs)
        self.data += b"".join(bytes(b) for b in bufs)
        return n

    def close(self) -> None:
        self.closed = True


def _sender(sock: _Sock) -> Any:
    import threading

    from hyperlane_lab.runtime.sender import SocketSender

    s = object.__new__(SocketSender)
    s.address, s._sock, s._lock, s._writers = "peer:1", sock, threading.Lock(), []
    s.frames_out = s.warm_out = 0
    return s


@pytest.mark.parametrize(
    "case", ["whole", "partial", "would_block", "partial_then_timeout", "broken", "busy"]
)
def test_a_warm_up_send_never_waits_and_never_cuts_the_stream(case, caplog):
    """The WARM frame goes whole (a partial write is finished), or not at all when the socket cannot take it at
    once; a failure once part of it is out, or a broken connection, closes the connection with the reason logged
    (the step's own send then reports it closed); another thread's send in progress: no warm-up."""
    from hyperlane_lab.runtime.frame import FrameKind, unpack_header
    from hyperlane_lab.runtime.sender import _warm_header

    sock = {
        "whole": _Sock(),
        "partial": _Sock(take=10),
        "would_block": _Sock(first=BlockingIOError()),
        "partial_then_timeout": _Sock(take=10, rest=BlockingIOError("timed out")),
        "broken": _Sock(first=ConnectionResetError("reset")),
        "busy": _Sock(),
    }[case]
    s = _sender(sock)
    if case == "busy":
        s._lock.acquire()
    ok = s.warm()
    assert ok == (case in ("whole", "partial"))
    if ok:
        assert sock.data == _warm_header() and unpack_header(sock.data).kind == FrameKind.WARM
        assert s.warm_out == 1 and s.frames_out == 0
    closed = case in ("partial_then_timeout", "broken")
    assert (s._sock is None) == closed and sock.closed == closed
    if closed:
        assert "closed during a warm-up" in caplog.text
    if case in ("would_block", "busy"):
        assert sock.data == b"" and s._sock is sock  # nothing taken: the stream as it was, still open
    if case == "busy":
        assert s._lock.locked()
        s._lock.release()


class _Timer:
    """A ``GpuTimer`` stand-in: its wait moves the stand-in clock by the wait plus its own lateness; ``since`` reads
    the stand-in events' times."""

    def __init__(self, clock: _Clock, late: float = 0.0, rate: float | None = 2e9, fail: str = "") -> None:
        self.clock, self.late, self.waited, self.fail = clock, late, [], fail
        self.rate: float | None = None
        self._rate = rate

    def calibrate(self) -> float:
        if self.fail == "calibrate":
            raise ValueError("a spin of 1000000 cycles took 9.0 ms (0.11 GHz): the measurement was disturbed")
        if self.fail == "calibrate_cuda":
            raise RuntimeError("CUDA error: unspecified launch failure")
        self.rate = self._rate
        return self.rate or 0.0

    def wait(self, s: float) -> None:
        if self.fail == "wait":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.waited.append(s)
        self.clock.now += s + self.late

    def since(self, event: _Event) -> float:
        if self.fail == "since":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.clock.now - event.at


def _with_timer(monkeypatch: Any, st: Any, clock: _Clock, **kw: Any) -> list[Any]:
    """Give ``st`` a device and make ``hop_warm.GpuTimer`` a stand-in; the list gets each timer made."""
    made: list[Any] = []

    def make(device: Any) -> _Timer:
        if kw.get("fail") == "make":
            raise RuntimeError("CUDA error: out of memory")
        made.append(_Timer(clock, **kw))
        return made[-1]

    st.device = torch.device("cuda", 1)
    monkeypatch.setattr(hop_warm, "GpuTimer", make)
    return made


def test_the_wait_is_timed_by_the_gpu_once_the_timer_is_made_after_the_first_decode_step(monkeypatch):
    """The first decode step's GPU time makes the timer (once, and only with a device); the waits then go to it,
    not to a host sleep, and its lateness is what the next wait allows for and what Health reports."""
    st, clock, out = _stepper(monkeypatch)
    st._note_gpu_time(_step(clock), 2e-3)
    assert st._timer is None and st._timer_tried is False  # a stepper without a device: no clock
    made = _with_timer(monkeypatch, st, clock, late=15e-6)
    _known(st, clock, 2e-3)
    assert len(made) == 1 and made[0].rate == 2e9  # once, not at every step; calibrated
    t0 = clock.now
    assert st._warm_hop(_step(clock, gpu_s=2e-3))
    assert clock.slept == [] and made[0].waited == [pytest.approx(2e-3 - LEAD - 300e-6)]
    assert out.conn.at == [pytest.approx(t0 + 2e-3 - LEAD - 300e-6 + 15e-6)]
    assert st.hop_wake_us == pytest.approx(15.0)
    t1 = clock.now  # the next wait allows the 15 µs it saw: the WARM frame lands lead before the end
    assert st._warm_hop(_step(clock, gpu_s=2e-3))
    assert out.conn.at[-1] == pytest.approx(t1 + 2e-3 - LEAD)


def test_a_stage_with_no_hop_to_warm_makes_no_timer(monkeypatch):
    """One worker's loop (the ring stays here): no frame to warm, so no calibration on its completion thread."""
    for ring_here in (True, False):
        st, clock, _ = _stepper(monkeypatch, _greedy_session(("first:2", 10, frozenset()), ring_here))
        made = _with_timer(monkeypatch, st, clock)
        _known(st, clock, 2e-3, mode="greedy")
        assert len(made) == (0 if ring_here else 1) and st._timer_tried is not ring_here


@pytest.mark.parametrize("fail", ["calibrate", "calibrate_cuda"])
def test_no_clock_rate_means_host_sleeps_counted_from_the_gpu_start(monkeypatch, caplog, fail):
    """A refused or failed calibration: host sleeps, the reason logged once; the timer still says when the step
    began, so a step the thread came to late is still placed by its GPU start."""
    st, clock, out = _stepper(monkeypatch)
    made = _with_timer(monkeypatch, st, clock, fail=fail)
    with caplog.at_level("WARNING", logger="hyperlane_lab.runtime.gpu_steps"):
        _known(st, clock, 2e-3)
        _known(st, clock, 2e-3)
    assert len(made) == 1 and made[0].rate is None and caplog.text.count("wait with host sleeps") == 1
    assert ("0.11 GHz" if fail == "calibrate" else "unspecified launch failure") in caplog.text
    start = clock.now
    p = _step(clock, gpu_s=2e-3, t_run=start - 1e-3)  # (t_run not used: the clock knows)
    clock.now += 400e-6
    assert st._warm_hop(p) and made[0].waited == [] and len(clock.slept) == 1
    assert out.conn.at == [pytest.approx(start + 2e-3 - LEAD - 300e-6)]
    assert st.hop_wake_us == 0.0


def test_no_gpu_clock_at_all_means_host_sleeps_counted_from_the_launch(monkeypatch, caplog):
    st, clock, _ = _stepper(monkeypatch)
    _with_timer(monkeypatch, st, clock, fail="make")
    with caplog.at_level("WARNING", logger="hyperlane_lab.runtime.gpu_steps"):
        _known(st, clock, 2e-3)
    assert (
        st._timer is None
        and "without the GPU's clock (host sleeps): CUDA error: out of memory" in caplog.text
    )
    assert st._warm_hop(_step(clock, gpu_s=2e-3)) and len(clock.slept) == 1


@pytest.mark.parametrize("fail", ["wait", "since"])
def test_a_failing_timer_turns_warm_ups_off_and_leaves_the_error_to_the_steps_wait(monkeypatch, caplog, fail):
    st, clock, out = _stepper(monkeypatch)
    _with_timer(monkeypatch, st, clock, fail=fail)
    _known(st, clock, 2e-3)
    with caplog.at_level("WARNING", logger="hyperlane_lab.runtime.gpu_steps"):
        assert not st._warm_hop(_step(clock, gpu_s=2e-3))
    assert not st.hop_warm and "hop warm-ups off: CUDA error" in caplog.text and out.conn.at == []
    assert not st._warm_hop(_step(clock, gpu_s=2e-3))  # off from then on


def test_warm_ups_off_make_no_timer(monkeypatch):
    st, clock, _ = _stepper(monkeypatch, env={"HYPERLANE_HOP_WARM": "0"})
    made = _with_timer(monkeypatch, st, clock)
    _known(st, clock, 2e-3)
    assert made == [] and st._timer is None and not st._warm_hop(_step(clock))


def test_host_sleeps_when_asked_for(monkeypatch):
    """``HYPERLANE_HOP_WARM_WAIT=host``: no calibration, host sleeps; the wait still counts from the GPU start."""
    st, clock, out = _stepper(monkeypatch, env={"HYPERLANE_HOP_WARM_WAIT": "host"})
    made = _with_timer(monkeypatch, st, clock)
    _known(st, clock, 2e-3)
    assert len(made) == 1 and made[0].rate is None
    start = clock.now
    p = _step(clock, gpu_s=2e-3)
    clock.now += 400e-6
    assert st._warm_hop(p) and len(clock.slept) == 1 and made[0].waited == []
    assert out.conn.at == [pytest.approx(start + 2e-3 - LEAD - 300e-6)]


@pytest.mark.parametrize(("text", "gpu"), [("", True), ("gpu", True), (" GPU ", True), ("host", False)])
def test_the_wait_from_the_environment(text, gpu):
    assert hop_warm.wait_on_gpu_from_env({"HYPERLANE_HOP_WARM_WAIT": text}) is gpu


def test_a_bad_wait_is_refused_with_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"must be 'gpu' .* or 'host' .*got 'cpu'"):
        hop_warm.wait_on_gpu_from_env({"HYPERLANE_HOP_WARM_WAIT": "cpu"})
    monkeypatch.setenv("HYPERLANE_HOP_WARM_WAIT", "hots")  # at the stepper's start, not at a step
    with pytest.raises(ValueError, match="got 'hots'"):
        _stepper(monkeypatch)


def test_health_reads_the_steppers_warm_up_counts():
    """``Worker.hop_warmups`` (Health's source): the GPU stepper's counts and its waits' lateness, zeros without."""
    from hyperlane_lab.runtime.worker import Worker

    w = object.__new__(Worker)
    w._gpu = None
    assert Worker.hop_warmups(w) == (0, 0, 0.0)
    st = object.__new__(GpuStepper)
    st._init_hop_warm()
    st.hop_warmups, st.hop_late = 7, 2
    st._lateness.extend([20e-6, 45e-6, 30e-6])
    w._gpu = st
    assert Worker.hop_warmups(w) == (7, 2, pytest.approx(45.0))


def test_a_step_the_thread_came_to_late_is_warmed_by_its_gpu_start(monkeypatch):
    """The completion thread got the step 400 µs after the GPU began it (a launch's host work): the GPU timer says
    so, and the WARM frame still lands lead (plus the first wait's allowance) before the estimate's end. Without a
    timer the wait counts from when the launch began (here 100 µs before the GPU start: the frame goes 100 µs
    early); with neither, it would land 400 µs late."""
    for timed in (True, False):
        st, clock, out = _stepper(monkeypatch)
        if timed:
            st._timer, st._timer_tried = _Timer(clock), True
        _known(st, clock, 2e-3)
        start = clock.now
        p = _step(clock, gpu_s=2e-3, t_run=start - 100e-6)
        clock.now += 400e-6
        assert st._warm_hop(p)
        want = start + 2e-3 - LEAD - 300e-6 - (0.0 if timed else 100e-6)
        assert out.conn.at == [pytest.approx(want)], timed


def test_a_step_that_starts_while_the_thread_waits_counts_from_its_start(monkeypatch):
    """An armed step: the thread waits for its gate to open, so the start is now, whatever ``t_run`` says."""
    st, clock, out = _stepper(monkeypatch)
    _known(st, clock, 2e-3)
    p = _step(clock, gpu_s=2e-3, t_run=clock.now - 5e-3)
    p.start.at = p.end.at = clock.now + 1e-3  # (its gate opens in 1 ms; the stand-in's wait jumps there)
    p.end.at += 2e-3
    sync = p.start.synchronize

    def wait_for_gate() -> None:
        clock.now = max(clock.now, p.start.at)
        sync()

    p.start.synchronize = wait_for_gate
    assert st._warm_hop(p)
    assert out.conn.at == [pytest.approx(p.start.at + 2e-3 - LEAD - 300e-6)]
