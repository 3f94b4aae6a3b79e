"""Parked KV caches of a CUDA stage, reused by new sessions together with the decode graph captured on them.

A CUDA graph bakes in the addresses of the cache it was captured on, so a session that reuses a parked
cache skips a capture (tens of ms per stage). Caches are allocated in whole multiples of ``POOL_ALIGN``
positions, so sessions of nearby lengths (prompt + max_tokens = 40 and 48, say) share them; before, only
exactly equal lengths did, and every new length captured a graph at every stage. The decode attention
kernel (kernels/decode_attn.py) reads keys up to each row's position only, and takes its split count from
ceil(max_len / 256), which rounding to a multiple of 256 keeps, so with the default the spare slots cost
memory (at most POOL_ALIGN - 1 positions a session), not time; other alignments may add splits, and the
torch fallback (HYPERLANE_FUSED_ATTENTION=0) masks over the whole cache and pays for every slot. A session
still refuses positions past its own max_len (``SessionCache.limit``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from hyperlane_lab.models.sessions import SessionCache

if TYPE_CHECKING:
    from hyperlane_lab.models.stage import TorchStage

__all__ = ["POOL_ALIGN", "CachePool", "pool_align_from_env", "pooled_len"]

log = logging.getLogger(__name__)

POOL_ALIGN = 256


def pooled_len(max_len: int, max_position: int, align: int = POOL_ALIGN) -> int:
    """``max_len`` rounded up to a multiple of ``align``, but not past the model's context
    (``max_position``) unless ``max_len`` itself is."""
    return max(max_len, min(-(-max_len // align) * align, max_position))


def pool_align_from_env() -> int:
    """``HYPERLANE_POOL_ALIGN`` (1: caches of exactly the asked length, as before), else POOL_ALIGN."""
    raw = os.environ.get("HYPERLANE_POOL_ALIGN", "")
    if not raw:
        return POOL_ALIGN
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"HYPERLANE_POOL_ALIGN must be a positive integer (positions), got {raw!r}")
    return int(raw)


class CachePool:
    """Up to ``size`` closed sessions' caches of one stage, oldest first."""

    def __init__(self, stage: TorchStage, size: int = 16) -> None:
        self.stage = stage
        self.size = size
        self.align = pool_align_from_env()  # caches come in multiples of this many positions
        self._parked: OrderedDict[int, SessionCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parked)

    def cache_len(self, max_len: int) -> int:
        """Positions a new session's cache holds when the session asks for ``max_len``."""
        return pooled_len(max_len, self.stage.spec.max_position, self.align)

    def take(self, batch: int, max_len: int) -> SessionCache:
        """A zeroed cache of ``cache_len(max_len)`` positions for a new session (a parked one of that
        shape, with its graph, when there is one); a pooled size that does not fit in memory falls back
        to the asked length (pooling is a speed-up)."""
        slots = self.cache_len(max_len)
        for key, c in self._parked.items():
            if c.batch == batch and c.max_len == slots:
                del self._parked[key]
                c.zero_()
                c.limit = max_len
                return c
        st = self.stage
        try:
            c = SessionCache.zeros(batch, slots, len(st.span), st.spec, st.dtype, st.device)
        except torch.OutOfMemoryError:
            if slots == max_len:
                raise
            log.info("stage %s: no memory for a %d-position cache; allocating %d", st.span, slots, max_len)
            c = SessionCache.zeros(batch, max_len, len(st.span), st.spec, st.dtype, st.device)
        c.limit = max_len
        return c

    def park(self, cache: SessionCache) -> None:
        """Keep a closed session's cache (and graph) for reuse; the oldest beyond ``size`` is freed."""
        cache.step_io = None  # the closed session's steps may still hold them (gpu_steps)
        self._parked[id(cache)] = cache
        while len(self._parked) > self.size:
            self._parked.popitem(last=False)

    def clear(self) -> None:
        self._parked.clear()
