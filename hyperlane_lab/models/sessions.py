"""Per-session KV caches and input checks shared by every stage engine (torch, onnxruntime)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.types import LayerSpan

__all__ = ["SessionCache", "StageSessions", "check_positions", "check_token_ids", "copy_slots"]


def check_token_ids(ids: Any, vocab_size: int) -> None:
    """ValueError unless every id of the (numpy) array is in [0, vocab_size)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), got ids in [{lo}, {hi}]; "
            "encode prompts with this model's tokenizer"
        )


def check_positions(max_pos: int, session_id: str, max_len: int) -> None:
    """ValueError when a step's largest position does not fit the session's cache."""
    if max_pos >= max_len:
        raise ValueError(
            f"position {max_pos} is beyond session {session_id!r}'s max length {max_len}; "
            "open the session with a larger max_len"
        )


@dataclass
class SessionCache:
    batch: int
    max_len: int
    k: list[torch.Tensor]  # per layer [B, Hkv, max_len + 1, D]; slot max_len is the trash slot
    v: list[torch.Tensor]
    graph: Any = field(default=None, repr=False)  # CUDA decode graph bound to these tensors (cuda_decode)
    step_io: Any = field(
        default=None, repr=False
    )  # the worker's reusable per-step events/buffers (gpu_steps)
    writes: int = 0  # steps begun on this cache (prompt graphs check their scratch copy is current)
    # [2, layers, B, Hkv, max_len + 1, D]: one allocation whose views are ``k`` and ``v`` (from
    # ``zeros``), so zeroing and slot copies are one kernel each instead of one per tensor
    kv: torch.Tensor | None = field(default=None, repr=False)
    # positions the open session may write, [0, limit): its own max_len, which a pooled cache
    # (``cache_pool.CachePool.take``) may exceed; -1 = max_len
    limit: int = -1

    def __post_init__(self) -> None:
        if self.limit < 0:
            self.limit = self.max_len

    @classmethod
    def zeros(
        cls, batch: int, max_len: int, layers: int, spec: ModelSpec, dtype: torch.dtype, device: torch.device
    ) -> SessionCache:
        """A zeroed cache of ``layers`` layers, its K and V views of one backing tensor ``kv``."""
        shape = (2, layers, batch, spec.n_kv_heads, max_len + 1, spec.head_dim)
        kv = torch.zeros(shape, dtype=dtype, device=device)
        return cls(batch, max_len, list(kv[0].unbind(0)), list(kv[1].unbind(0)), kv=kv)

    def zero_(self) -> None:
        if self.kv is not None:
            self.kv.zero_()
            return
        for t in (*self.k, *self.v):
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def copy_slots(dst: SessionCache, src: SessionCache, a: int, b: int) -> None:
    """Cache slots ``a..b-1`` of every layer's K and V from ``src`` into ``dst`` (same layers, batch
    and heads; any lengths >= b), in stream order: one copy when both have a backing ``kv``."""
    if not 0 <= a <= b <= min(dst.max_len, src.max_len) + 1:
        raise ValueError(f"slots {a}..{b} do not fit caches of {dst.max_len + 1} and {src.max_len + 1} slots")
    if dst.kv is not None and src.kv is not None and dst.kv.shape[:4] == src.kv.shape[:4]:
        dst.kv[:, :, :, :, a:b].copy_(src.kv[:, :, :, :, a:b])
        return
    d, s = [*dst.k, *dst.v], [*src.k, *src.v]
    torch._foreach_copy_([t[:, :, a:b] for t in d], [t[:, :, a:b] for t in s])


class StageSessions:
    """Session bookkeeping of one stage. Engines set ``spec``, ``span``, ``dtype``, ``device``,
    ``is_first`` and call ``_init_sessions()``; they may override ``_new_cache`` / ``_release``."""

    spec: ModelSpec
    span: LayerSpan
    dtype: torch.dtype
    device: torch.device
    is_first: bool

    def _init_sessions(self) -> None:
        self._sessions: dict[str, SessionCache] = {}
        self._lock = threading.Lock()

    def _new_cache(self, batch: int, max_len: int) -> SessionCache:
        return SessionCache.zeros(batch, max_len, len(self.span), self.spec, self.dtype, self.device)

    def _release(self, cache: SessionCache) -> None:
        """Called with the cache of a closed session (engines may park it for reuse)."""

    def open_session(self, session_id: str, batch: int, max_len: int) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(
                f"session needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}"
            )
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} is already open on stage {self.span}")
        cache = self._new_cache(batch, max_len)
        with self._lock:  # check and insert together: two racing opens of one id can't both win
            taken = session_id in self._sessions
            if not taken:
                self._sessions[session_id] = cache
        if taken:
            self._release(cache)
            raise ValueError(f"session {session_id!r} is already open on stage {self.span}")

    def close_session(self, session_id: str) -> None:
        with self._lock:
            cache = self._sessions.pop(session_id, None)
        if cache is not None:
            self._release(cache)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def session(self, session_id: str) -> SessionCache:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"unknown session {session_id!r} on stage {self.span}; open it first") from None

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    def kv_cache_bytes(self, batch: int, max_len: int) -> int:
        s = self.spec
        return 2 * len(self.span) * batch * s.n_kv_heads * (max_len + 1) * s.head_dim * self.dtype.itemsize

    def input_shape_ok(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Raise ValueError when x/positions don't fit this stage (checked before touching the cache)."""
        if positions.dim() != 2 or positions.dtype != torch.int64:
            raise ValueError(
                f"positions must be int64 [B, S], got {positions.dtype} {tuple(positions.shape)}"
            )
        if positions.shape[1] == 0:
            raise ValueError("forward needs at least one token per row (S >= 1)")
        if self.is_first:
            if x.dim() != 2 or x.dtype != torch.int64:
                raise ValueError(f"first stage takes token ids int64 [B, S], got {x.dtype} {tuple(x.shape)}")
            # range check on host copies only (a device check would sync); the worker and the
            # generation driver check the CPU ids before they reach the GPU
            if x.numel() and x.device.type == "cpu":
                check_token_ids(x.numpy(), self.spec.vocab_size)  # numpy: µs, not tens of µs
        elif x.dim() != 3 or x.shape[-1] != self.spec.hidden_size:
            raise ValueError(
                f"stage {self.span} takes hidden states [B, S, {self.spec.hidden_size}], got {tuple(x.shape)}"
            )
        if tuple(x.shape[:2]) != tuple(positions.shape):
            raise ValueError(f"x {tuple(x.shape)} and positions {tuple(positions.shape)} disagree on [B, S]")

    def _begin_step(
        self, session_id: str, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[SessionCache, int]:
        """Checks every engine's ``forward`` makes first: (the session's cache, the largest position)."""
        cache = self.session(session_id)
        self.input_shape_ok(x, positions)
        if positions.shape[0] != cache.batch:
            raise ValueError(
                f"session {session_id!r} was opened with batch {cache.batch}, got batch {positions.shape[0]}"
            )
        if positions.device.type == "cpu":  # the caller's host copy: no device sync
            max_pos = int(positions.numpy().max())
        else:
            max_pos = int(positions.max())
        check_positions(max_pos, session_id, cache.limit)
        cache.writes += 1
        return cache, max_pos
