"""The GPU's clock for a thread that must act at a moment inside a GPU step (``hop_warm.py``): how long ago the
GPU passed an event (``since``), and a wait timed by the GPU (``wait``).

Why: the completion thread comes to a step only after its launch returned, 150-200 µs after the GPU began it on
the H200 hosts, so "now" is no measure of the step's start; and a host sleep ends when the scheduler runs the
thread again, late on a loaded host (four workers and their threads on one card). Thirtieth session, 4 stages
through MPS: with host sleeps counted from the thread's arrival, the middle stages' warm-ups came after the
step in 144 of 174 steps; with GPU-timed waits still counted from the arrival, in 48-135; with both from here,
in none.

- ``since(event)``: an event recorded now on this timer's stream, waited for, and the GPU time between the two.
- ``wait(seconds)``: a one-thread spin kernel of that many SM cycles (``torch.cuda._sleep``, a private torch
  API that its own tests use) on the same stream, then a wait for an event recorded after it. A CUDA event wait
  spins (the default for a process with fewer contexts than CPUs), so the thread stays on its CPU. Under load
  (s30d) the waits ended 61-97 µs after their mark: the launch from Python, the event wait, the GIL.

The stream is a high-priority one (the pool other than the default streams'), so that its short kernels are
scheduled ahead of a step's pending blocks. The spin takes one warp on one SM while it runs.

``calibrate()`` measures the cycle rate: a short spin loads the kernel (its first launch's module load, timed
inside a spin, gave 0.13 GHz in s30b), then the fastest of three timed spins counts (a disturbance only makes
one longer). A rate outside 0.3-4 GHz is refused (ValueError); ``since`` works without it. A clock that
changes later makes waits longer or shorter: the caller measures how late each ends and aims earlier.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["CALIBRATION_CYCLES", "GpuTimer", "cycles_for", "rate_from"]

log = logging.getLogger(__name__)

CALIBRATION_CYCLES = 1_000_000  # ~0.5 ms at the 1.98 GHz of an H100/H200 under load
_RATE_RANGE = (0.3e9, 4e9)  # SM cycles per second a working measurement gives
_TIMED_SPINS = 3


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
    """The GPU's clock on ``device`` (module docstring). Made and used on one thread (the completion thread)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device, priority=-1)
        self._end = torch.cuda.Event()
        self._mark = torch.cuda.Event(enable_timing=True)
        self.rate: float | None = None  # SM cycles per second (``calibrate``); None: no waits
        self.waits = 0

    def calibrate(self) -> float:
        """Measure the SM cycle rate (module docstring); ValueError when no spin gave a GPU's clock."""
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(_TIMED_SPINS)]  # fmt: skip
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(1000)  # loads the kernel before anything is timed
            for a, b in pairs:
                a.record()
                torch.cuda._sleep(CALIBRATION_CYCLES)
                b.record()
        pairs[-1][1].synchronize()
        self.rate = rate_from(CALIBRATION_CYCLES, min(a.elapsed_time(b) for a, b in pairs))
        log.debug("GPU timer on %s: %.3f GHz", self.device, self.rate / 1e9)
        return self.rate

    def since(self, event: torch.cuda.Event) -> float:
        """Seconds since the GPU passed ``event`` (a timing event, already complete), by the GPU's clock."""
        with torch.cuda.stream(self.stream):
            self._mark.record()
        self._mark.synchronize()
        return float(event.elapsed_time(self._mark)) / 1e3

    def wait(self, seconds: float) -> None:
        """Return ``seconds`` from now by the GPU's clock (plus the launch and the event wait). Needs ``calibrate``."""
        if self.rate is None:
            raise RuntimeError("GpuTimer.wait before calibrate()")
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(cycles_for(seconds, self.rate))
            self._end.record()
        self._end.synchronize()
        self.waits += 1
