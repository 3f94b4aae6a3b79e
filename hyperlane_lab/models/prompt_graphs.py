"""Prompt steps (S > 1 new tokens) of a ``TorchStage`` on CUDA, replayed as CUDA graphs per length bucket.

Why: a Llama-2-7B prompt step of 512 tokens needs ~18-20 ms of H100 time, while the host spends
~0.8 ms a layer dispatching it (compiled-layer wrappers, cuBLAS and flash-attention calls, ~20
launches): ~25 ms a forward on the lent VMs, so the host, not the GPU, set the prompt speed
(``bench/prefill_probe.py``). A replay costs the host tens of µs. The same holds, per stage, for
each chunk of a prompt sent in chunks down a pipeline (``AutoDistributedModel.prefill_chunk``).

Scope: prompt steps whose rows all hold the same consecutive positions ``start .. start+S-1``
(``TorchStage._prompt_start``) with 2 <= S <= ``max_tokens`` (``HYPERLANE_PROMPT_GRAPHS``, default
1024; 0 turns prompt graphs off), ``start`` a multiple of 64 (chunk boundaries; a chat turn at
any position would capture a graph used once) and ``start + bucket <= max_context`` (4 x
``max_tokens``); at most ``MAX_GRAPHS`` graphs are kept (least recently used dropped). A
fresh prompt (``start == 0``) that no sliding window cuts into uses plain causal attention over
the new tokens (flash kernels); a later chunk (``start > 0``), or a window cutting in, attends
through the eager path's mask (``layers.attention_mask``). Padded prompts, longer prompts and
chunks, and ``all_logits`` calls take the eager path.

How: the chunk is padded at the end to a bucket (``prompt_bucket``: 16, 32, 64, then multiples of
64) and replayed from a graph captured per (batch, bucket, start). Causal attention keeps the
padding invisible to the real tokens (row i sees keys up to its own position only), so the real
rows are the eager path's up to rounding (the products run with M = bucket, not S). The graphs
read and write K/V in a scratch cache per batch size, shared by all of them and grown with the
longest context seen (``scratch_len``); after the replay the chunk's S slots are copied into the
session's cache (one copy, ``sessions.copy_slots``) and the output is copied out of the graph's buffer, both
in stream order, so the graphs share one memory pool and any session can use any graph. A later
chunk needs the keys before it in the scratch: they are there when the batch's previous replay
was this session's previous step (``SessionCache.writes`` counts steps); otherwise they are first
copied in from the session's cache.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.capture import collect_dropped, graph_capture
from hyperlane_lab.models.layers import attention_mask
from hyperlane_lab.models.sessions import SessionCache, copy_slots

if TYPE_CHECKING:
    from hyperlane_lab.models.cuda_decode import GraphDecoder

__all__ = ["CONTEXT_FACTOR", "PromptGraphs", "prompt_bucket", "prompt_graph_max_tokens", "scratch_len"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024
CONTEXT_FACTOR = 4  # a chunk's graph applies while start + bucket <= CONTEXT_FACTOR * max_tokens
START_ALIGN = 64  # a later chunk's graph only where start is a multiple (chunk boundaries, not chat turns)
MAX_GRAPHS = 48  # per stage; beyond it the least recently used graph is dropped


def prompt_graph_max_tokens() -> int:
    """``HYPERLANE_PROMPT_GRAPHS``: the longest prompt replayed from a graph (0 = none)."""
    raw = os.environ.get("HYPERLANE_PROMPT_GRAPHS", str(DEFAULT_MAX_TOKENS))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(
            f"HYPERLANE_PROMPT_GRAPHS={raw!r} is not an integer; set the longest prompt to replay "
            f"from a CUDA graph (e.g. {DEFAULT_MAX_TOKENS}), or 0 to turn prompt graphs off"
        ) from None
    if n < 0:
        raise ValueError(f"HYPERLANE_PROMPT_GRAPHS={n} must be >= 0 (0 turns prompt graphs off)")
    return n


def prompt_bucket(seq: int, max_tokens: int) -> int | None:
    """The padded length a prompt of ``seq`` tokens replays at, or None (eager): powers of two
    from 16 up to 64, then multiples of 64 (at most 63 padding tokens: <= 12% from 512 on)."""
    if seq < 2 or seq > max_tokens:
        return None
    if seq <= 64:
        return max(16, 1 << (seq - 1).bit_length())
    return -(-seq // 64) * 64


def scratch_len(need: int, max_context: int) -> int:
    """Slots of a scratch K/V cache that holds ``need`` tokens (a chunk's start + bucket): the next
    power of two (at least 64, at most ``max_context`` rounded up to a bucket), so it grows a few
    times at most as longer prompts come."""
    cap = prompt_bucket(max_context, max_context) or need
    return max(need, min(cap, max(64, 1 << (need - 1).bit_length())))


@dataclass
class _PromptGraph:
    graph: torch.cuda.CUDAGraph
    x_in: torch.Tensor  # [B, bucket] ids (first stage) or [B, bucket, H] hidden
    last: torch.Tensor  # [1] int64: index of the last real token (last stage)
    out: torch.Tensor  # [B, bucket, H] hidden, or [B, V] fp32 logits (last stage)
    keep: tuple[torch.Tensor, ...]  # the other tensors the graph reads (positions, RoPE rows,
    # masks): kept alive, the graph holds only their addresses
    read: torch.cuda.Event | None = None  # fires once the last replay has read x_in (``track_reads``)


class PromptGraphs:
    """One stage's prompt graphs, keyed by (batch, bucket, start). Used by ``GraphDecoder.prompt_step``."""

    def __init__(self, decoder: GraphDecoder, max_tokens: int | None = None) -> None:
        self.dec = decoder
        self.stage = decoder.stage
        self.max_tokens = prompt_graph_max_tokens() if max_tokens is None else max_tokens
        self._graphs: OrderedDict[tuple[int, int, int], _PromptGraph] = OrderedDict()  # LRU order
        self._scratch: dict[int, SessionCache] = {}  # per batch: the graphs' K/V (max_len = slots - 1)
        # per batch: the cache whose keys the scratch holds, its ``writes`` then, and how many
        self._holds: dict[int, tuple[weakref.ref[SessionCache], int, int]] = {}
        self._pool: Any = None  # one memory pool for every bucket's graph
        self.broken = ""  # why a capture failed: prompts run eagerly from then on
        self.captures = 0
        self.replays = 0
        self.prefix_copies = 0  # later chunks whose keys before them were copied into the scratch
        # direct uploads (``input_slot``): each replay records when it has read its input, so that the next
        # upload into that input waits for it. Turned on by the first ``input_slot`` call
        self.track_reads = False
        self.direct_inputs = 0  # replays whose input was uploaded straight into x_in

    @property
    def max_context(self) -> int:
        return CONTEXT_FACTOR * self.max_tokens

    def _scratch_for(self, batch: int, need: int) -> SessionCache:
        """The batch's scratch K/V, grown to hold ``need`` tokens (``scratch_len``). Growing it
        drops the batch's graphs (they use the old one): they are captured again on use."""
        have = self._scratch.get(batch)
        if have is None or have.max_len + 1 < need:
            if have is not None:  # replays of the graphs about to go may still be running
                torch.cuda.current_stream(self.stage.device).synchronize()
            for key in [key for key in self._graphs if key[0] == batch]:
                del self._graphs[key]
            if not self._graphs:  # the pool dies with its last graph: the next capture makes one
                self._pool = None
            self._scratch.pop(batch, None)  # freed before the larger one is made
            self._holds.pop(batch, None)
            if have is not None:
                del have
                collect_dropped()
            st = self.stage
            slots = scratch_len(need, self.max_context)
            self._scratch[batch] = SessionCache.zeros(
                batch, slots - 1, len(st.span), st.spec, st.dtype, st.device
            )
        return self._scratch[batch]

    def _key(self, batch: int, seq: int, start: int) -> tuple[int, int, int] | None:
        """The graph key (batch, bucket, start) of a prompt step, or None when no graph applies."""
        bucket = prompt_bucket(seq, self.max_tokens)
        if bucket is None or self.broken or start % START_ALIGN or start + bucket > self.max_context:
            return None
        return batch, bucket, start

    def ready(self, batch: int, seq: int, start: int) -> bool:
        """True when ``run`` for this prompt step would replay an already captured graph (no capture, no
        eager fallback): the step then only enqueues work, and a latency-critical thread may run it."""
        key = self._key(batch, seq, start)
        return key is not None and key in self._graphs

    def input_slot(self, batch: int, seq: int, start: int) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """Where a later stage's prompt step of this shape may upload its hidden state directly: the first
        ``seq`` rows of the captured graph's input ``[batch, seq, H]`` and the event after which nothing
        reads them any more (copy after it on another stream; ``run`` then skips its input copy). None when
        no graph is captured for the step, for the first stage (token ids go through ``run``'s host path),
        while the graph has no recorded replay since reads are tracked (its next replay records one), while
        its last replay has not finished (the upload would wait for it: the copying path overlaps it
        instead), or when the rows are not contiguous (batch > 1 with padding: ``copy_`` would stage them
        through a temporary)."""
        self.track_reads = True
        key = self._key(batch, seq, start)
        g = self._graphs.get(key) if key is not None else None
        if g is None or self.stage.is_first or g.read is None:
            return None
        view = g.x_in[:, :seq]
        if not view.is_contiguous() or not g.read.query():
            return None
        return view, g.read

    def run(self, cache: SessionCache, x: torch.Tensor, seq: int, start: int = 0) -> torch.Tensor | None:
        """The prompt step of ``seq`` tokens at positions ``start ..`` of every row from its
        bucket's graph, or None when no graph applies (the caller runs the eager path). ``x``: CPU
        ids [B, S] (first stage; device ids work too) or hidden [B, S, H] in the stage's dtype.
        Called from ``TorchStage.forward`` after its checks (which count the step in ``writes``)."""
        key = self._key(x.shape[0], seq, start)
        if key is None:
            return None
        batch, bucket, _ = key
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._capture(batch, bucket, start)
            except Exception as e:  # a capture that fails must not take the worker down
                self.broken = f"{type(e).__name__}: {e}"[:300]
                log.warning("stage %s: prompt graph capture failed (%s); prompts run eagerly",
                            self.stage.span, self.broken)  # fmt: skip
                return None
            self._graphs[key] = g
            if len(self._graphs) > MAX_GRAPHS:  # drop the least recently used (after its replays)
                torch.cuda.current_stream(self.stage.device).synchronize()
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        st = self.stage
        scratch = self._scratch[batch]
        hs = host_stamps()
        hs.mark("pg:found")
        with torch.cuda.device(st.device):
            held = self._holds.pop(batch, None)  # set again only once this replay's K/V are in place
            if start and not (held and held[0]() is cache and held[1:] == (cache.writes - 1, start)):
                # the keys before this chunk are not (all) in the scratch: copy them in
                copy_slots(scratch, cache, 0, start)
                self.prefix_copies += 1
                hs.mark("pg:prefix")
            # padding: zeros (id 0 is valid; zero rows, not the previous prompt's, stay finite
            # whatever came before); the padding's outputs are never read
            if x.device.type == "cpu":  # host ids (or hidden): padded here, one copy
                padded = x.new_zeros(g.x_in.shape)
                padded[:, :seq] = x
                # non_blocking: the driver stages pageable memory before it returns, without the
                # stream sync a blocking copy makes (the previous chunk may still be running)
                g.x_in.copy_(padded, non_blocking=True)
            else:
                if self.track_reads and x.data_ptr() == g.x_in.data_ptr() and x.stride() == g.x_in.stride():
                    self.direct_inputs += 1  # uploaded into x_in already (``input_slot``)
                else:
                    g.x_in[:, :seq].copy_(x)
                if seq < bucket:
                    g.x_in[:, seq:].zero_()
            if st.is_last:
                g.last.fill_(seq - 1)
            hs.mark("pg:input")
            g.graph.replay()
            if self.track_reads:
                if g.read is None:
                    g.read = torch.cuda.Event()
                g.read.record()  # the current stream, which replayed: x_in is read once this fires
            hs.mark("pg:replay")
            end = start + seq
            copy_slots(cache, scratch, start, end)
            hs.mark("pg:kv_out")
            out = g.out.clone() if st.is_last else g.out[:, :seq].clone()
            hs.mark("pg:clone")
        self._holds[batch] = (weakref.ref(cache), cache.writes, end)
        self.replays += 1
        return out

    def _capture(self, batch: int, bucket: int, start: int) -> _PromptGraph:
        st, dec = self.stage, self.dec
        spec, dev, w = st.spec, st.device, st.weights
        if st.is_first:
            x_in = torch.zeros((batch, bucket), dtype=torch.int64, device=dev)
        else:
            x_in = torch.zeros((batch, bucket, spec.hidden_size), dtype=st.dtype, device=dev)
        last = torch.full((1,), bucket - 1, dtype=torch.int64, device=dev)
        scratch = self._scratch_for(batch, start + bucket)
        k, v = scratch.k, scratch.v
        pos = torch.arange(start, start + bucket, device=dev)[None].expand(batch, bucket)
        cos_t, sin_t = st._rope_for(start + bucket)
        cos, sin = cos_t[pos].to(st.dtype)[:, None], sin_t[pos].to(st.dtype)[:, None]
        windows = [spec.layer_window(layer) for layer in st.span.layers()]
        # a fresh prompt no window cuts into: causal attention over the new keys, no mask
        causal = start == 0 and st._no_window_cuts(bucket)
        masks = {win: None if causal else attention_mask(pos, start + bucket, win) for win in set(windows)}
        layer_masks = [masks[win] for win in windows]

        def run() -> torch.Tensor:
            h = st.embed(x_in) if st.is_first else x_in
            layer = dec.prefill_layer()  # compiled with dynamic shapes unless compiling is off
            for i, lw in enumerate(w.layers):
                h = layer(h, lw, spec, cos, sin, k[i], v[i], pos, layer_masks[i], causal)
            return st.head(h.index_select(1, last))[:, 0] if st.is_last else h

        with torch.cuda.device(dev):
            side = dec.capture_stream()
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                run()  # warm-up (slots start.. of the scratch only): compile, choose kernels
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with graph_capture(graph, self._pool):
                    out = run()
            torch.cuda.current_stream(dev).wait_stream(side)
        self.captures += 1
        log.debug("stage %s: captured prompt graph for batch %d, %d tokens from position %d",
                  st.span, batch, bucket, start)  # fmt: skip
        keep = (pos, cos, sin, *(m for m in masks.values() if m is not None))
        return _PromptGraph(graph, x_in, last, out, keep)
