"""The GPU stepper's record of a step in flight (``_Pending``), a session cache's reused pinned buffers and
timing events (``_StepIO``), and the state its mixins share (``StepperState``), for ``gpu_steps.py`` and its
mixins (``gpu_complete``, ``gpu_arming``, ``gpu_chain``)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.models.decode_armed import ArmedStep, Arming

if TYPE_CHECKING:
    from hyperlane_lab.models.decode_wire import WireSpec
    from hyperlane_lab.runtime.dataplane import Frame
    from hyperlane_lab.runtime.frame import FrameHeader
    from hyperlane_lab.runtime.staging import StagingPool
    from hyperlane_lab.runtime.worker import Worker

__all__ = ["StepperState", "_Pending", "_StepIO", "_step_io"]


@dataclass
class _Pending:
    sid: str
    step: int
    batch: int
    seq: int
    queued_at: float
    tokens: int
    pos_bytes: bytes
    out: torch.Tensor  # device result (kept alive until shipped)
    start: torch.cuda.Event  # compute stream, before forward
    end: torch.cuda.Event  # compute stream, after forward (+ argmax)
    host: torch.Tensor | None  # pinned copy of the payload (raw / greedy), filled by `done`
    done: torch.cuda.Event | None
    mode: str  # "hidden" (raw hidden), "greedy" (ids + flag), "sample", "codec", "none" (a prompt chunk),
    # "wire" (a wire-mode graph's encoded payload, see models/decode_wire.py)
    flags: int = 0  # the frame's flags, passed on to the next stage
    wire: Any = None  # the graph's WireIO (mode "wire")
    t_run: float = 0.0  # host clock when the step began on its thread (the "queue" event ends here)
    t_launched: float = 0.0  # host clock when its GPU work was enqueued (the "launch" event ends here)
    staged_in: torch.Tensor | None = None  # the StagingPool buffer of its input, given back when done
    armed: ArmedStep | None = None  # started by its flag (decode_armed.py): check the gate did not give up
    final: bool = False  # the token loop ended with this step (set by the ship): arm nothing after it
    # chained behind the step before it, inputs made on the GPU (gpu_chain.py); it ships only once confirmed by
    # that step's ring frame
    chained: bool = False
    confirmed: bool = False
    slot: Any = None  # numpy view of the pinned copy of its result, when a step was chained behind it

    @property
    def last(self) -> torch.cuda.Event:
        """The step's last event: its copy's (``done``) if it has one, else the compute stream's ``end``."""
        return self.done if self.done is not None else self.end

    @property
    def wasted(self) -> bool:
        """A chained step its predecessor's ship did not confirm: it ran as padding, nothing of it ships."""
        return self.chained and not self.confirmed


_Events = tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]  # start, end (compute), done (copy)


@dataclass
class _StepIO:
    """Per session cache (so per decode graph): pinned result buffers, and three sets of timing events
    taken in turns (``take``). The completion thread reads a step's GPU times after its frame is
    out; by then the session's next step may have started (a one-stage ring starts it from the
    ship) and, armed ahead, the one after it may be enqueued (after those reads; a released one's set
    is skipped by the next launch), each recording into another set. Decode steps only (no ``FLAG_MORE``
    chunks, several of which may be in flight): one step of a session in flight per stage, but a
    one-stage ring's (chained: the completing step, the one in flight, the one chained behind it)."""

    events: tuple[_Events, ...]
    host: dict[str, torch.Tensor]
    turn: int = 0

    def take(self) -> _Events:
        """The event set for the step about to be launched or armed (the next one in turn)."""
        self.turn = (self.turn + 1) % len(self.events)
        return self.events[self.turn]


def _step_io(cache: Any) -> _StepIO:
    io = cache.step_io
    if io is None:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
        io = cache.step_io = _StepIO(tuple((ev[i], ev[i + 1], ev[i + 2]) for i in range(0, 9, 3)), {})
    return io  # type: ignore[no-any-return]


class StepperState:
    """What ``GpuStepper`` (``gpu_steps.py``) holds and its mixins use: the fields it sets in ``__init__``, and
    the methods one part calls on another. Last in the stepper's bases, so these stubs never hide the real ones."""

    w: Worker
    device: torch.device
    compute_stream: torch.cuda.Stream
    side_stream: torch.cuda.Stream
    pool: StagingPool | None
    arming: Arming | None
    _q: queue.SimpleQueue[_Pending | None]
    _thread: threading.Thread  # the completion thread
    _arm_lock: threading.RLock
    _armed: ArmedStep | None
    _arming_now: bool
    _closing: bool
    _put: int
    _done: int
    _read: int
    _orphan: tuple[Arming, ArmedStep] | None  # a step whose arming ahead failed, its gate still closed
    ring_steps: int
    ring_ahead: tuple[str, int] | None
    arm_ahead: bool
    _chained: _Pending | None
    _chain_due: _Pending | None
    _last: _Pending | None

    def _on_device(self) -> None:  # GpuStepper's
        raise NotImplementedError

    def _enqueue(self, p: _Pending) -> None:  # GpuStepper's
        raise NotImplementedError

    def wire_spec(self, h: FrameHeader) -> WireSpec | None:  # GpuStepper's
        raise NotImplementedError

    def _run_wire(self, frame: Frame, spec: WireSpec, queued_at: float) -> None:  # GpuStepper's
        raise NotImplementedError

    def _warm_hop(self, p: _Pending) -> bool:  # HopWarm's
        raise NotImplementedError

    def _note_gpu_time(self, p: _Pending, seconds: float) -> None:  # HopWarm's
        raise NotImplementedError

    def mark_read(self) -> None:  # ArmedSteps'
        raise NotImplementedError

    def release_session(self, sid: str) -> None:  # ArmedSteps'
        raise NotImplementedError

    def _arm_after(self, p: _Pending) -> None:  # ArmedSteps'
        raise NotImplementedError

    def _confirm(self, frame: Frame) -> bool:  # ChainedSteps'
        raise NotImplementedError

    def _chain_after(self) -> None:  # ChainedSteps'
        raise NotImplementedError

    def _forget_chain(self, p: _Pending) -> None:  # ChainedSteps'
        raise NotImplementedError
