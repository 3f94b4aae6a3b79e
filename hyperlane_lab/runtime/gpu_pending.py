"""The GPU stepper's record of a step in flight (``_Pending``) and a session cache's reused pinned buffers and
timing events (``_StepIO``), shared by ``gpu_steps.py`` and its mixins (``gpu_complete``, ``gpu_arming``,
``gpu_chain``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hyperlane_lab.models.decode_armed import ArmedStep

__all__ = ["_Pending", "_StepIO", "_step_io"]


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
    one-stage ring's."""

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
