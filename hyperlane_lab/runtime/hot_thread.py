"""A worker's compute thread: one thread that runs submitted calls in order and, for a while after each,
waits for the next one by spinning in native code instead of sleeping.

Why: a thread that sleeps between prompt chunks runs its next chunk's host path (checks, upload, graph
replay) 3-4x slower than the same calls back to back: ``bench/host_cold.py`` on the H200 leases, 467 µs
against 125 µs, and the worker's own host stamps show the slow figures on the prompt's critical path. A
thread that spins keeps its core out of idle states. Python cannot spin without holding the GIL between
polls (which starves the worker's other threads, see ``busypoll.py``), so the wait is glibc's
``pthread_spin_lock`` called through ctypes, which releases the GIL for the call: ``submit`` unlocks it.

The spin is bounded: only within ``window_s`` of the last call's end (a watchdog thread ends a spin whose
window has run out) and only where glibc's spin locks exist (Linux); otherwise, and with ``window_s=0``,
the thread blocks on its queue as a ``ThreadPoolExecutor(1)`` does. Spinning holds one core while it
lasts. ``hyperlane worker --compute-spin-us N`` sets the window; by default a GPU worker whose event loop
busy-polls and has 6 usable CPUs per GPU spins for 20 ms (``worker_config.compute_spin_window_us``). On 2 x H200 the spin cut the stand-in
path from 301 to 201 µs in ``host_cold.py`` (seventeenth session) and, once its watchdog was woken once per
window instead of once per spin, raised a chunked 512-token prompt over 2 stages by 2.5-3.7 points of one
GPU in two A/B runs, decode unchanged (bench/gpu_notes.md, eighteenth session).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["HotThread", "SpinWake", "spin_wake_available"]

log = logging.getLogger(__name__)

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class SpinWake:
    """A glibc spin lock used as a wake-up signal: ``wait()`` spins (in native code, the GIL released)
    until another thread calls ``wake()``; a ``wake()`` with nobody waiting lets the next ``wait()``
    return at once (one stored wake-up, as a binary semaphore)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._lock_fn = libc.pthread_spin_lock  # AttributeError where glibc's spin locks are missing
        self._unlock_fn = libc.pthread_spin_unlock
        self._lock = ctypes.c_int(0)  # pthread_spinlock_t is an int on glibc
        self._ref = ctypes.byref(self._lock)
        if libc.pthread_spin_init(self._ref, 0) != 0:
            raise OSError(ctypes.get_errno(), "pthread_spin_init failed")
        self._lock_fn(self._ref)  # held: the first wait() spins until a wake()

    def wait(self) -> None:
        self._lock_fn(self._ref)

    def wake(self) -> None:
        self._unlock_fn(self._ref)


def spin_wake_available() -> bool:
    """True where ``SpinWake`` works (glibc)."""
    try:
        SpinWake()
    except (AttributeError, OSError):
        return False
    return True


_LIVE: weakref.WeakSet[HotThread] = weakref.WeakSet()
_EXIT_HOOK = threading.Lock()
_exit_registered = False


def _stop_at_exit() -> None:
    """As ``ThreadPoolExecutor`` does at exit: stop every thread and let a call in progress finish (a CUDA
    call cut off by the interpreter's teardown can crash it), for at most a few seconds each."""
    live = list(_LIVE)
    for h in live:
        h.shutdown(wait=False, cancel_futures=True)
    for h in live:
        h._thread.join(timeout=5.0)


def _register_exit_hook() -> None:
    global _exit_registered
    with _EXIT_HOOK:
        if not _exit_registered:
            atexit.register(_stop_at_exit)
            _exit_registered = True


class HotThread:
    """``submit(fn, *args) -> Future`` run on one thread, in order (what a worker used
    ``ThreadPoolExecutor(1)`` for), spinning for the next call within ``window_s`` of the last one's end.
    Counters: ``spun`` (calls taken after a spin: wake-ups saved) and ``blocked`` (calls taken after a
    blocking wait). ``submit`` and ``shutdown`` may be called from any thread."""

    def __init__(self, name: str, window_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s >= 0:
            raise ValueError(f"spin window must be >= 0 seconds, got {window_s}")
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._clock = clock
        self._spin: SpinWake | None = None
        if window_s > 0:
            try:
                self._spin = SpinWake()
            except (AttributeError, OSError) as e:
                log.info("%s: no native spin lock here (%s); the thread sleeps between calls", name, e)
        self.window_s = window_s if self._spin is not None else 0.0
        self._last_end = 0.0
        self._closed = False
        self._lock = threading.Lock()  # submit vs shutdown: nothing lands behind the stop marker
        self.spun = 0
        self.blocked = 0
        self.spinning = False  # in a native spin now
        self._watch = threading.Event()  # set when a spin begins: the watchdog times its window
        self._timing = False  # the watchdog is timing a window now (a new spin need not wake it)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._watchdog: threading.Thread | None = None
        if self._spin is not None:
            self._watchdog = threading.Thread(target=self._watch_spins, name=f"{name}-watchdog", daemon=True)
            self._watchdog.start()
        _LIVE.add(self)
        _register_exit_hook()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a stopped compute thread")
            self._q.put((fut, fn, args))
        if self._spin is not None:
            self._spin.wake()
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking calls (``ThreadPoolExecutor.shutdown``'s defaults): ``cancel_futures`` cancels the calls
        not yet started (else they run first); ``wait`` joins the thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._q.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item[0].cancel()
                self._q.put(None)
        if self._spin is not None:
            self._spin.wake()
        self._watch.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ the thread

    def _take(self) -> _Item | None:
        """The next call (None: stop), spinning while the window lasts, then blocking."""
        spin = self._spin
        spun = False
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                pass
            else:
                if item is not None:
                    if spun:
                        self.spun += 1
                    return item
                return None
            if spin is None or self._closed or self._clock() - self._last_end >= self.window_s:
                item = self._q.get()
                if item is not None:
                    self.blocked += 1
                return item
            if not self._timing:
                self._watch.set()
            self.spinning = True
            spin.wait()  # native spin, GIL released: until submit() or the watchdog wakes it
            self.spinning = False
            spun = True

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as e:  # the caller's future carries it
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
            self._last_end = self._clock()

    def _watch_spins(self) -> None:
        """End each spin once the window since the last call has run out (sleeps otherwise); woken once
        a window, not once a spin (the thread re-checks its window after every wake-up)."""
        assert self._spin is not None
        while not self._closed:
            self._watch.wait()
            self._watch.clear()
            self._timing = True
            while not self._closed:
                left = self._last_end + self.window_s - self._clock()
                if left <= 0:
                    break
                time.sleep(left)
            self._timing = False
            with contextlib.suppress(Exception):
                self._spin.wake()
