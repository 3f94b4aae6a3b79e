"""One way to capture a CUDA graph, shared by the decode graphs and the prompt graphs.

Python's cyclic garbage collector is held off for the capture. A collection that runs while this
thread captures (any Python allocation may start one) can free an old ``torch.cuda.CUDAGraph``
left in a reference cycle; its destructor calls ``cudaGraphExecDestroy``, which is not permitted
while the stream captures, and the whole capture fails ("operation not permitted when stream is
capturing"). Seen on an H200 when a prompt graph was re-captured right after its predecessors were
dropped. ``torch.cuda.graph`` itself collects before it captures for the same reason (the GEMV
timer, ``kernels/gemv.py``, still uses it: a collection inside its short capture is possible, but
only graphs it made itself could be freed there). Where many graphs are dropped at once (the prompt
graphs' scratch growth) the caller collects right after (``collect_dropped``), outside any capture,
so their memory goes back at once; elsewhere dropped graphs go at the next collection, which cannot
fall inside a capture.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["collect_dropped", "graph_capture"]


@contextlib.contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, pool: Any = None) -> Iterator[None]:
    """``graph.capture_begin`` (thread-local error mode) ... ``capture_end``, with the cyclic GC
    disabled in between (restored afterwards, also when the body raises)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()
    finally:
        if was_enabled:
            gc.enable()


def collect_dropped() -> None:
    """Free graphs just dropped that sit in reference cycles, now rather than inside a later capture."""
    gc.collect()
