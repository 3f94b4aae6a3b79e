"""Busy polling for a worker's event loop: a selector that, for a while after the last socket event,
polls without sleeping instead of blocking in ``epoll_wait``.

Why: on virtual machines an idle vCPU halts, and waking it for an arriving frame costs tens of µs
(``bench/socket_wake.py``: ~70 µs one-way blocking vs ~23 µs to a spinning receiver on the H200
leases); the sender's ``sendmsg`` pays part of it too. A pipeline hop has two such wake-ups on its
critical path. Spinning costs one core per worker while it spins, so it is opt-in
(``hyperlane worker --busy-poll-us N``) and bounded: it spins only within ``window_s`` of the last
event and only while ``should_spin()`` says the worker has nothing in flight. The spinning thread
drops the GIL for each poll but takes it straight back, and CPython's forced hand-off after the
switch interval does not fire while the GIL keeps changing hands, so another thread that wants the
GIL may wait until the spin ends (at most the window): hence no spinning while the worker's own
threads have work, and gRPC calls that arrive while idle may be answered up to a window late.
Measured (bench/RESULTS.md): it helps on some hosts (4 stages on 4 x H200: +9.7%) and is neutral
on others; a shorter GIL switch interval on its own made every split slower.
"""

from __future__ import annotations

import math
import selectors
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BusyPollSelector"]


def _always() -> bool:
    return True


class BusyPollSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """``select(timeout)`` polls (timeout 0) in a loop while the selector is "hot" (an event came
    within ``window_s``) and ``should_spin()`` is true, up to the caller's timeout; otherwise it
    blocks as usual. Counters: ``spun`` (events found by polling after at least one empty poll:
    wake-ups saved) and ``blocked`` (blocking waits that returned events, the worker's own
    wake-ups from its other threads included)."""

    def __init__(
        self,
        window_s: float,
        should_spin: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(window_s) and window_s >= 0):
            raise ValueError(f"busy-poll window must be a finite number of seconds >= 0, got {window_s}")
        super().__init__()
        self.window_s = float(window_s)
        self.should_spin = should_spin or _always
        self._clock = clock
        self._hot_until = 0.0
        self.spun = 0
        self.blocked = 0

    def _hot(self, ready: list[Any]) -> list[Any]:
        if ready:
            self._hot_until = self._clock() + self.window_s
        return ready

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.window_s > 0 and (timeout is None or timeout > 0):
            now = start = self._clock()
            end = self._hot_until if timeout is None else min(self._hot_until, start + timeout)
            polls = 0
            while now < end and self.should_spin():
                ready = super().select(0)
                if ready:
                    self.spun += polls > 0  # found waiting on the first poll: nothing was saved
                    return self._hot(ready)
                polls += 1
                now = self._clock()
            if timeout is not None:
                timeout = timeout - (now - start)
                if timeout < 1e-6:  # epoll rounds any positive timeout up to a whole millisecond
                    timeout = 0.0
        ready = super().select(timeout)
        if ready and timeout != 0:
            self.blocked += 1
        return self._hot(ready)
