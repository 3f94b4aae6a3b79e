"""A wait timed by the GPU's clock, for a thread that must wake at a moment inside a GPU step (``hop_warm.py``).

Why: a host sleep wakes when the scheduler runs the thread again. On the H200 hosts, with four worker processes
and their polling threads on one card (MPS), the completion thread's sleeps woke 0.4 ms and more after their
deadline (thirtieth session: 144 of 174 warm-ups of a middle stage came too late). A CUDA event wait spins
(the default schedule of a process with fewer contexts than CPUs), so a thread waiting on an event stays on
its CPU and sees the event within microseconds: the wait here is a one-thread spin kernel of the right number
of SM cycles (``torch.cuda._sleep``) on a stream of its own, then a wait for an event recorded after it.

The cycle rate is measured once, when the timer is made (a short spin that loads the kernel, then two timed
spins; the second counts); a rate outside 0.3-4 GHz means the measurement was disturbed, and the caller keeps
host sleeps. A GPU whose clock changes
later makes the waits longer or shorter: the caller measures how late each wait ends and aims earlier.

The kernel takes one warp on one SM while it spins: nothing a decode step's kernels would miss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CALIBRATION_CYCLES", "GpuTimer", "cycles_for", "rate_from"]

log = logging.getLogger(__name__)

CALIBRATION_CYCLES = 1_000_000  # ~0.5 ms at the 1.98 GHz of an H100/H200 under load
_RATE_RANGE = (0.3e9, 4e9)  # SM cycles per second a working measurement gives


def rate_from(cycles: int, elapsed_ms: float) -> float:
    """SM cycles per second from one timed spin; a ValueError when the figure cannot be a GPU's clock."""
    if elapsed_ms <= 0:
        raise ValueError(f"a spin of {cycles} cycles timed at {elapsed_ms} ms: the events did not time it")
    rate = cycles / (elapsed_ms / 1e3)
    lo, hi = _RATE_RANGE
    if not lo <= rate <= hi:
        raise ValueError(
            f"a spin of {cycles} cycles took {elapsed_ms:.4f} ms ({rate / 1e9:.2f} GHz), outside "
            f"{lo / 1e9}-{hi / 1e9} GHz: the measurement was disturbed"
        )
    return rate


def cycles_for(seconds: float, rate: float) -> int:
    """The spin kernel's cycle count for a wait of ``seconds`` (at least one cycle)."""
    return max(1, int(seconds * rate))


class GpuTimer:
    """``wait(seconds)`` spins a kernel on a stream of its own for that long and waits (spinning) for its end.
    Made and used on one thread (the completion thread); ``ValueError`` from the constructor when the clock's
    rate cannot be measured."""

    def __init__(self, device: torch.device | str, spin: Callable[[int], Any] | None = None) -> None:
        self.device = torch.device(device)
        self._spin = spin if spin is not None else torch.cuda._sleep
        self.stream = torch.cuda.Stream(self.device)
        self._end = torch.cuda.Event()
        self._mark = torch.cuda.Event(enable_timing=True)
        self.rate = self._calibrate()
        self.waits = 0

    def _calibrate(self) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            self._spin(1000)  # the kernel's first launch loads it: 1M cycles timed 7.9 ms with it (s30b)
            for _ in range(2):  # (the second also finds the SM clock raised by the first)
                a.record()
                self._spin(CALIBRATION_CYCLES)
                b.record()
            b.synchronize()
        rate = rate_from(CALIBRATION_CYCLES, a.elapsed_time(b))
        log.debug("GPU timer on %s: %.3f GHz", self.device, rate / 1e9)
        return rate

    def since(self, event: torch.cuda.Event) -> float:
        """Seconds since the GPU passed ``event`` (a timing event, already complete), by the GPU's clock: an
        event recorded now on this stream, waited for, and the time between the two."""
        with torch.cuda.stream(self.stream):
            self._mark.record()
        self._mark.synchronize()
        return float(event.elapsed_time(self._mark)) / 1e3

    def wait(self, seconds: float) -> None:
        """Return ``seconds`` from now (by the GPU's clock, plus a launch's few µs)."""
        with torch.cuda.stream(self.stream):
            self._spin(cycles_for(seconds, self.rate))
            self._end.record()
        self._end.synchronize()
        self.waits += 1
