"""A worker holding every layer runs its token loop in memory (``outbox.ring_here``): on a GPU worker the
completion thread launches the next step itself (``GpuStepper.run_ring``) when the event loop would have
launched it on arrival, and otherwise leaves the frame to the loop. On the CPU with the stand-ins of
``test_armed.py``; one worker's tokens in ``tests/test_runtime.py``, on a GPU in ``tests/test_gpu.py``."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
from tests.test_armed import _FakeArming, _Frame, _hold, _wire_stepper


class _Trace:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def add(self, kind: str, start: float, end: float, sid: str, step: int, *a: Any, **kw: Any) -> None:
        self.events.append((kind, sid, step))


def _ring_stepper() -> tuple[Any, Any]:
    st, caches = _wire_stepper()
    st.arming = None  # armed steps off: the in-memory loop does not need them
    st._thread = threading.current_thread()  # the test's thread plays the completion thread
    st.ring_steps = 0
    st.wire_spec = lambda h: caches[h.session].graph.wire.spec  # type: ignore[method-assign]
    st.w.engine.ready = True
    st.w.engine.decode_graph_ready = lambda sid, spec: st.w.engine.ready
    st.w.trace = _Trace()
    return st, caches


def _frame(step: int = 5, pos: int = 6, tok: int = 12) -> Any:
    f = _Frame("s0", step, pos=pos, tok=tok)
    f.received_at = 0.0
    return f


def test_the_completion_thread_launches_the_next_step_where_the_loop_would():
    st, caches = _ring_stepper()
    sess = st.w.sessions["s0"]
    sess.last_used = 0.0
    frame = _frame()
    assert st.run_ring(frame)
    ((cache, _, pos, ids),) = st.w.engine.decoder.launched
    assert cache is caches["s0"] and pos == [6] and ids == [12]
    p = st._q.get_nowait()
    assert (p.sid, p.step, p.mode, p.pos_bytes) == ("s0", 5, "hidden", np.int64(6).tobytes())
    assert st._put == 1 and st.ring_steps == 1 and frame.body.released and st.w.failed == []
    assert st.w.trace.events == [("receive", "s0", 5)] and sess.last_used > 0
    assert not st._arming_now and st._arm_lock.acquire(blocking=False)  # nothing left held


@pytest.mark.parametrize(
    "why",
    ["other_thread", "closing", "compute_busy", "not_ready", "no_wire_spec", "closed", "failed", "locked"],
)
def test_otherwise_the_frame_is_left_to_the_event_loop(why):
    """Not the completion thread, the stepper closing, a task pending on the compute thread, the session's graph
    not captured, no wire spec, the session closed or failed, or the step lock held elsewhere (a prompt chunk, a
    capture, a launch on the loop thread): nothing is launched, the frame is untouched (the loop thread takes
    it), and the completion thread never waits for the lock."""
    st, _ = _ring_stepper()
    if why == "other_thread":
        st._thread = threading.Thread(target=lambda: None)
    elif why == "closing":
        st._closing = True
    elif why == "compute_busy":
        st.w._submitted = 1
    elif why == "not_ready":
        st.w.engine.ready = False
    elif why == "no_wire_spec":
        st.wire_spec = lambda h: None
    elif why == "closed":
        del st.w.sessions["s0"]
    elif why == "failed":
        st.w.sessions["s0"].error = "stage 0: a bad frame"
    let_go = _hold(st._arm_lock)[1] if why == "locked" else threading.Event()
    frame = _frame()
    try:
        assert not st.run_ring(frame)  # with the lock held: returns at once, not after the holder's 10 s
    finally:
        let_go.set()
    assert st.w.engine.decoder.launched == [] and st._put == 0 and st.ring_steps == 0
    assert not frame.body.released and st.w.trace.events == [] and not st._arming_now


def test_a_task_counted_while_the_completion_thread_launches_waits_for_the_launch():
    """The loop thread counts a compute task (a close, a prompt, a reload) while the completion thread is inside
    its launch: ``disarm`` (called by ``Worker._submit`` after counting) returns only once the step is enqueued,
    so the compute thread never runs beside that launch."""
    st, _ = _ring_stepper()
    inside, go = threading.Event(), threading.Event()
    real = st.w.engine.decoder.step_wire

    def slow(*a: Any) -> Any:
        inside.set()
        assert go.wait(10)
        return real(*a)

    st.w.engine.decoder.step_wire = slow
    took: list[bool] = []
    t = threading.Thread(target=lambda: took.append(st.run_ring(_frame())))
    st._thread = t
    t.start()
    assert inside.wait(10)
    st.w._submitted += 1  # Worker._submit: count the task, then disarm
    threading.Timer(0.05, go.set).start()
    st.disarm()
    assert st._put == 1  # the launch finished before disarm returned
    t.join(10)
    assert took == [True] and st.ring_steps == 1


def _ahead_stepper(budget: int = 10) -> tuple[Any, Any, Any]:
    """A one-stage ring with armed steps on: step 6 of session s0 is in flight and its ship has just had
    ``run_ring`` enqueue step 7 (the frame carries position 8, token 12); returns the stepper, the caches and
    step 6's pending entry."""
    from hyperlane_lab.runtime.gpu_pending import _Pending

    st, caches = _ring_stepper()
    st.arming = _FakeArming()
    st.w.sessions["s0"].ring = ("f:1", budget, frozenset())
    st._put = 1  # step 6
    assert st.run_ring(_frame(step=7, pos=8, tok=12))
    g = caches["s0"].graph
    p = _Pending("s0", 6, 1, 1, 0.0, 1, b"", None, None, None, None, None, "hidden", wire=g.wire)  # type: ignore[arg-type]
    return st, caches, p


def test_the_step_after_a_ring_launch_is_armed_behind_it_and_fired_by_its_frame():
    """After a ship whose ring frame ``run_ring`` launched, the completion thread arms the step after that one
    (ahead: behind it on the stream). At the launched step's ship its frame only fires the armed step: the
    inputs, then the flag, no launch."""
    st, caches, p = _ahead_stepper()
    assert st.ring_ahead == ("s0", 7) and st._put == 2
    st._arm_after(p)
    a = st._armed
    assert a is not None and st.arming.aheads == [True] and a.ahead is not None
    assert a.after == 2  # step 7: the second step enqueued
    assert st._q.get_nowait().step == 7
    st._done = 1  # step 6 is done; step 7's ship makes step 8's frame
    assert st.run_ring(_frame(step=8, pos=9, tok=30))
    assert len(st.w.engine.decoder.launched) == 1  # step 7's launch only
    q = st._q.get_nowait()
    g = caches["s0"].graph
    assert q.armed is a and q.step == 8 and g.io_np[:, 0].tolist() == [30, 9] and st.arming.fired == 1
    assert a.ahead.seen == [[8]]  # the host waited for step 7 before writing step 8's position over its own
    assert st.ring_steps == 2 and st.ring_ahead == ("s0", 8) and st._armed is None


@pytest.mark.parametrize("why", ["switch_off", "budget", "not_from_ring", "other_step", "third_in_flight"])
def test_nothing_is_armed_ahead_otherwise(why):
    """``HYPERLANE_ARM_AHEAD=0``; no step after the launched one within the budget; two steps in flight but
    the second not the ring's launch from this ship; a third step in flight: nothing is armed."""
    st, _, p = _ahead_stepper(budget=8 if why == "budget" else 10)  # step 7 is the budget's last
    if why == "switch_off":
        st.arm_ahead = False
    elif why == "not_from_ring":
        st.ring_ahead = None
    elif why == "other_step":
        st.ring_ahead = ("s0", 9)
    elif why == "third_in_flight":
        st._put += 1
    st._arm_after(p)
    assert st._armed is None and st.arming.aheads == []
    if why != "budget":  # with the budget, the same step one earlier is armed
        return
    p.step, st.ring_ahead = 5, ("s0", 6)
    st._arm_after(p)
    assert st.arming.aheads == [True]


@pytest.mark.parametrize("how", ["eos", "failed"])
def test_a_step_armed_ahead_is_released_when_no_frame_will_come_for_it(how):
    """The launched step sampled EOS on every row (its ship made no ring frame), or it failed: the completion
    thread releases the step armed behind it (padding, then the flag) instead of leaving its gate to hold the
    stream for its limit."""
    st, caches, p = _ahead_stepper()
    st._arm_after(p)
    a = st._armed
    assert a is not None
    g = caches["s0"].graph
    nxt = type(p)("s0", 7, 1, 1, 0.0, 1, b"", None, None, None, None, None, "hidden", wire=g.wire)
    if how == "eos":
        nxt.final = True
        st._arm_after(nxt)
    else:
        errors: list[tuple[Any, ...]] = []
        st.w.busy_polling = False
        st._done = 1  # step 6 done
        # the failure's relay may release from the loop thread: step 7's result counts as read before it
        st.w._call_soon = lambda *args: errors.append((st._read, *args))
        st.w._forward_error = object()

        def fail(q: Any) -> None:
            raise RuntimeError("the copy of step 7 failed")

        st._complete = fail
        st._q = __import__("queue").SimpleQueue()
        st._q.put(nxt)
        st._q.put(None)
        st.ring_ahead = ("s0", 8)  # as if step 7's ship had launched step 8 before failing
        st._complete_loop()
        assert len(errors) == 1 and "failed" in errors[0][-1] and st.ring_ahead is None
        assert errors[0][0] == 2 and st._done == 2
    assert st._armed is None and st.arming.released == 1 and g.io_np[1].tolist() == [-1]
    assert int(st.arming.flag[0]) == a.target and st.arming.aheads == [True]


@pytest.mark.parametrize("how", ["disarm", "other_session", "frame_from_the_network", "done"])
def test_another_thread_touches_a_step_armed_ahead_only_once_the_step_before_it_was_read(how):
    """The step armed ahead shares the graph's output buffers with the step before it, which its gate opening
    would overwrite: released (``disarm``: a task for another session; another session's frame) or fired (a
    frame not made from that result) on the loop thread, it waits until the completion thread has read that
    step's result."""
    st, caches, p = _ahead_stepper()
    st._arm_after(p)
    a = st._armed
    assert a is not None and a.after == 2
    st._done = 1  # step 6 done; step 7 still on the GPU
    st._thread = threading.Thread(target=lambda: None)  # the completion thread: another one than the caller
    if how == "other_session":
        from hyperlane_lab.generation.sampling import Sampler, SamplingParams
        from hyperlane_lab.runtime.worker import _Session
        from tests.test_armed import _Cache, _Graph

        st.w.sessions["s1"] = _Session(1, 64, Sampler(SamplingParams()), "c:1")
        caches["s1"] = st.w.engine.caches["s1"] = _Cache(_Graph(batch=1))
    target = a.target

    def act() -> None:
        if how in ("disarm", "done"):
            st.disarm()
        elif how == "other_session":
            st.run_wire(_Frame("s1", 2, pos=3, tok=8), caches["s1"].graph.wire.spec, 0.0)
        else:
            st.run_wire(_Frame("s0", 8, pos=9, tok=5), caches["s0"].graph.wire.spec, 0.0)

    t = threading.Thread(target=act)
    t.start()
    t.join(0.2)
    assert t.is_alive() and int(st.arming.flag[0]) < target  # the gate is still closed
    if how == "done":
        st._done = 2  # step 7 completed without a sampled result (its session closed meanwhile)
    else:
        st._read = 2  # the completion thread read step 7's ids
    t.join(10)
    assert not t.is_alive() and int(st.arming.flag[0]) == target
    assert (st.arming.fired, st.arming.released) == ((1, 0) if how == "frame_from_the_network" else (0, 1))


def test_a_step_whose_arming_ahead_failed_is_released_once_the_step_before_it_was_read():
    """``Arming.arm(after=n)`` failed with its gate enqueued and closed (``ArmFailed``): arming is turned off
    for the worker, and the completion thread opens that gate on padding right after it has read the result of
    the step ahead (a replay behind the gate, if enqueued, would overwrite that result)."""
    from hyperlane_lab.models.decode_armed import ArmedStep, ArmFailed

    st, caches, p = _ahead_stepper()
    arming = st.arming
    g = caches["s0"].graph

    def fail(sid: str, graph: Any, start: Any, end: Any, stream: Any, after: int = 0) -> Any:
        arming.target += 1
        raise ArmFailed(ArmedStep(sid, graph, arming.target, 0.0, start, end, after=after))

    arming.arm = fail
    g.io_np[1] = 8  # step 7's position, maybe not read yet
    st._arm_after(p)
    assert st.arming is None and st._armed is None and st._orphan is not None and st._orphan[1].after == 2
    st._done = 0
    st.mark_read()  # step 6's result: not the step ahead
    assert st._orphan is not None and int(arming.flag[0]) == 0 and g.io_np[1].tolist() == [8]
    st._done, st.w.busy_polling = 1, False
    st._complete = lambda q: None  # step 7 completes without a sampled result (its session closed meanwhile)
    st._q = __import__("queue").SimpleQueue()
    st._q.put(p)
    st._q.put(None)
    st._complete_loop()
    assert st._orphan is None and int(arming.flag[0]) == arming.target and g.io_np[1].tolist() == [-1]
    assert arming.released == 1 and st._done == 2


def test_a_fire_that_raises_releases_the_step_it_took():
    """The armed step was taken (``_take_armed``) when writing its inputs raised: it is released (its gate
    opened on padding), not left closed, and the step fails with the error."""
    from tests.test_armed import _Frame as Frame

    st, caches, p = _ahead_stepper()
    st._arm_after(p)
    a = st._armed
    assert a is not None
    st._read = 2

    def broken(*args: Any) -> bool:
        raise OSError("pinned memory gone")

    st.arming.fire = broken
    st.run_wire(Frame("s0", 8, pos=9, tok=5), caches["s0"].graph.wire.spec, 0.0)
    assert st._armed is None and st.arming.released == 1 and int(st.arming.flag[0]) == a.target
    assert len(st.w.failed) == 1 and "pinned memory gone" in st.w.failed[0]


def test_a_failed_sessions_armed_step_is_released_at_once(tmp_path):
    """``_forward_error`` (every failure of a session ends there, on the loop thread) releases the session's
    armed step: no frame of the session will run, and its gate would hold the stream up to its limit."""
    from hyperlane_lab.generation.sampling import Sampler, SamplingParams
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig, _Session

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    released: list[str] = []
    w._gpu = type("G", (), {"release_session": lambda self, sid: released.append(sid)})()  # type: ignore[assignment]
    w.sessions["a"] = _Session(1, 64, Sampler(SamplingParams()), "c:1")
    try:
        w._forward_error("a", 3, "stage 0: a bad frame")
        w._forward_error("gone", 3, "stage 0: a bad frame")  # a session this worker does not know
    finally:
        w._compute.shutdown(wait=True)
    assert released == ["a"] and w.sessions["a"].error == "stage 0: a bad frame"


def test_ring_here_hands_the_loop_what_the_completion_thread_does_not_take(tmp_path):
    """``Worker.ring_here`` builds the next step's frame in memory (positions, then ids); a frame the GPU
    stepper launched is done, one it declined, or whose launch raised, goes to the event loop's
    ``_accept_ring``."""
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    w = Worker(WorkerConfig(device="cpu", cache_dir=str(tmp_path)))
    calls: list[tuple[Any, tuple[Any, ...]]] = []

    class _Loop:
        def call_soon_threadsafe(self, fn: Any, *a: Any) -> None:
            calls.append((fn, a))

    class _Gpu:
        def __init__(self, took: bool | None) -> None:
            self.took = took

        def run_ring(self, frame: Any) -> bool:
            if self.took is None:
                raise RuntimeError("no spec for it")
            return self.took

    w._loop = _Loop()  # type: ignore[assignment]
    sid = uuid.uuid4().hex
    header = FrameHeader(FrameKind.TENSOR, sid, 3, 1, 1, torch.int64, 0, 0, (1, 1), 8)
    body = np.array([5, 9], dtype=np.int64).tobytes()
    try:
        for took in (True, False, None):
            w._gpu = _Gpu(took)  # type: ignore[assignment]
            w.ring_here(header, body)
        w._gpu = None
        w.ring_here(header, body)  # a CPU worker: always the loop
    finally:
        w._compute.shutdown(wait=True)
    assert [fn for fn, _ in calls] == [w._accept_ring] * 3
    frame = calls[0][1][0]
    assert frame.header is header and bytes(frame.positions_view) == body[:8]
    assert bytes(frame.payload_view) == body[8:] and frame.received_at == frame.completed_at
