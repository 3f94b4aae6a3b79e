"""Armed decode steps: a session's next wire-mode graph enqueued before its frame arrives.

A wire-mode decode graph (``decode_wire.py``) copies its inputs from pinned host memory itself, so it
can be enqueued ahead of time behind a gate kernel (``kernels/armed_wait.py``) that holds the stream
until the host writes a flag. When the frame comes, the host writes the graph's pinned inputs and the
flag (numpy stores, no CUDA call), and the GPU starts the step at once: the launch (checks, an event
record, ``graph.replay()``: 50-100 µs a hop on the lent H100/H200 hosts) is off the critical path.

Rules (``GpuStepper`` keeps them): one armed step per stage at a time, only while the worker has one
open session (an armed step holds the device's compute stream, so any other work waits behind it) and
nothing else is in flight, except, for a one-stage token loop, the session's step before it (armed *ahead*:
the gate waits behind that step, so at its completion the host only writes the inputs and the flag); anything
else that needs the GPU releases it first (``release``: the inputs' positions become padding, so the graph
runs as a no-op on the trash slot, then the flag). A step armed ahead shares its pinned inputs with the step
before it, so the host writes them (fire, release) only after that step has read them (``ArmedStep.ahead``).
The host fires a step only within ``fire_window_s`` of arming it, half the gate's own limit, so the gate
never gives up on a step that was fired; a step found armed for longer is released and launched as usual.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ArmFailed", "ArmedStep", "Arming", "GATE_LIMIT_S", "host_orders_stores"]

GATE_LIMIT_S = 2.0  # the gate kernel gives up after this long (a forgotten release costs at most this)


def host_orders_stores() -> bool:
    """The protocol writes the inputs, then the flag, with plain stores: only hosts whose CPUs keep stores in
    program order (x86-64) may arm; elsewhere (e.g. aarch64) the flag could be seen before the inputs."""
    return platform.machine().lower() in ("x86_64", "amd64")


@dataclass
class ArmedStep:
    sid: str
    graph: Any  # the session cache's wire-mode _Graph (cuda_decode.py)
    target: int  # the flag value that releases it
    armed_at: float  # time.monotonic() when it was enqueued
    start: torch.cuda.Event  # recorded after the gate: the step's GPU start
    end: torch.cuda.Event  # recorded after the graph
    # armed behind a step of the same graph: an event recorded before the gate (that step's inputs read then)
    ahead: Any = None
    # ... and that step's number among the stepper's (``GpuStepper._put``): its result shares the graph's
    # output buffers, so a release from another thread waits until the completion thread has read it
    after: int = 0

    def behind(self) -> None:
        """Wait until the step this one was armed behind has run (at once when it has: the usual case, its
        result having made this step's frame), so that writing the shared pinned inputs cannot change it."""
        if self.ahead is not None:
            self.ahead.synchronize()


class ArmFailed(RuntimeError):
    """``Arming.arm(after=n)`` failed after enqueueing the gate: ``step`` is still closed. Release it once
    the step ahead's result has been read (its padding replay, if enqueued, overwrites that result)."""

    def __init__(self, step: ArmedStep) -> None:
        super().__init__("arming a decode step ahead failed; its gate waits for a release")
        self.step = step


class Arming:
    """The flag and status words of one device's gate (pinned int64 each) and its step counter."""

    def __init__(self, limit_s: float = GATE_LIMIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < limit_s <= 60:
            raise ValueError(f"the gate's limit must be in (0, 60] s, got {limit_s}")
        self.limit_s = limit_s
        self.fire_window_s = limit_s / 2
        self._pinned = torch.cuda.is_available()  # (plain host memory for the CPU tests of the rules)
        self.flag = torch.zeros(1, dtype=torch.int64, pin_memory=self._pinned)
        self.status = torch.zeros(1, dtype=torch.int64, pin_memory=self._pinned)
        self._flag: Any = self.flag.numpy()
        self._status: Any = self.status.numpy()
        self.target = 0
        self.fired = 0  # steps started by their flag
        self.released = 0  # armed steps run as padding (another session, a prompt, a close, a late frame)
        self.gave_up = 0  # ... of which the gate had already given up (no frame or release within its limit)
        self._clock = clock
        self._warm: set[int] = set()  # batch sizes the gate was compiled for
        self._dummy: tuple[torch.Tensor, ...] = ()
        self._ahead: Any = None  # the event of a step armed ahead (one armed step at a time: reused)

    def warm(self, batch: int) -> None:
        """Compile the gate for ``batch`` rows once (a released gate on words of its own, on the current
        stream), so that arming does not compile while the stepper's lock is held."""
        from hyperlane_lab.codecs._kernels import kernel_module

        if batch in self._warm:
            return
        flag = torch.ones(1, dtype=torch.int64, pin_memory=self._pinned)
        status = torch.zeros(1, dtype=torch.int64, pin_memory=self._pinned)
        pos = torch.zeros(batch, dtype=torch.int64, pin_memory=self._pinned)
        kernel_module("armed_wait").armed_wait(flag, status, pos, 1, 1, timer=True)
        self._dummy += (flag, status, pos)  # alive until the gate has run (for good: they are tiny)
        self._warm.add(batch)

    def arm(self, sid: str, graph: Any, start: torch.cuda.Event, end: torch.cuda.Event,
            stream: torch.cuda.Stream, after: int = 0) -> ArmedStep:  # fmt: skip
        """Enqueue gate + ``graph`` on ``stream`` (the current stream of the calling thread, on the
        graph's device). Nothing is written to the graph's inputs here. ``after`` > 0: step number ``after``
        (``ArmedStep.after``), of the same graph, may still be queued on ``stream`` (its inputs not read yet);
        ``fire`` and ``release`` wait for it."""
        from hyperlane_lab.codecs._kernels import kernel_module

        self.target += 1
        positions = graph.io_host[1]  # [B] pinned int64: the gate pads them if it gives up
        gate = kernel_module("armed_wait").armed_wait
        a = ArmedStep(sid, graph, self.target, self._clock(), start, end, after=after)
        with torch.cuda.stream(stream):  # the gate and the graph on the compute stream
            if after:
                if self._ahead is None:
                    self._ahead = torch.cuda.Event()
                a.ahead = self._ahead
                a.ahead.record(stream)
            gate(self.flag, self.status, positions, self.target, int(self.limit_s * 1e9), timer=True)
            try:
                start.record(stream)
                graph.graph.replay()
                graph.staged.record(stream)  # the inputs are read once this passes (step_wire waits on it)
                end.record(stream)
            except BaseException as e:  # open the gate on padding: nothing may wait behind it
                if after:  # not yet: the replay may overwrite the step ahead's unread result
                    raise ArmFailed(a) from e
                graph.io_np[1] = -1
                self._flag[0] = self.target
                raise
        return a

    def fire(self, a: ArmedStep, pos: np.ndarray, x: Any, first: bool) -> bool:
        """Write the step's inputs (``pos`` int64 [B]; ``x``: ids [B] on the first stage, else the
        frame's payload) into the armed graph's pinned buffers, then the flag. False (nothing
        written) when the step was armed longer than ``fire_window_s`` ago: release it and launch."""
        if self._clock() - a.armed_at > self.fire_window_s:
            return False
        a.behind()
        g = a.graph
        g.io_np[1] = pos
        if first:
            g.io_np[0] = x
        else:
            g.wire.put(x)
        self._flag[0] = a.target  # last: x86 keeps the stores above ordered before it
        self.fired += 1
        return True

    def release(self, a: ArmedStep) -> None:
        """Let an armed step run as a no-op: padding positions (K/V writes to the trash slot), then
        the flag. Its result buffers are overwritten; nothing reads them."""
        a.behind()
        a.graph.io_np[1] = -1
        self._flag[0] = a.target
        self.released += 1
        self.gave_up += self.gave_up_on(a)

    def gave_up_on(self, a: ArmedStep) -> bool:
        """The gate of ``a`` ended by its limit, not by the flag (the step ran as padding). Final once
        ``a.end`` passed; before that, False means "not yet"."""
        return int(self._status[0]) == -a.target
