"""A bounded ring of trace events recorded by a worker on its monotonic clock."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["TraceRecord", "TraceRecorder"]


@dataclass(frozen=True)
class TraceRecord:
    seq: int
    stage: int
    kind: str
    start: float
    end: float
    session: str
    step: int
    nbytes: int = 0
    tokens: int = 0


class TraceRecorder:
    def __init__(self, capacity: int = 200_000) -> None:
        self._events: deque[TraceRecord] = deque(maxlen=capacity)
        self._seq = 0
        self._lock = threading.Lock()
        self.stage = 0
        self.enabled = True

    def add(
        self, kind: str, start: float, end: float, session: str, step: int, nbytes: int = 0, tokens: int = 0
    ) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._seq += 1
            self._events.append(
                TraceRecord(self._seq, self.stage, kind, start, end, session, step, nbytes, tokens)
            )

    def since(self, seq: int) -> tuple[list[TraceRecord], int]:
        with self._lock:
            return [e for e in self._events if e.seq > seq], self._seq

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    @staticmethod
    def now() -> float:
        return time.perf_counter()
