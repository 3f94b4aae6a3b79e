"""Device buffers for a GPU worker's uploads, allocated once and reused (opt-in: ``HYPERLANE_STAGING_POOL=1``).

``CudaStager.upload`` allocates the device copy of each prompt chunk (or codec frame) on the upload stream and
hands it to the compute stream with ``record_stream``; on the lease hosts that call costs 63-67 µs of host time
to enqueue with the GPU idle and ~150 µs while it computes (``bench/host_calls.py``), against ~10-20 µs for a
copy into a buffer that already exists. This pool keeps such buffers, one list per power-of-two size.

Reuse is synchronized on the host, not with events: a buffer goes back to the pool only once the step that
read it has completed (its GPU work was waited for on the completion thread and its frames were sent: every
kernel and copy that could read the buffer, including a stage output that aliases its input, is done). A step
that fails before that drops its buffer with ``record_stream`` on the compute stream (no wait on the event
loop thread). The pool holds at most ``max_bytes`` (free buffers of other sizes are dropped to make room;
beyond that ``take`` returns None and the caller allocates as before), and drops its free buffers when a new
stage is loaded or the stage unloaded.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["StagingPool"]

MIN_BYTES = 4 << 10  # smaller uploads (a short prompt's token ids) keep the allocating path


class StagingPool:
    def __init__(self, device: torch.device | str, max_bytes: int = 256 << 20) -> None:
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        # taken on the compute / loop thread, given back on the completion thread
        self._lock = threading.Lock()
        self.allocated = 0  # bytes of buffers made and not dropped (in use or free)
        self.reused = 0  # takes served from the free lists

    @staticmethod
    def size_class(nbytes: int) -> int:
        return max(MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())

    def take(self, nbytes: int, stream: torch.cuda.Stream | None = None) -> torch.Tensor | None:
        """A uint8 device buffer of at least ``nbytes`` (a power of two), free for the caller until it is
        given back (``give``) or dropped (``discard``); None when ``nbytes`` is below ``MIN_BYTES`` or the
        budget is spent by buffers in use. Free buffers of other sizes are dropped to make room. A new buffer
        is allocated on ``stream`` (the upload stream)."""
        if nbytes < MIN_BYTES:
            return None
        size = self.size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                self.reused += 1
                return free.pop()
            self._evict_locked(self.allocated + size - self.max_bytes)
            if self.allocated + size > self.max_bytes:
                return None
            self.allocated += size
        try:
            if stream is None:
                return torch.empty(size, dtype=torch.uint8, device=self.device)
            with torch.cuda.stream(stream):
                return torch.empty(size, dtype=torch.uint8, device=self.device)
        except BaseException:  # out of memory, say: the budget is not spent
            with self._lock:
                self.allocated -= size
            raise

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from ``take`` once nothing on any stream can still read or write it."""
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)

    def discard(self, buf: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Drop a buffer from ``take`` that may still be in use on ``stream`` (an error path that must not
        wait): the allocator keeps its memory until ``stream``'s work enqueued so far is done."""
        if stream is not None:
            buf.record_stream(stream)
        with self._lock:
            self.allocated -= buf.numel()

    def clear(self) -> None:
        """Drop the free buffers (a new stage was loaded or the stage unloaded); buffers in use come back
        through ``give`` as usual."""
        with self._lock:
            self._evict_locked(self.allocated)

    def _evict_locked(self, need: int) -> None:
        """Drop free buffers, largest first, until ``need`` bytes are released or none is left."""
        for size in sorted(self._free, reverse=True):
            bufs = self._free[size]
            while bufs and need > 0:
                bufs.pop()
                self.allocated -= size
                need -= size
            if not bufs:
                del self._free[size]

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size * len(bufs) for size, bufs in self._free.items())
