"""Busy polling for a worker's event loop: a selector that, for a while after the last socket event,
polls without sleeping instead of blocking in ``epoll_wait``.

Why: on virtual machines an idle vCPU halts, and waking it for an arriving frame costs tens of µs
(``bench/socket_wake.py``: ~70 µs one-way blocking vs ~23 µs to a spinning receiver on the H200
leases); the sender's ``sendmsg`` pays part of it too. A pipeline hop has two such wake-ups on its
critical path. Spinning costs one core per worker while it spins, so it is opt-in
(``hyperlane worker --busy-poll-us N``) and bounded: it spins only within ``window_s`` of the last
event and only while ``should_spin()`` says the worker has nothing in flight (a completion thread
waiting for the GIL would otherwise queue behind the spinning loop thread for up to the switch
interval). Measured (bench/RESULTS.md): it helps on some hosts (4 stages on 4 x H200: +9.7%) and is
neutral on others; a shorter GIL switch interval on its own made every split slower.
"""

from __future__ import annotations

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
    blocks as usual. Counters: ``spun`` (selects answered while spinning), ``blocked``."""

    def __init__(
        self,
        window_s: float,
        should_spin: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s >= 0:
            raise ValueError(f"busy-poll window must be >= 0 seconds, got {window_s}")
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
            while now < end and self.should_spin():
                ready = super().select(0)
                if ready:
                    self.spun += 1
                    return self._hot(ready)
                now = self._clock()
            if timeout is not None:
                timeout = max(0.0, timeout - (now - start))
        ready = super().select(timeout)
        if ready and timeout != 0:
            self.blocked += 1
        return self._hot(ready)
