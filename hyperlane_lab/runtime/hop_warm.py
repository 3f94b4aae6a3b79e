"""A pipeline hop's warm-up, for ``GpuStepper``: shortly before a decode step's GPU work ends, the completion
thread writes a WARM frame (``frame.py``: a header, nothing else) on the connection the step's frame will take.

Why: a stage sends one frame per token after waiting ~1-2 ms for its GPU step, and a frame sent after such a
pause is slow. On loopback, with a receiver polling for it as the workers do (``busypoll.py``), an 8 KB frame
took 42 µs one way, and 20 µs when a 16-byte frame had gone the same way 100-300 µs before
(``bench/send_warm.py``; a 2-core CPU box). The sender's ``sendmsg`` halves as well: the pause leaves a
delayed ACK that the frame's send then processes (with ``TCP_QUICKACK`` on the receiver the send is fast in
every mode, the delivery still not). The warm-up pays those costs while nothing waits, on a connection that
is otherwise idle: the next stage's GPU is waiting for this frame.

When: a decode step (one position a row) that is the only step in flight here (several in flight: the next
stage is busy, and the extra frame would only cost it), whose frame goes to another process (the next stage;
the last stage's ring frame to the first stage, or its tokens to the client when the client drives the
loop), with GPU times known from at least two of the session's previous decode steps. The estimate is the
shortest of the last four: a step that captured a graph (its "GPU time" holds the host's seconds of capture)
or a slow one never moves it later. The completion thread waits natively for the step's start event (the GPU
began it, an armed step's gate opened), waits until ``lead`` before the expected end, and sends the WARM frame
unless the step is already done; then it waits for the end as before.

The wait needs the GPU's clock (``gpu_timer.py``, made at the first decode step that has a hop to warm), for two
reasons found on one H200 with four workers through MPS (thirtieth session; warm-ups that came after their
step, each making its ship wait: 144 of a middle stage's 174 steps at first, none with both fixes):
- this thread comes to a step only once its launch returned, 150-200 µs of host work after the GPU began it, so
  the wait counts from the start the GPU's clock gives (``GpuTimer.since``), not from the thread's arrival
  (without a GPU clock, from when the step's launch began, ``t_run``: early rather than late);
- a host sleep ends when the scheduler runs the thread again, late on a loaded host: the wait is a spin kernel
  timed by the GPU and a spinning event wait (``GpuTimer.wait``). Where its clock rate cannot be measured, or
  ``HYPERLANE_HOP_WARM_WAIT=host`` asks for it, the wait is a host sleep.

Either wait can end late: the wait is cut by the most the last 8 ended late (300 µs before the first; at most
half the wait, so that an outlier never stops the waits that age it out), and left out when less than 100 µs
would remain (the WARM frame goes at once then). A guess can still be wrong: a step shorter than the shortest
of the last four by more than the lead, or a wait ending later than any recent one, makes the ship wait for
it. ``hop_late`` counts those; ``hop_wake_us`` is the most the recent waits ended late.

A peer from before this frame kind refuses it (an unknown kind closes the connection): in a deployment that
mixes versions, turn warm-ups off.

``HYPERLANE_HOP_WARM=0`` turns it off; ``HYPERLANE_HOP_WARM_LEAD_US`` sets the lead (default 200);
``HYPERLANE_HOP_WARM_WAIT=host`` waits with host sleeps instead of the GPU timer (for comparisons). Health
counts the warm-ups (``hop_warmups``), the late wakes (``hop_warm_late``), how late recent waits ended
(``hop_warm_wake_us``) and the WARM frames a worker dropped (``warm_frames_in``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from hyperlane_lab.models.decode_linear import env_flag
from hyperlane_lab.runtime.gpu_pending import StepperState, _Pending
from hyperlane_lab.runtime.gpu_timer import GpuTimer

if TYPE_CHECKING:
    from hyperlane_lab.runtime.sender import SocketSender

__all__ = ["DEFAULT_LEAD_US", "HopWarm", "lead_from_env", "wait_on_gpu_from_env"]

log = logging.getLogger("hyperlane_lab.runtime.gpu_steps")

DEFAULT_LEAD_US = 200
_RECENT = 4  # decode steps whose GPU times the estimate takes the shortest of
_SHIPS_TO_PEER = ("hidden", "wire", "codec")  # modes whose frame goes to the next stage
_MIN_SLEEP_S = 100e-6  # a shorter wait before the warm-up is skipped: the WARM frame goes at once
_RECENT_SLEEPS = 8  # sleeps whose lateness the next one allows for (the most of them)
_MAX_WAIT_S = 0.05  # steps longer than this are not warmed (a guess that far off would cost as much)
_FIRST_LATE_S = 300e-6  # ... before the first (host sleeps woke 150-250 µs late on the H200 hosts)


def wait_on_gpu_from_env(environ: dict[str, str] | None = None) -> bool:
    """``HYPERLANE_HOP_WARM_WAIT``: ``gpu`` (the default) or ``host``; a clear error otherwise."""
    env = os.environ if environ is None else environ
    text = env.get("HYPERLANE_HOP_WARM_WAIT", "").strip().lower()
    if text not in ("", "gpu", "host"):
        raise ValueError(
            f"HYPERLANE_HOP_WARM_WAIT must be 'gpu' (waits timed by the GPU, the default) or 'host' (host "
            f"sleeps), got {text!r}"
        )
    return text != "host"


def lead_from_env(environ: dict[str, str] | None = None) -> float:
    """``HYPERLANE_HOP_WARM_LEAD_US`` in seconds (default ``DEFAULT_LEAD_US``); a clear error otherwise."""
    env = os.environ if environ is None else environ
    text = env.get("HYPERLANE_HOP_WARM_LEAD_US", "").strip()
    if not text:
        return DEFAULT_LEAD_US / 1e6
    try:
        us = int(text)
    except ValueError:
        us = -1
    if not 10 <= us <= 100_000:
        raise ValueError(
            f"HYPERLANE_HOP_WARM_LEAD_US must be a whole number of µs from 10 to 100000, got {text!r} "
            f"(unset it for the default {DEFAULT_LEAD_US})"
        )
    return us / 1e6


class HopWarm(StepperState):
    """Mixed into ``GpuStepper`` (module docstring). ``_init_hop_warm`` in its ``__init__``; ``_warm_hop`` and
    ``_note_gpu_time`` on the completion thread only, so the estimate needs no lock."""

    # off until ``_init_hop_warm`` (a stepper made without its ``__init__``, as tests do, never warms)
    hop_warm: bool = False
    hop_lead_s: float = DEFAULT_LEAD_US / 1e6
    hop_warmups: int = 0
    hop_late: int = 0  # waits that ended after the step had (no warm-up; the ship went at once)
    _gpu_times: tuple[tuple[str, str, int], deque[float]] | None = None
    _lateness: deque[float]  # (set by _init_hop_warm: without it, warm-ups are off)
    hop_wait_gpu: bool = True  # waits timed by the GPU (HYPERLANE_HOP_WARM_WAIT=gpu), else host sleeps
    _timer: GpuTimer | None = None  # the GPU's clock (gpu_timer.py), made at the first hop to warm
    _timer_tried: bool = False

    def _init_hop_warm(self) -> None:
        self.hop_warm = env_flag("HYPERLANE_HOP_WARM", True)
        self.hop_lead_s = lead_from_env() if self.hop_warm else DEFAULT_LEAD_US / 1e6
        self.hop_wait_gpu = wait_on_gpu_from_env() if self.hop_warm else True
        self.hop_warmups = self.hop_late = 0
        self._gpu_times = None
        self._lateness = deque(maxlen=_RECENT_SLEEPS)
        self._timer, self._timer_tried = None, False

    @property
    def hop_wake_us(self) -> float:
        """The most the recent waits before a warm-up ended late, in µs (0 before any)."""
        lateness = getattr(self, "_lateness", None)
        return max(lateness) * 1e6 if lateness else 0.0

    def _make_timer(self) -> None:
        """(Completion thread, after a step shipped.) The GPU's clock, once: ``since`` always, GPU-timed waits
        when asked for and calibrated (else host sleeps; the reason logged)."""
        self._timer_tried = True
        stage = self.w.stage_index
        try:
            timer = GpuTimer(self.device)
        except Exception as e:  # (no stream: the step's own calls will say more)
            log.warning("stage %d: hop warm-ups without the GPU's clock (host sleeps): %s", stage, e)
            return
        if self.hop_wait_gpu:
            try:
                timer.calibrate()
            except Exception as e:
                log.warning("stage %d: hop warm-ups wait with host sleeps: %s", stage, e)
        self._timer = timer

    def _nap(self, seconds: float) -> None:
        """Wait ``seconds``: by the GPU's clock when the timer has a rate, else a host sleep."""
        timer = self._timer
        if timer is not None and timer.rate is not None:
            timer.wait(seconds)
        else:
            time.sleep(seconds)

    @staticmethod
    def _hop_key(p: _Pending) -> tuple[str, str, int]:
        return (p.sid, p.mode, p.batch)

    def _late_guess(self) -> float:
        """How late this thread's sleeps wake: the most of the last ``_RECENT_SLEEPS`` (``_FIRST_LATE_S`` before any).
        The caller allows at most half the wait for it, so that an outlier (a preempted thread) never stops the
        sleeps that would age it out."""
        return max(self._lateness) if self._lateness else _FIRST_LATE_S

    def _note_gpu_time(self, p: _Pending, seconds: float) -> None:
        """A decode step's GPU time, for the estimate of the session's next ones (the last session's only)."""
        if p.seq != 1 or p.chained:
            return
        key = self._hop_key(p)
        if self._gpu_times is None or self._gpu_times[0] != key:
            self._gpu_times = (key, deque(maxlen=_RECENT))
        self._gpu_times[1].append(seconds)
        if (  # (a stage with no hop to warm, one worker's loop, never pays the timer's calibration)
            self.hop_warm
            and not self._timer_tried
            and getattr(self, "device", None) is not None
            and self._hop_conn(p) is not None
        ):
            self._make_timer()

    def _hop_conn(self, p: _Pending) -> SocketSender | None:
        """The connection step ``p``'s frame will take to another process, if it takes one."""
        w = self.w
        if p.mode in _SHIPS_TO_PEER:
            return w.out.conn
        if p.mode not in ("greedy", "sample"):
            return None
        sess = w.sessions.get(p.sid)
        if sess is None:
            return None
        if sess.ring is None:  # the client drives the loop: it waits for the tokens
            return w.out.extra.get(sess.reply_to)
        if sess.ring_here or p.step + 1 >= sess.ring[1]:  # the loop stays here, or ends with this step
            return None
        return w.out.extra.get(sess.ring[0])

    def _warm_hop(self, p: _Pending) -> bool:
        """(Completion thread, before it waits for step ``p``.) Warm the step's hop if the rules in the module
        docstring allow; True when a WARM frame went out."""
        times = self._gpu_times
        if not self.hop_warm or times is None or p.seq != 1 or p.chained or p.wasted:
            return False
        if times[0] != self._hop_key(p) or len(times[1]) < 2 or self._put - self._done != 1:
            return False  # (one time alone may be a graph capture's: the host's seconds of capture in it)
        wait = min(times[1]) - self.hop_lead_s
        if not self.hop_lead_s <= wait <= _MAX_WAIT_S:  # a step too short to place the warm-up in, or long
            return False
        conn = self._hop_conn(p)
        if conn is None:
            return False
        last = p.last
        try:
            already = p.start.query()
            p.start.synchronize()  # the GPU began the step (releases the GIL while it waits)
            began = time.perf_counter()  # (read before ``since``: its own µs make the start early, not late)
            if self._timer is not None:  # this thread may come to the step well after its start: by how much
                began -= self._timer.since(p.start)
            elif already and p.t_run > 0:  # no clock to ask: it began after its launch did (errs early)
                began = min(began, p.t_run)
            if last.query():
                return False
            # the wait ends late (a launch, a clock that changed; a host sleep: the thread's wake-up): aim earlier
            nap = wait - min(self._late_guess(), wait / 2) - (time.perf_counter() - began)
            if nap > _MIN_SLEEP_S:  # (shorter: warm now, since a wait this short may well end past the end)
                t0 = time.perf_counter()
                self._nap(nap)
                self._lateness.append(max(0.0, time.perf_counter() - t0 - nap))
                if last.query():  # done meanwhile (woke too late): ship it now
                    self.hop_late += 1
                    return False
        except Exception as e:  # the step's own wait reports a GPU failure; warm-ups stop here
            log.warning("stage %d: hop warm-ups off: %s", self.w.stage_index, e)
            self.hop_warm = False
            return False
        if not conn.warm():
            return False
        self.hop_warmups += 1
        return True
