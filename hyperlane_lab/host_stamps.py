"""Opt-in host timestamps inside a GPU worker's step path, for attributing host time the trace lumps together.

The trace's ``launch`` event spans a step's whole host path (checks, upload, the forward's own checks, the
graph's input copy, the replay, the K/V copy-out); where a prompt chunk's 0.4-1.3 ms of it go is not in the
trace. With ``HYPERLANE_HOST_STAMPS=<path>`` set (``{pid}`` in it is replaced by the worker's process id),
each step's marks are appended to that file as one JSON line: ``{"kind": "prompt" | "decode" | "wire" |
"complete" | "dispatch", "session": ..., "step": ..., "tokens": ..., "thread": ..., "marks": [[name, t, cpu,
vcs, ivcs], ...]}`` with ``t`` from
``time.perf_counter()``, ``cpu`` the thread's CPU time (``time.thread_time()``) and ``vcs`` / ``ivcs`` its
voluntary / involuntary context switches so far (``getrusage(RUSAGE_THREAD)``; null where the platform cannot
tell, e.g. outside Linux). Between two marks, wall time well above CPU time with voluntary switches means the
thread waited (the GIL, a lock, a blocking call); CPU time close to the wall time means its code itself ran
slowly (cold caches, a low clock); involuntary switches mean the kernel took its core away. The "received"
mark (a time from another thread) has no CPU fields. "dispatch" records are the event loop thread's part of
handing a tensor frame to the compute thread (received, begin, decoded, routed, submitted): the compute
thread's "received -> begin" is that record plus the compute thread's wake-up. A worker holding every layer
whose completion thread launches its token loop's next step (``GpuStepper.run_ring``) ends that step's "complete"
record at a "ring" mark: the next step's "wire" record follows on the same thread, and the tokens' send after it
is not stamped. A mark costs ~2 µs (two system
calls), ~15-30 µs over a prompt step's marks: the stamped path is a little slower than the plain one.

With ``HYPERLANE_HOST_STAMPS_PROBE=1`` as well, each step first times a small pure-Python loop twice and a
trivial torch call twice on its thread (``"probe": [loop, loop again, torch, torch again]``, µs) between a
"probe" mark and the "begin" mark: a first loop slower than the second points at the core's clock or wake-up,
a first torch call much slower than the second at cold caches on the long code path of a torch call. The probe
(~40 µs) sits inside the step's "probe -> begin" interval, and it warms torch's call path for the intervals
after it: read the step's own intervals from a run without it. Lines are written in batches (and at
``flush``); off by default, and then every call is a no-op. ``bench/host_stamps.py`` turns the files into
per-interval medians.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ENV", "PROBE_ENV", "HostStamps", "host_stamps", "probe"]

log = logging.getLogger(__name__)

ENV = "HYPERLANE_HOST_STAMPS"
PROBE_ENV = "HYPERLANE_HOST_STAMPS_PROBE"
_BATCH = 32  # records per write
_PROBE_LOOP = 200  # iterations of the probe's Python loop (~5-10 µs on a warm core)


def _loop() -> int:
    acc = 0
    for i in range(_PROBE_LOOP):
        acc += i
    return acc


def probe() -> list[float]:
    """µs of [a Python loop, the same loop again, a trivial torch call, the same call again] on this thread."""
    import torch

    pc = time.perf_counter
    t0 = pc()
    _loop()
    t1 = pc()
    _loop()
    t2 = pc()
    torch.empty(8)
    t3 = pc()
    torch.empty(8)
    t4 = pc()
    return [round((b - a) * 1e6, 2) for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))]


_Switches = Callable[[], tuple[int | None, int | None]]


def _no_switches() -> tuple[None, None]:
    return None, None


def _switch_reader() -> _Switches:
    """The calling thread's (voluntary, involuntary) context switches so far; (None, None) where the platform
    cannot tell (``RUSAGE_THREAD`` is Linux-only)."""
    try:
        import resource

        who = resource.RUSAGE_THREAD
        resource.getrusage(who)
    except (ImportError, AttributeError, OSError, ValueError):
        return _no_switches

    def read() -> tuple[int | None, int | None]:
        r = resource.getrusage(who)
        return r.ru_nvcsw, r.ru_nivcsw

    return read


def _now(switches: _Switches) -> list[Any]:
    """[wall, thread CPU, voluntary switches, involuntary switches] of the calling thread."""
    vcs, ivcs = switches()
    return [time.perf_counter(), time.thread_time(), vcs, ivcs]


class HostStamps:
    """Marks of the step running on the calling thread; records go to ``path`` (None: disabled)."""

    def __init__(self, path: str | None, probing: bool = False) -> None:
        self.path = path.replace("{pid}", str(os.getpid())) if path else None
        self.enabled = self.path is not None
        self.probing = probing and self.enabled
        self._local = threading.local()
        self._lock = threading.Lock()
        self._done: list[str] = []
        self.records = 0
        self._switches = _switch_reader() if self.enabled else _no_switches

    def begin(
        self, kind: str, session: str, step: int, tokens: int = 0, received: float | None = None
    ) -> None:
        """Open this thread's step; ``received`` (a ``perf_counter`` time, e.g. when its frame was fully
        received) becomes a first mark "received" before "begin" (and before "probe" when probing)."""
        if self.enabled:
            marks: list[list[Any]] = [] if received is None else [["received", received]]
            probed = None
            if self.probing:
                marks.append(["probe", *_now(self._switches)])
                probed = probe()
            marks.append(["begin", *_now(self._switches)])
            self._local.rec = {
                "kind": kind,
                "session": session,
                "step": step,
                "tokens": tokens,
                "thread": threading.current_thread().name,
                "marks": marks,
            }
            if probed is not None:
                self._local.rec["probe"] = probed

    def mark(self, name: str) -> None:
        if self.enabled:
            rec = getattr(self._local, "rec", None)
            if rec is not None:
                rec["marks"].append([name, *_now(self._switches)])

    def end(self) -> None:
        """Close this thread's step (its last mark is "end"); a step without ``begin`` is ignored."""
        if not self.enabled:
            return
        rec = getattr(self._local, "rec", None)
        if rec is None:
            return
        self._local.rec = None
        rec["marks"].append(["end", *_now(self._switches)])
        with self._lock:
            self._done.append(json.dumps(rec))
            self.records += 1
            full = len(self._done) >= _BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            lines, self._done = self._done, []
        if not lines:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
                f.write("\n".join(lines) + "\n")
        except OSError as e:  # a diagnostic must not take the worker down
            log.warning("host stamps: cannot write %s (%s); turning them off", self.path, e)
            self.enabled = False


_INSTANCE: HostStamps | None = None
_INSTANCE_LOCK = threading.Lock()


def host_stamps() -> HostStamps:
    """This process's stamps, configured from ``HYPERLANE_HOST_STAMPS`` on first use."""
    global _INSTANCE
    if _INSTANCE is None:
        with _INSTANCE_LOCK:
            if _INSTANCE is None:
                from hyperlane_lab.models.decode_linear import env_flag  # the project's switch rule

                _INSTANCE = HostStamps(os.environ.get(ENV) or None, probing=env_flag(PROBE_ENV, False))
    return _INSTANCE


def _reset_for_tests(path: str | None) -> Any:
    """Replace the process's instance (tests)."""
    global _INSTANCE
    _INSTANCE = HostStamps(path)
    return _INSTANCE
