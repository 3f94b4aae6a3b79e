"""Batch-1 decode GEMV, ``y = x @ W^T (+ b)`` for ``x [1, K]`` and a row-major weight ``W [N, K]``.

Why: a batch-1 decode step is a chain of matrix-vector products that only have to *read* the
weights once, so their speed is memory bandwidth. cuBLAS picks a split-K kernel for some decode
shapes that reaches well under the copy bandwidth (on an H200, 37% for Llama-2-7B's 4096 x 4096
``wo``, 77% for ``down``, see bench/RESULTS.md), while the same card streams other shapes at 95%.
This kernel streams ``W`` in [BLOCK_N, BLOCK_K] tiles (each row contiguous, so coalesced) with
fp32 accumulation; ``choose_config`` times it against cuBLAS per shape on the card at hand and a
stage uses it only where it wins.

Layout: ``_gemv_kernel`` (``@triton.jit``) -> ``gemv`` (launcher: checks, grid) -> torch reference
``torch.nn.functional.linear`` (same math; fp32 accumulation, summation order differs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hyperlane_lab.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options

__all__ = [
    "CONFIGS",
    "GemvConfig",
    "candidates",
    "choose_config",
    "config_name",
    "configs_by_name",
    "gemv",
    "graph_time_us",
    "replay_us",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output rows per program
    block_k: int  # reduction chunk per loop iteration
    num_warps: int
    num_stages: int
    split_k: int = 1  # > 1: K split over this many programs per row block, fp32 partials summed after


# A small grid (each candidate is compiled once per shape, then cached by Triton on disk). Split-K
# is for short outputs (N = 4096): without it too few programs stream the weight at once.
CONFIGS = (
    GemvConfig(8, 512, 4, 3),
    GemvConfig(16, 256, 4, 4),
    GemvConfig(16, 512, 8, 3),
    GemvConfig(32, 256, 8, 3),
    GemvConfig(4, 1024, 4, 3),
    GemvConfig(16, 256, 4, 4, split_k=4),
    GemvConfig(32, 256, 8, 3, split_k=4),
    GemvConfig(16, 512, 4, 3, split_k=2),
    GemvConfig(8, 256, 4, 4, split_k=8),
    GemvConfig(8, 512, 4, 3, split_k=2),
    GemvConfig(16, 256, 4, 4, split_k=2),
)


@triton.jit
def _w_tile(w_ptrs, rn, kmask, N, EVEN: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of the weight (masked unless EVEN)."""
    if EVEN:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & kmask[None, :], other=0.0)
    return w


@triton.jit
def _x_tile(x_ptrs, g_ptrs, kmask, K, ss, EVEN: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr):
    """The matching [BLOCK_K] of the input in fp32, SwiGLU'd (GATED) and scaled by the norm weight (NORM,
    which also adds its squares to ``ss``); returns it and ``ss``."""
    if EVEN:
        xv = tl.load(x_ptrs).to(tl.float32)
        if GATED:
            xv = xv * tl.sigmoid(xv) * tl.load(x_ptrs + K).to(tl.float32)
        if NORM:
            ss += xv * xv
            xv = xv * tl.load(g_ptrs).to(tl.float32)
    else:
        xv = tl.load(x_ptrs, mask=kmask, other=0.0).to(tl.float32)
        if GATED:
            xv = xv * tl.sigmoid(xv) * tl.load(x_ptrs + K, mask=kmask, other=0.0).to(tl.float32)
        if NORM:
            ss += xv * xv
            xv = xv * tl.load(g_ptrs, mask=kmask, other=0.0).to(tl.float32)
    return xv, ss


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] (GATED: [M, 2K], gate then up) (row stride stride_xm, unit column stride)
    w_ptr,  # [N, K] contiguous
    b_ptr,  # [N] or a dummy when not HAS_BIAS (used only when not PARTIAL)
    y_ptr,  # PARTIAL: [SPLIT, M, N] fp32 partial sums; else [M, N] in the output dtype
    g_ptr,  # NORM: the RMSNorm weight [K]; else a dummy
    r_ptr,  # RESID: the residual [M, N] added to the product; else a dummy
    M,
    N,
    K,
    K_PER,  # K range of one split (a multiple of BLOCK_K); >= K without split-K
    stride_xm,
    eps,  # NORM's epsilon
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,  # split-K: store fp32 partials, ``_splitk_sum_kernel`` finishes
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % K_PER == 0: no masks
    NORM: tl.constexpr,  # x -> x * rsqrt(mean(x^2) + eps) * g (never with PARTIAL)
    GATED: tl.constexpr,  # x -> silu(gate) * up
    RESID: tl.constexpr,  # y -> y + residual (not PARTIAL: the sum kernel adds it)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
    PREFETCH: tl.constexpr,  # the first step peeled; with PDL its weights are read before the wait
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    k_lo = split * K_PER
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + k_lo + rk[None, :]
    x_ptrs = x_ptr + m * stride_xm + k_lo + rk
    g_ptrs = g_ptr + k_lo + rk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced once, after the loop
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM: sum of squares of x
    if PDL:  # the next kernel may start; x, g, r, y are touched only after the previous one has finished
        gdc_launch_dependents()
    if PREFETCH:  # the first step peeled: its weights, then (PDL) the wait, then its input (K_PER >= BLOCK_K)
        kmask0 = (k_lo + rk) < K
        w0 = _w_tile(w_ptrs, rn, kmask0, N, EVEN)
        if PDL:
            gdc_wait()
        xv0, ss = _x_tile(x_ptrs, g_ptrs, kmask0, K, ss, EVEN, GATED, NORM)
        acc += w0.to(tl.float32) * xv0[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    elif PDL:
        gdc_wait()
    for k0 in range(BLOCK_K if PREFETCH else 0, K_PER, BLOCK_K):
        kmask = (k_lo + k0 + rk) < K
        w = _w_tile(w_ptrs, rn, kmask, N, EVEN)
        xv, ss = _x_tile(x_ptrs, g_ptrs, kmask, K, ss, EVEN, GATED, NORM)
        acc += w.to(tl.float32) * xv[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if PARTIAL:
        tl.store(y_ptr + (split * M + m) * N + rn, y, mask=rn < N)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        if RESID:
            y += tl.load(r_ptr + m * N + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _splitk_sum_kernel(
    part_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    N,
    MN,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESID: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    if RESID:
        acc += tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = CONFIGS[0],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    pdl: bool = False,
    prefetch: bool = False,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for ``x [..., K]`` (any leading shape; meant for one row) with this
    kernel; returns ``[..., N]`` in ``x``'s dtype. Raises ValueError on mismatched inputs.

    Fused extras, each saving a decode step one small kernel per use (math in fp32, rounded once):
    ``norm_weight`` [K]: the input is RMS-normalised first (``rms_norm(x, norm_weight, eps)``; not
    with split-K, whose programs see only part of the row); ``gated``: ``x`` is ``[..., 2K]`` and
    the input is ``silu(x[..., :K]) * x[..., K:]`` (SwiGLU); ``residual`` [..., N]: added to the
    result. ``pdl``: launch with programmatic dependent launch (``kernels/pdl.py``; sm_90+ only);
    ``prefetch``: the first step is peeled off the loop, so that with ``pdl`` each program reads its
    first weight tile before waiting for the previous kernel (same sums, same bits)."""
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"gemv needs a contiguous 2-D weight [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    kx = 2 * k if gated else k
    if x.shape[-1] != kx or x.dtype != w.dtype or x.device != w.device:
        raise ValueError(
            f"gemv: x {tuple(x.shape)} {x.dtype} on {x.device} does not fit weight {tuple(w.shape)} "
            f"{w.dtype} on {w.device}" + (" (gated: x holds gate and up, 2K wide)" if gated else "")
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != w.dtype or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be a contiguous [{n}] {w.dtype} tensor, got {tuple(bias.shape)}")
    c = config
    if norm_weight is not None:
        if norm_weight.shape != (k,) or norm_weight.device != w.device or not norm_weight.is_contiguous():
            raise ValueError(
                f"gemv: norm_weight must be a contiguous [{k}] tensor, got {tuple(norm_weight.shape)}"
            )
        if c.split_k > 1:
            raise ValueError("gemv: norm_weight needs the whole row per program; use a config with split_k=1")
    x2 = x.reshape(-1, kx)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if residual is not None and (
        residual.shape != (*x.shape[:-1], n) or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"gemv: residual must be {(*x.shape[:-1], n)} {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    r = residual.reshape(m, n).contiguous() if residual is not None else w
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per = triton.cdiv(triton.cdiv(k, c.split_k), c.block_k) * c.block_k
    splits = triton.cdiv(k, k_per)
    partial = splits > 1
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if partial else y
    b = bias if bias is not None else w
    extra = launch_options(pdl, x.device, "gemv")
    _gemv_kernel[(triton.cdiv(n, c.block_n), splits, m)](
        x2, w, b, out, norm_weight if norm_weight is not None else w, r, m, n, k, k_per, x2.stride(0),
        float(eps), HAS_BIAS=bias is not None, PARTIAL=partial,
        EVEN=n % c.block_n == 0 and k % k_per == 0, NORM=norm_weight is not None, GATED=gated,
        RESID=residual is not None and not partial, PDL=pdl, PREFETCH=prefetch,
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages, **extra,
    )  # fmt: skip
    if partial:
        _splitk_sum_kernel[(triton.cdiv(m * n, 1024),)](
            out, b, r, y, n, m * n, SPLIT=splits, HAS_BIAS=bias is not None, RESID=residual is not None,
            PDL=pdl, BLOCK=1024, num_warps=4, **extra,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _time_us(fn: object, reps: int) -> float:
    """µs per call of ``fn`` launched back to back from Python (charges each launch its host cost)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()  # type: ignore[operator]
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def graph_time_us(fn: object, reps: int, replays: int = 3) -> float:
    """µs per call of ``fn`` replayed from a CUDA graph of ``reps`` calls: how a decode step's
    captured graph runs it (no host launch cost; the kernels run back to back). Captured in
    thread-local mode, like the decode graphs: a global-mode capture would make other threads'
    potentially unsafe CUDA calls (cudaMalloc, pinned allocations of a worker's completion
    thread) fail meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(reps):
            fn()  # type: ignore[operator]
    graph.replay()  # first replay uploads the graph
    us = replay_us(graph, replays)
    del graph
    return us / reps


def replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs per replay of a captured ``graph``, ``replays`` of them back to back (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def candidates(n: int) -> tuple[GemvConfig, ...]:
    """The ``CONFIGS`` worth timing for ``n`` output rows: split-K only where the plain kernel has
    few programs (short outputs; wide ones already fill the card)."""
    return tuple(c for c in CONFIGS if c.split_k == 1 or n < 8192)


def choose_config(
    weights: Sequence[torch.Tensor], margin: float = 0.97, timer: str = "graph"
) -> tuple[GemvConfig | None, dict[str, float]]:
    """Time cuBLAS (``F.linear``) and the ``candidates`` on one-row products with ``weights``
    (same shape: e.g. one projection of every layer of a stage, so that, as in a decode step, each
    call reads its weight from memory rather than L2; no extra memory is taken beyond outputs).
    Returns the fastest config if it beats cuBLAS by more than ``1 - margin`` (else None: keep
    cuBLAS) and the timings in µs.

    ``timer="graph"`` (default) times the calls replayed from a CUDA graph, as the decode step runs
    them; ``"eager"`` launches them from Python, which charges each Triton launch its host cost
    (tens of µs on slow hosts, more than the kernel itself for a 4096 x 4096 weight). A graph
    capture that fails makes every candidate be timed again, eagerly (times of one kind only)."""
    if timer not in ("graph", "eager"):
        raise ValueError(f"choose_config: timer must be 'graph' or 'eager', got {timer!r}")
    n, k = weights[0].shape
    x = torch.randn(1, k, dtype=weights[0].dtype, device=weights[0].device)
    copies = len(weights)
    it = iter(range(1 << 62))

    def rotate(f: object) -> object:
        return lambda: f(x, weights[next(it) % copies])  # type: ignore[operator]

    reps = max(16, 4 * copies)

    def timed(fn: object, graph: bool) -> float:
        fn()  # type: ignore[operator]  # compile / lazy init outside any capture
        torch.cuda.synchronize()
        if not graph:
            return _time_us(fn, reps)
        try:
            return graph_time_us(fn, reps)
        except Exception as e:  # capture refused (e.g. a stream already capturing)
            raise _Retime from e

    if timer == "graph":  # one timer for every candidate: graph and eager times do not compare
        try:
            return _time_all(n, lambda fn: timed(fn, True), rotate, margin)
        except _Retime as e:
            log.debug("gemv graph timing failed on %dx%d (%s); timing all eagerly", n, k, e.__cause__)
    return _time_all(n, lambda fn: timed(fn, False), rotate, margin)


class _Retime(Exception):
    """A graph capture failed: ``choose_config`` times every candidate again, eagerly."""


def _time_all(
    n: int, timed: Callable[[object], float], rotate: Callable[[object], object], margin: float
) -> tuple[GemvConfig | None, dict[str, float]]:
    times = {"cublas": timed(rotate(torch.nn.functional.linear))}
    best: GemvConfig | None = None
    for c in candidates(n):
        try:
            times[config_name(c)] = t = timed(rotate(lambda a, b, c=c: gemv(a, b, None, c)))
        except _Retime:
            raise
        except Exception as e:  # a config a card cannot run (registers, shared memory)
            log.debug("gemv config %s failed on %d rows: %s", c, n, e)
            continue
        if t < margin * times["cublas"] and (best is None or t < times[config_name(best)]):
            best = c
    return best, times


def config_name(c: GemvConfig) -> str:
    """The short name of a config in timing tables: ``16x256w4s4`` (+ ``k4`` for split-K)."""
    return f"{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}" + (
        f"k{c.split_k}" if c.split_k > 1 else ""
    )


def configs_by_name() -> dict[str, GemvConfig]:
    """Every config under its ``config_name`` (the names pins and timing tables use)."""
    return {config_name(c): c for c in CONFIGS}
