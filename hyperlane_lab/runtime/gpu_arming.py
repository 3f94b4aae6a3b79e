"""Steps the GPU completion thread enqueues itself, for ``GpuStepper`` (``gpu_steps.py``): armed decode steps
(when to arm a session's next wire-mode step, fire it from its frame, or release it; the mechanism is
``models/decode_armed.py``) and a one-stage token loop's next step (``run_ring``).

Rules: the completion thread arms after shipping a wire step when the worker has exactly one session, that
step was the only one in flight, the compute thread is idle and the session's graph is the one that ran it
(and, on a token-loop last stage, a next step exists). A one-stage token loop arms *ahead*: its next step is
already enqueued (``run_ring``, from the ship), so the step after it is armed behind that one, when it exists;
the completion thread releases it where it learns that no frame will come for it (EOS, a failed step), and a
failed session's armed step is released at once (``release_session``). Such a step shares the graph's output
buffers with the step ahead of it, which its gate opening would overwrite: a release or a fire from another
thread than the completion thread first waits until that thread has read the step ahead's result
(``_ahead_read``; at once in the usual case, the frame being made from that result). The completion thread
marks each step's result read (``mark_read``), and opens then the gate of a step whose arming ahead failed.

``GpuStepper``'s re-entrant ``_arm_lock`` orders arming and every launch (``run_wire``, ``run_step``,
``run_ring``) against each other; the completion thread only tries the lock (to arm or to launch), so it never
waits behind a prompt. Anything that is not the armed session's next wire step releases it first. A task for
the compute thread counted while the completion thread checks or launches under the lock waits for it
(``disarm``), so the compute thread never runs beside such a launch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.decode_armed import ArmedStep, ArmFailed
from hyperlane_lab.models.decode_wire import WireSpec
from hyperlane_lab.runtime.frame import FLAG_LAST
from hyperlane_lab.runtime.gpu_pending import StepperState, _Pending, _step_io

if TYPE_CHECKING:
    from hyperlane_lab.runtime.dataplane import Frame
    from hyperlane_lab.runtime.worker import _Session

__all__ = ["ArmedSteps"]

log = logging.getLogger("hyperlane_lab.runtime.gpu_steps")


class ArmedSteps(StepperState):
    """Mixed into ``GpuStepper``: its armed step (at most one) and the rules above."""

    def disarm(self) -> None:
        """Release the armed step, if any (it runs as padding): call before any other GPU work of this
        worker that does not go through ``run_wire``/``run_step``, which release it themselves, after
        counting that work (``Worker._submit``). An arm or a ``run_ring`` launch under way (its checks may
        have passed before the work was counted) finishes first (and an arm is released here). With
        neither, returns without the lock: the compute thread holds it while it enqueues a prompt chunk
        (~1 ms), and the loop thread must not wait for that. Safe: the completion thread sets
        ``_arming_now`` before its checks read the count, and sets ``_armed`` before clearing it, so one
        of the two reads below (in this order) sees it. A step armed ahead (a one-stage ring) waits here until
        the completion thread has read the result of the step before it (``_ahead_read``): up to a step's
        time, on this rare path (another session's work during a lone session's token loop)."""
        if not self._arming_now and self._armed is None:
            return
        with self._arm_lock:
            a, self._armed = self._armed, None
            if a is not None and self.arming is not None:
                self._ahead_read(a)
                self.arming.release(a)

    def release_session(self, sid: str) -> None:
        """Session ``sid`` failed or its token loop ended: release its armed step (no frame of it will come;
        its gate would hold the stream until its limit)."""
        a = self._armed
        if a is not None and a.sid == sid:
            self.disarm()

    def _ahead_read(self, a: ArmedStep) -> None:
        """(Lock held.) For a step armed ahead, on another thread than the completion thread: wait until the
        completion thread has read the result of the step ahead (it takes no lock until then), at most the
        gate's limit. The completion thread itself fires or releases only after reading it."""
        if not a.after or threading.current_thread() is self._thread:
            return
        assert self.arming is not None  # (the callers release or fire through it)
        limit = self.arming.limit_s
        deadline = time.monotonic() + limit
        while self._read < a.after and self._done < a.after:
            if time.monotonic() > deadline:
                log.warning("stage %d: step %d's result still unread after %.0f s; releasing the step armed "
                            "behind it", self.w.stage_index, a.after, limit)  # fmt: skip
                return
            time.sleep(50e-6)

    def mark_read(self) -> None:
        """(Completion thread.) The result of the step being completed was read (or will never be): a step
        armed behind it may start, and one whose arming failed (``_orphan``) is released now."""
        self._read = self._done + 1
        o = self._orphan
        if o is not None and self._read >= o[1].after:
            self._orphan = None
            o[0].release(o[1])

    def _take_armed(self, sid: str, cache: Any, spec: WireSpec) -> ArmedStep | None:
        """(Lock held.) The armed step if it is this session's next wire step with ``spec``; else
        release it (None)."""
        a = self._armed
        if a is None or self.arming is None:
            return None
        self._armed = None
        g = cache.graph
        if a.sid == sid and g is a.graph and g.wire is not None and g.wire.spec == spec:
            return a
        self._ahead_read(a)
        self.arming.release(a)
        return None

    def _fire(self, a: ArmedStep, pos: np.ndarray, x: Any, first: bool) -> bool:
        """(Lock held.) Start the armed step with these inputs; False (and released) when it is too old."""
        arming = self.arming
        assert arming is not None
        self._ahead_read(a)  # (a frame not made from the step ahead's result: one from the network)
        fired = False
        try:
            fired = arming.fire(a, pos, x, first)
        finally:  # taken already (_take_armed): never leave its gate closed, even if the writes raised
            if not fired:
                arming.release(a)
        return fired

    def run_ring(self, frame: Frame) -> bool:
        """Enqueue a one-stage token loop's next step at once (``outbox.ring_here``) where the loop thread
        would have enqueued it on arrival: on the completion thread, a wire-mode step whose graph is ready,
        with nothing on the compute thread. False: not taken here (the loop thread takes the frame). Never waits:
        with the lock held elsewhere (a prompt chunk or a capture on the compute thread, a launch on the loop
        thread) the frame goes to the loop thread, and this thread goes on to send the step's tokens."""
        if threading.current_thread() is not self._thread:
            return False
        w, h = self.w, frame.header
        if self._chained is not None and self._confirm(frame):  # on the GPU already (gpu_chain.py)
            try:  # never fails the frame now: the loop thread would launch the step a second time
                w.trace.add("receive", frame.received_at, frame.completed_at, h.session, h.step, h.body_len)
            except Exception as e:
                log.debug("stage %d: no receive event for step %d: %s", w.stage_index, h.step, e)
            return True
        if self._closing:
            return False
        eng, sess = w.engine, w.sessions.get(h.session)
        if eng is None or sess is None or sess.error or w._submitted != w._finished:
            return False
        if not self._arm_lock.acquire(blocking=False):
            return False
        self._arming_now = True  # before the checks read the count: work counted meanwhile waits (see disarm)
        try:  # re-checked under the lock: a task, a reload, a close or a failure may have come meanwhile
            if w._submitted != w._finished or w.engine is not eng or w.sessions.get(h.session) is not sess:
                return False
            # under the lock: a reload's forget_specs waits for it. A ProtocolError (never seen: this worker
            # built the frame) is left to the loop thread's path, which says why
            try:
                spec = self.wire_spec(h)
            except ProtocolError:
                return False
            if spec is None or sess.error or not eng.decode_graph_ready(h.session, spec):
                return False
            hs = host_stamps()
            hs.mark("ring")
            hs.end()  # the completion record ends here (no "shipped" mark); the step's own record follows
            sess.last_used = time.monotonic()
            put = self._put
            self._run_wire(frame, spec, frame.completed_at)  # a failure fails the session, as on the loop
            self.ring_steps += self._put - put
            if self._put != put:
                self.ring_ahead = (h.session, h.step)
                self._chain_due = self._last  # the next step may be chained behind this one (gpu_chain.py)
        finally:
            self._arming_now = False
            self._arm_lock.release()
        w.trace.add("receive", frame.received_at, frame.completed_at, h.session, h.step, h.body_len)
        return True

    def _arm_after(self, p: _Pending) -> None:
        if p.wasted:  # a chained step that ran as padding (the loop ended before it): no frame follows it
            return
        if p.final:  # the token loop ended with p: no frame comes for a step armed behind the next one
            self.release_session(p.sid)
        try:
            self._maybe_arm(p)
        except Exception as e:  # e.g. the gate kernel cannot run here: launch every step as before
            log.warning("stage %d: cannot arm decode steps on %s (%s); launching them on arrival",
                        self.w.stage_index, self.device, e)  # fmt: skip
            self.arming = None

    def _maybe_arm(self, p: _Pending) -> None:
        """(Completion thread, after step ``p`` was shipped.) Arm the session's next wire step when it
        is the worker's only session, its graph is the one that ran ``p`` and nothing else is in flight;
        or, when ``run_ring`` enqueued the next step from this ship, arm the step after it (ahead)."""
        w, arming = self.w, self.arming
        if arming is None or p.wire is None or len(w.sessions) != 1:
            return
        sess = w.sessions.get(p.sid)
        eng = w.engine
        if sess is None or sess.error or eng is None:
            return
        ahead = 1 if self.arm_ahead and self.ring_ahead == (p.sid, p.step + 1) else 0
        if p.final or p.flags & FLAG_LAST or (sess.ring is not None and p.step + 1 + ahead >= sess.ring[1]):
            return  # the token loop ended here (its budget, or every row sampled EOS): no frame follows
        try:
            cache = eng.session(p.sid)
        except KeyError:  # closed meanwhile
            return
        g = cache.graph
        if (
            g is None
            or g.wire is not p.wire
            or g.staged is None
            or not self._may_arm(p.sid, sess, cache, g, ahead)
        ):
            return
        self._on_device()  # (the gate runs on the current device)
        arming.warm(p.batch)  # the gate's first compile for this batch: not while holding the lock
        if not self._arm_lock.acquire(blocking=False):  # a launch is under way: it would release it anyway
            return
        self._arming_now = True  # before the checks read the task count (see disarm)
        try:  # re-checked under the lock: a launch, a failed step or a compute task may have begun meanwhile
            if not self._may_arm(p.sid, sess, cache, g, ahead):
                return
            start, end, _ = _step_io(cache).take()
            try:  # ahead: behind the last step enqueued
                self._armed = arming.arm(p.sid, g, start, end, self.compute_stream, self._put if ahead else 0)
            except ArmFailed as e:  # released by mark_read, once the step ahead's result is read
                self._orphan = (arming, e.step)
                raise
        finally:
            self._arming_now = False  # after _armed is set
            self._arm_lock.release()

    def _may_arm(self, sid: str, sess: _Session, cache: Any, g: Any, ahead: int = 0) -> bool:
        """Nothing armed, the stepper not closing, this step (and with ``ahead`` the next one, which
        ``run_ring`` enqueued) the only one in flight, the compute thread idle and no other GPU user
        (Profile), ``sess`` the only session and not failed, ``g`` still its cache's graph."""
        w = self.w
        return bool(
            self._armed is None
            and self._chained is None  # a chained step behind: its inputs come from the GPU (gpu_chain.py)
            and not self._closing
            and self._put == self._done + 1 + ahead
            and w._submitted == w._finished
            and not w.gpu_users
            and len(w.sessions) == 1
            and w.sessions.get(sid) is sess
            and not sess.error
            and cache.graph is g
        )
