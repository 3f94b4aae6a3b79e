"""Static-shape decode (one new token per row) for ``TorchStage`` on CUDA, replayed as CUDA graphs.

Why: a batch-1 decode step of a 7B model reads ~13 GB of weights (~4.5 ms on an H100), while the
eager path launches ~1000 small kernels and syncs with the host; launch overhead alone would cost
as much as the weight reads. Here a decode step of a stage is one graph replay:

    host:  ids [B,1] / hidden [B,1,H] and positions [B,1] -> pinned staging -> static device inputs
    graph: positions -> cache slot, RoPE rows and the attention mask over the *whole* cache
           [0, max_len] (built on device, so the graph never changes with the sequence length),
           then every layer, then (last stage) the final norm and LM head.

Graphs bake in addresses, so there is one per session cache, captured at its first decode step.
A closed session parks its cache (and graph) in a small pool (``cache_pool.py``, caches in multiples of
256 positions); the next session of that batch and pooled length reuses both after zeroing the cache,
exactly as a fresh one would start.
Attending over all slots with a mask equals attending over the valid prefix: masked keys get
probability exactly 0, so only rounding differs from the eager path.

The step function is plain PyTorch (``decode_static.static_decode_step``), so it also runs on the
CPU, where the tests compare it with the eager path; ``torch.compile`` can fuse each layer's small
ops (optional); on CUDA a layer's attention is one Triton kernel (``decode_fused``) and the
products use the Triton GEMV where it times faster (``decode_linear``). A warm-up that fails turns
off one of these optional pieces at a time (``GraphDecoder.fallbacks`` says which and why).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.cache_pool import CachePool
from hyperlane_lab.models.capture import graph_capture
from hyperlane_lab.models.decode_fused import (
    fused_attention_kernel,
    make_fused_layer,
    make_triton_layer,
    triton_layer_configs,
)
from hyperlane_lab.models.decode_linear import LinearFn, choose_linears, env_flag, gemv_pins, make_linear
from hyperlane_lab.models.decode_static import (
    LayerFn,
    decode_attention,
    decode_layer_static,
    static_decode_step,
)
from hyperlane_lab.models.decode_wire import WireIO, WireSpec, make_wire_io, wire_in, wire_out
from hyperlane_lab.models.layer_tune import tune_layer
from hyperlane_lab.models.layers import decoder_layer
from hyperlane_lab.models.prompt_graphs import PromptGraphs

if TYPE_CHECKING:
    from hyperlane_lab.models.stage import SessionCache, TorchStage

__all__ = [
    "GraphDecoder",
    "decode_attention",
    "decode_layer_static",
    "graph_greedy",
    "greedy_pack",
    "make_linear",
    "static_decode_step",
]

log = logging.getLogger(__name__)

GREEDY_ROWS = 4  # the Triton greedy kernel's rows at most (it walks them one after another)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    io: torch.Tensor  # [2, B] int64 static inputs on the device: row 0 ids (first stage), row 1 positions
    io_host: torch.Tensor  # pinned staging of io (one host->device copy per step)
    x_in: torch.Tensor  # ids view of io[0] ([B, 1]), or the static hidden input [B, 1, H]
    x_host: torch.Tensor | None  # pinned staging for a hidden input that arrives on the CPU
    out: torch.Tensor  # static output
    keep: tuple[torch.Tensor, ...]  # every other tensor the graph reads (RoPE tables, slot arange)
    staged: Any = None  # event after the last host->device input copy (the staging is free after it)
    # last stage: [B + 1] int64 = greedy ids of ``out``, then 1 if ``out`` holds NaN/Inf (the
    # Sampler's greedy choice and check, computed inside the graph: no extra launches per step)
    greedy: torch.Tensor | None = None
    wire: WireIO | None = None  # wire mode: the graph copies its inputs in and its result out itself
    io_np: Any = None  # numpy view of io_host


def graph_greedy(cache: SessionCache, out: torch.Tensor) -> torch.Tensor | None:
    """The in-graph greedy ids + non-finite flag for ``out`` when ``out`` came from this cache's
    decode graph (None otherwise: compute them from ``out``)."""
    g = cache.graph
    return g.greedy if g is not None and out is g.out else None


def greedy_pack(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] logits -> [B + 1] int64: argmax ids, then 1 if any logit is NaN/Inf (else 0)."""
    bad = (~torch.isfinite(logits).all()).to(torch.int64)
    return torch.cat([logits.argmax(dim=-1).to(torch.int64), bad[None]])


class GraphDecoder:
    """Per-stage CUDA-graph decode: one graph per session cache, pooled caches, optional compile.

    Used by ``TorchStage`` on CUDA (set ``HYPERLANE_CUDA_GRAPHS=0`` to disable). Everything runs on
    the caller's thread; the stage's engine thread is the only caller.
    Each layer is compiled with ``torch.compile`` before capture (fuses the norms, RoPE and softmax
    pieces into a few kernels; ``HYPERLANE_COMPILE=0`` captures the eager ops instead); a compile
    failure falls back to the eager ops.
    """

    def __init__(self, stage: TorchStage, compile_layers: bool | None = None, pool_size: int = 16) -> None:
        self.stage = stage
        self.compile_layers = (
            env_flag("HYPERLANE_COMPILE", True) if compile_layers is None else compile_layers
        )
        self.pool = CachePool(stage, pool_size)  # parked caches (and their graphs), pooled sizes
        self.captures = 0  # graphs captured (pooling keeps this flat across sessions of one shape)
        self.replays = 0
        self._layer_fn: LayerFn | None = None
        self._lin: LinearFn | None = None
        self.gemv_choice: dict[str, Any] = {}  # per weight shape: chosen kernel and timings (µs)
        self._prefill_fn: LayerFn | None = None
        self._broken = False  # capture failed once: stay eager
        # the one-kernel attention (decode_fused.py): None = not decided yet, False = plain layer
        self._attn: Callable[..., torch.Tensor] | bool | None = None
        self._eager_layers = False  # compiling the decode layer failed: capture the eager ops
        # batch 1: the all-Triton layer (decode_fused.make_triton_layer); None = not decided yet
        self._tlayer: LayerFn | bool | None = None
        # The all-Triton layer, its kernels launched with programmatic dependent launch (sm_90+;
        # kernels/pdl.py), the GEMVs' first weight tile read before the wait and its configs tuned in the step
        # (layer_tune.py): on by default for every stage on a device that takes PDL. On an H200 it was the
        # fastest decode for a whole model in-process (7 of 7 paired runs, +0.5-2.5% with the configs chosen
        # alone; tuned, +4.6% more), for one worker holding every layer (+8.5%) and for two worker stages
        # sharing one H200 (+2.2%) (bench/RESULTS.md, twentieth to twenty-fifth sessions). Where the device
        # takes no PDL it stays off (alone the layer lost to the compiled one, third session). Each variable
        # set decides its piece, on or off.
        # Unset, PDL launches the all-Triton layer only: the compiled layer's kernels (batch > 1, or batch 1
        # where the layer does not apply) keep plain launches (with PDL they ran 7-8% slower).
        self._layer_auto = "HYPERLANE_TRITON_LAYER" not in os.environ
        self._pdl_auto = "HYPERLANE_PDL" not in os.environ
        self.triton_layer_enabled = env_flag("HYPERLANE_TRITON_LAYER", True)
        self.pdl_enabled = env_flag("HYPERLANE_PDL", True)
        # the GEMVs' first weight tile read before the wait (with PDL only)
        self.pdl_prefetch = env_flag("HYPERLANE_PDL_PREFETCH", self.pdl_enabled)
        if self.pdl_prefetch and not self.pdl_enabled:
            log.warning(
                "HYPERLANE_PDL_PREFETCH=1 with HYPERLANE_PDL=0 does nothing: "
                "the first tile is read early only under PDL"
            )
        # a last stage's greedy ids and non-finite flag for up to GREEDY_ROWS rows in one Triton launch
        # (kernels/greedy.py) instead of ~10 torch kernels: +0.5% 1-GPU decode on an H200 (bench/tail_ab.py,
        # twenty-third session). HYPERLANE_TRITON_GREEDY=0: the torch ops.
        self.triton_greedy_enabled = env_flag("HYPERLANE_TRITON_GREEDY", True)
        self._greedy: Callable[[torch.Tensor], torch.Tensor] | bool | None = None
        # HYPERLANE_GEMV_PIN: shapes whose product is set rather than timed (checked here, not at a capture)
        self.gemv_pins = gemv_pins()
        # the all-Triton layer's configs chosen by timing the whole step (layer_tune.py); 0: as timed alone
        self.layer_tune_enabled = env_flag("HYPERLANE_LAYER_TUNE", True)
        self.layer_tune_mode = "session"  # how the step is timed (layer_tune.StepTimer)
        self._tuning = False  # tune_layer is running (its nested captures must not tune again)
        # tuned configs and their report, per tune_layer's key (kept across configure())
        self._tuned: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any]]] = {}
        self._pdl_off = False  # a failed warm-up turned it off (until configure())
        self.fallbacks: list[str] = []  # what a failed warm-up turned off, and why (history)
        self._degraded: set[str] = set()  # pieces turned off since the last configure()
        # one capture stream, from the high-priority pool: a fresh pooled stream per capture would
        # wrap around the pool and alias a stream other threads use (the worker's copy stream)
        self._capture_stream: Any = None
        self.wire_broken = ""  # why a wire-mode capture failed (wire steps then take the staged path)
        self._prompts: PromptGraphs | None = None  # prompt steps' graphs (models/prompt_graphs.py)

    # ------------------------------------------------------------------ caches

    def new_cache(self, batch: int, max_len: int) -> SessionCache:
        """A zeroed cache for a new session, reusing a parked one (and its graph) of its pooled size
        (``cache_pool.py``)."""
        return self.pool.take(batch, max_len)

    def cache_len(self, max_len: int) -> int:
        return self.pool.cache_len(max_len)

    def release(self, cache: SessionCache) -> None:
        """Park a closed session's cache (and graph) for reuse."""
        self.pool.park(cache)

    def clear_pool(self) -> None:
        self.pool.clear()

    def configure(self, compile_layers: bool) -> None:
        """Switch torch.compile on/off; parked caches (and their graphs) are dropped, open
        sessions keep the graphs they have."""
        self.compile_layers, self._layer_fn, self._prefill_fn, self._broken = (
            compile_layers,
            None,
            None,
            False,
        )  # the GEMV choice (self._lin) stays, unless a failed warm-up turned it off
        self._eager_layers, self._tlayer = False, None
        if "Triton GEMV" in self._degraded:  # decided again (the failure may have been compile's)
            self._lin = None
        if "fused attention" in self._degraded:
            self._attn = None
        if "programmatic dependent launch" in self._degraded:
            self._pdl_off, self._lin, self._attn = False, None, None
        self._degraded.clear()
        self.pool.clear()
        self._prompts = None

    def capture_stream(self) -> torch.cuda.Stream:
        """The one stream every capture of this stage runs on (high priority, made once)."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.stage.device, priority=-1)
        return self._capture_stream  # type: ignore[no-any-return]

    def prompt_graphs(self) -> PromptGraphs:
        if self._prompts is None:
            self._prompts = PromptGraphs(self)
        return self._prompts

    def prompt_ready(self, batch: int, seq: int, start: int) -> bool:
        """A prompt step of this shape would replay a captured graph (``PromptGraphs.ready``)."""
        return not self._broken and self._prompts is not None and self._prompts.ready(batch, seq, start)

    def prompt_input(self, batch: int, seq: int, start: int) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """Where such a prompt step's hidden state may be uploaded directly (``PromptGraphs.input_slot``)."""
        if self._broken:
            return None
        return self.prompt_graphs().input_slot(batch, seq, start)

    def prompt_step(
        self, cache: SessionCache, x: torch.Tensor, seq: int, start: int = 0
    ) -> torch.Tensor | None:
        """A prompt step (a fresh prompt, or a chunk at positions ``start ..``) replayed from a
        graph (``prompt_graphs.py``), or None: the caller runs the eager path."""
        if self._broken:
            return None
        return self.prompt_graphs().run(cache, x, seq, start)

    # ------------------------------------------------------------------ stepping

    def linear(self) -> LinearFn:
        """The decode products' function: cuBLAS, or the Triton GEMV for the weight shapes where
        it measured faster on this card (``HYPERLANE_TRITON_GEMV=0``: cuBLAS only)."""
        if self._lin is None:
            table, self.gemv_choice = choose_linears(self.stage, self.gemv_pins)
            pdl = self._pdl_outside_layer()
            self._lin = make_linear(table, pdl=pdl, prefetch=pdl and self.pdl_prefetch)
            if self.pdl_enabled:
                self.gemv_choice["pdl"] = self.pdl_mode() if pdl else "off"
        return self._lin

    def pdl(self) -> bool:
        """Launch this step's Triton kernels with programmatic dependent launch: unless ``HYPERLANE_PDL=0``, on
        a device and Triton that take it (``kernels/pdl.py``), and no failed warm-up since ``configure()``."""
        return self.pdl_enabled and not self._pdl_off and self._pdl_supported()

    def _pdl_outside_layer(self) -> bool:
        """PDL for the compiled layer's kernels too (its Triton GEMVs and attention): only when
        ``HYPERLANE_PDL`` asks for it; the default launches only the all-Triton layer with PDL
        (the compiled layer with PDL measured 7-8% slower on an H200)."""
        return self.pdl() and not self._pdl_auto

    def pdl_mode(self) -> str:
        """How this step's Triton kernels launch: "off", "pdl" or "pdl+prefetch" (reported in gemv_choice)."""
        if not self.pdl():
            return "off"
        return "pdl+prefetch" if self.pdl_prefetch else "pdl"

    def _pdl_supported(self) -> bool:
        try:
            from hyperlane_lab.codecs._kernels import kernel_module

            return bool(kernel_module("pdl").pdl_supported(self.stage.device))
        except Exception as e:  # no Triton here
            log.debug("no programmatic dependent launch: %s", e)
            return False

    def attention_kernel(self) -> Callable[..., torch.Tensor] | None:
        """The one-kernel decode attention (``decode_fused.py``), or None for the plain layer."""
        if self._attn is None:
            attn = fused_attention_kernel(self.stage.device)
            if attn is not None and self._pdl_outside_layer():
                attn = functools.partial(attn, pdl=True)
            self._attn = attn or False
        return self._attn if callable(self._attn) else None

    def triton_layer(self) -> LayerFn | None:
        """The all-Triton decode layer for one-row caches, where the attention kernel applies and
        the GEMV timings favour it: ``HYPERLANE_TRITON_LAYER=1``, or, unset, on a device that takes PDL (see
        ``__init__``). Its configs are the ones timed fastest alone, then tuned by timing the whole step
        (``layer_tune.tune_layer``; ``HYPERLANE_LAYER_TUNE=0`` keeps them as timed alone)."""
        if self._tlayer is None:
            self._tlayer = False
            attn, lin = self.attention_kernel(), self.linear()
            # on by default only with PDL (the layer alone lost to the compiled one)
            wanted = self.triton_layer_enabled and (self.pdl() or not self._layer_auto)
            if attn is not None and lin is not F.linear and wanted:
                cfgs = triton_layer_configs(self.stage.weights.layers[0], self.gemv_choice)
                if cfgs is not None:
                    pdl = self.pdl()
                    if pdl and not self._pdl_outside_layer():  # the default: PDL for this layer only
                        attn = functools.partial(attn, pdl=True)
                    make = functools.partial(
                        make_triton_layer, attn, pdl=pdl, prefetch=pdl and self.pdl_prefetch
                    )
                    cfgs = tune_layer(self, cfgs, make)
                    self._tlayer = make(cfgs)
                    self.gemv_choice["triton_layer"] = {r: str(c) for r, c in cfgs.items()}
                    self.gemv_choice["triton_layer_pdl"] = self.pdl_mode()
        return self._tlayer if callable(self._tlayer) else None

    def pack_fn(self, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The in-graph greedy choice of a last stage's ``batch`` rows: the one-launch Triton kernel
        (``kernels/greedy.py``; it walks the rows one after another, so up to ``GREEDY_ROWS``) on CUDA unless
        ``HYPERLANE_TRITON_GREEDY=0`` or it failed once here; else ``greedy_pack`` (torch)."""
        if self._greedy is None:
            self._greedy = False
            if self.triton_greedy_enabled and self.stage.device.type == "cuda":
                try:
                    from hyperlane_lab.codecs._kernels import kernel_module

                    self._greedy = kernel_module("greedy").greedy_pack
                except Exception as e:  # no Triton here
                    log.debug("no Triton greedy kernel: %s", e)
        if callable(self._greedy) and batch <= GREEDY_ROWS:
            return self._greedy
        return greedy_pack

    def _warm_pack(self, logits: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """``pack_fn`` for ``logits``' rows and its result, run once outside a capture; a Triton kernel that
        fails here is turned off (``fallbacks``) and the torch form used."""
        pack = self.pack_fn(logits.shape[0])
        try:
            return pack, pack(logits)
        except Exception as e:
            if pack is greedy_pack:
                raise
            why = f"{type(e).__name__}: {e}"[:300]
            log.warning(
                "stage %s: Triton greedy kernel failed (%s); using the torch ops", self.stage.span, why
            )
            self.fallbacks.append(f"Triton greedy: {why}")
            self._greedy = False
            return greedy_pack, greedy_pack(logits)

    def layer_fn(self) -> LayerFn:
        """The decode layer the graph captures: with the attention kernel when it applies
        (``static_decode_step(..., fused=True)``), else ``decode_layer_static``; compiled unless
        compiling is off or failed."""
        if self._layer_fn is None:
            lin, attn = self.linear(), self.attention_kernel()
            compiled = self.compile_layers and not self._eager_layers
            if attn is not None:
                self._layer_fn = make_fused_layer(attn, lin, compiled)
                return self._layer_fn

            def layer(*args: Any) -> torch.Tensor:
                return decode_layer_static(*args, lin=lin)  # type: ignore[misc]

            self._layer_fn = torch.compile(layer) if compiled else layer  # max_len dynamic on 2nd shape
        return self._layer_fn

    def _degrade(self, err: Exception, used_tlayer: bool) -> bool:
        """After a failed warm-up, turn off the next optional piece that the warm-up used (programmatic
        dependent launch, the all-Triton layer, fused attention, Triton GEMV, compiling), in that order;
        False when nothing is left to turn off. ``configure()`` decides the pieces again."""
        why = f"{type(err).__name__}: {err}"[:300]
        # the kernels are decided again without PDL (the GEMV choice is timed again), if this warm-up used it
        if self.pdl() and (used_tlayer or self._pdl_outside_layer()):
            self._pdl_off, what = True, "programmatic dependent launch"
            self._lin = None if self._lin is not F.linear else self._lin
            self._attn = None if callable(self._attn) else self._attn
            self._tlayer = None if callable(self._tlayer) else self._tlayer
        elif used_tlayer and callable(self._tlayer):
            self._tlayer, what = False, "the all-Triton layer"
            for k in ("triton_layer", "triton_layer_pdl", "triton_layer_tune"):
                self.gemv_choice.pop(k, None)
        elif callable(self._attn):
            self._attn, what = False, "fused attention"
        elif self._lin is not None and self._lin is not F.linear:
            self._lin, what = F.linear, "Triton GEMV"
            self.gemv_choice["error"] = why
        elif self.compile_layers and not self._eager_layers:
            self._eager_layers, what = True, "torch.compile"
        else:
            return False
        log.warning("stage %s: decode warm-up failed (%s); turning off %s", self.stage.span, why, what)
        self.fallbacks.append(f"{what}: {why}")
        self._degraded.add(what)
        self._layer_fn = None
        return True

    def prefill_layer(self) -> LayerFn:
        """``layers.decoder_layer`` for prompt steps (S > 1), compiled with dynamic shapes when
        compiling: eager prefill launches ~40 kernels per layer, and at 512 tokens the host's
        launch time, not the GPU, would set the speed. Falls back to eager if compiling fails."""
        if self._prefill_fn is None:
            if not self.compile_layers:
                self._prefill_fn = decoder_layer
            else:
                compiled = torch.compile(decoder_layer, dynamic=True)
                ok: list[bool] = []

                def run(*args: Any) -> torch.Tensor:
                    if ok:
                        return compiled(*args)  # type: ignore[no-any-return]
                    try:
                        out = compiled(*args)
                    except Exception as e:  # compiling failed before anything ran
                        log.warning(
                            "stage %s: torch.compile of the prefill layer failed (%s)", self.stage.span, e
                        )
                        self._prefill_fn = decoder_layer
                        return decoder_layer(*args)
                    ok.append(True)
                    return out  # type: ignore[no-any-return]

                self._prefill_fn = run
        return self._prefill_fn

    def eager_step(self, cache: SessionCache, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The same step without a graph (fallback, and the reference the tests use)."""
        st = self.stage
        cos_t, sin_t = st._rope_for(cache.max_len)
        keys = torch.arange(cache.max_len + 1, device=st.device)
        x = x.to(st.device) if st.is_first else x.to(device=st.device, dtype=st.dtype)
        return static_decode_step(st, cache, x, pos.to(st.device), cos_t, sin_t, keys, decode_layer_static)

    def step(self, cache: SessionCache, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Decode one token for every row: ids [B,1] or hidden [B,1,H], positions [B,1] (CPU
        preferred; device tensors work) -> hidden [B,1,H] or logits [B,V].

        The result is the graph's static output buffer: read (or copy) it before this session's
        next step, as the pipeline does anyway (the next step needs this one's token)."""
        if self._broken:
            return self.eager_step(cache, x, pos)
        g: _Graph | None = getattr(cache, "graph", None)
        if g is not None and g.wire is not None:  # a wire-mode graph copies its own inputs: recapture
            g = cache.graph = None
        if g is None:
            try:
                g = self._capture(cache)
            except Exception as e:  # a capture that fails must not take the worker down
                log.warning("stage %s: CUDA graph capture failed (%s); decoding eagerly", self.stage.span, e)
                self._broken = True
                return self.eager_step(cache, x, pos)
            cache.graph = g
        with torch.cuda.device(self.stage.device):
            if g.staged is not None:
                g.staged.synchronize()  # normally long done: the previous step's result was read
            self._stage_in(g, x, pos)
            g.staged = torch.cuda.Event()
            g.staged.record()
            g.graph.replay()
        self.replays += 1
        return g.out

    def step_wire(self, cache: SessionCache, spec: WireSpec, pos: Any, x: Any) -> _Graph | None:
        """Wire-mode decode step (``decode_wire``): ``pos`` int64 numpy [B] positions, ``x`` the
        frame's payload (first stage: int64 numpy ids [B]; else a bytes-like payload of
        ``g.wire.in_nbytes`` bytes, checked by the caller). Captures the cache's wire graph on first
        use (replacing a staged-mode graph). Returns the graph, whose ``wire.out_host`` holds the
        result once the current stream passes an event recorded after this call; None when wire
        capture failed here once (``wire_broken`` says why): use ``step``."""
        if self._broken or self.wire_broken:
            return None
        g: _Graph | None = cache.graph
        if g is None or g.wire is None or g.wire.spec != spec:
            try:
                g = self._capture(cache, spec)
            except Exception as e:
                self.wire_broken = f"{type(e).__name__}: {e}"[:300]
                log.warning("stage %s: wire-mode capture failed (%s); staging copies outside the graph",
                            self.stage.span, e)  # fmt: skip
                cache.graph = None
                return None
            cache.graph = g
        assert g.wire is not None and g.staged is not None
        cache.writes += 1
        hs = host_stamps()
        with torch.cuda.device(self.stage.device):
            g.staged.synchronize()  # the previous replay has read the pinned inputs (normally long done)
            hs.mark("w:synced")
            g.io_np[1] = pos
            if self.stage.is_first:
                g.io_np[0] = x
            else:
                g.wire.put(x)
            hs.mark("w:put")
            g.graph.replay()
            hs.mark("w:replay")
            g.staged.record()
        self.replays += 1
        return g

    def _stage_in(self, g: _Graph, x: torch.Tensor, pos: torch.Tensor) -> None:
        first = self.stage.is_first
        if pos.device.type == "cpu":
            host = g.io_host.numpy()  # numpy writes: cheaper than torch ops on the host
            host[1] = pos.numpy().reshape(-1)
            if first and x.device.type == "cpu":
                host[0] = x.numpy().reshape(-1)
                g.io.copy_(g.io_host, non_blocking=True)  # ids and positions in one copy
            else:
                g.io[1].copy_(g.io_host[1], non_blocking=True)
                if first:  # ids already on the device (the previous step's argmax: run-ahead decode)
                    g.io[0].copy_(x.reshape(-1), non_blocking=True)
        else:
            if first:
                g.io[0].copy_(x.reshape(-1), non_blocking=True)
            g.io[1].copy_(pos.reshape(-1), non_blocking=True)
        if first:
            return
        if x.device.type == "cpu":
            assert g.x_host is not None
            g.x_host.copy_(x)
            g.x_in.copy_(g.x_host, non_blocking=True)
        else:
            g.x_in.copy_(x, non_blocking=True)

    def _capture(self, cache: SessionCache, wire: WireSpec | None = None, degrade: bool = True) -> _Graph:
        """The decode graph of ``cache``'s step (``wire``: in wire mode). A failed warm-up turns off the
        next optional piece and tries again (``_degrade``) unless ``degrade`` is False: then it raises."""
        st = self.stage
        dev = st.device
        b, h = cache.batch, st.spec.hidden_size
        if b == 1 and st.weights.layers:  # the layer decided (and tuned, with captures of its own) first
            try:
                self.triton_layer()
            except Exception as e:  # raised again in the warm-up below, which degrades as usual
                log.debug("stage %s: all-Triton layer not decided (%s)", st.span, e)
        io = torch.zeros((2, b), dtype=torch.int64, device=dev)
        io[1] = -1  # warm-up and capture positions: padding, so their writes hit the trash slot
        io_host = torch.empty((2, b), dtype=torch.int64, pin_memory=True)
        pos_in = io[1].view(b, 1)
        if st.is_first:
            x_in, x_host = io[0].view(b, 1), None
        else:
            x_in = torch.zeros((b, 1, h), dtype=st.dtype, device=dev)
            x_host = torch.empty(x_in.shape, dtype=x_in.dtype, pin_memory=True)
        cos_t, sin_t = st._rope_for(cache.max_len)
        keys = torch.arange(cache.max_len + 1, device=dev)
        if self.compile_layers:  # one compiled layer for every max_len (no recompiles per length)
            for t in (*cache.k, *cache.v):
                torch._dynamo.maybe_mark_dynamic(t, 2)
        wio: WireIO | None = None

        def run() -> torch.Tensor:
            if wio is not None:  # wire mode: the inputs' host->device copies are part of the graph
                io.copy_(io_host, non_blocking=True)
                wire_in(wio, x_in)
            layer = self.triton_layer() if b == 1 and st.weights.layers else None
            fused = layer is not None or self.attention_kernel() is not None
            return static_decode_step(
                st, cache, x_in, pos_in, cos_t, sin_t, keys, layer or self.layer_fn(),
                self.compile_layers, self.linear(), fused,
            )  # fmt: skip

        with torch.cuda.device(dev):
            side = self.capture_stream()
            side.wait_stream(torch.cuda.current_stream(dev))
            try:
                with torch.cuda.stream(side):
                    while True:  # warm-up: lazy init (cuBLAS, compile, Triton) outside the capture
                        try:
                            warm = run()
                            break
                        except Exception as e:
                            if not degrade or not self._degrade(e, used_tlayer=b == 1):
                                raise
                    # warms its kernels
                    pack, gp = self._warm_pack(warm) if st.is_last else (greedy_pack, None)
                    if wire is not None:
                        wio = make_wire_io(wire, st.is_first, st.is_last, x_in, warm, gp)
                        io_host.zero_()
                        io_host[1] = -1  # as the warm-up: padding positions (trash slot)
                        wire_out(wio, pack(run()) if st.is_last else run())  # warm the codec kernels
                    graph = torch.cuda.CUDAGraph()
                    # own memory pool per graph: a decode step's intermediates are small, and a shared
                    # pool handle dies with the last graph that used it (a later capture on it asserts)
                    with graph_capture(graph):
                        out = run()
                        greedy = pack(out) if st.is_last else None
                        if wio is not None:
                            wire_out(wio, greedy if greedy is not None else out)
            finally:  # also after a failure: the caller may free memory the side stream's work still writes
                torch.cuda.current_stream(dev).wait_stream(side)
        self.captures += 1
        log.debug("stage %s: captured decode graph for batch %d, max_len %d (wire %s)", st.span, b,
                  cache.max_len, wire)  # fmt: skip
        staged = torch.cuda.Event() if wio is not None else None
        return _Graph(graph, io, io_host, x_in, x_host, out, (cos_t, sin_t, keys), staged, greedy, wio,
                      io_host.numpy())  # fmt: skip
