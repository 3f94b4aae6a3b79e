"""Greedy choice of a decode step in one Triton launch: argmax ids of every row and a non-finite flag.

Why: the torch form (``cuda_decode.greedy_pack``: ``isfinite``, ``all``, ``argmax``, two casts and a
``cat``) is about ten small kernels at the end of every decode step, ~27 µs of a ~3.9 ms Llama-2-7B step
on an H200 (bench/gpu_notes.md, twenty-third session), where one program reading the 32k logits takes a
few µs.

Layout: ``_greedy_kernel`` (``@triton.jit``) -> ``greedy_pack`` (launcher: checks; no device reads, so it
can be captured in a CUDA graph) -> ``greedy_pack_ref`` (the torch form, for tests).

Result, as the torch form: int64 ``[B + 1]``, the ids ``argmax(logits[b])`` (the first index of the
maximum, as ``torch.argmax``), then 1 if any logit of any row is NaN or +-Inf, else 0. Where the flag is set
the ids are still in ``[0, V)`` but mean nothing (callers raise on the flag).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperlane_lab.kernels.quant_common import check_launch

__all__ = ["greedy_pack", "greedy_pack_ref"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 4096
_MAX_BLOCKS = 64  # the row is unrolled into its blocks: up to 256k logits


@triton.jit
def _greedy_kernel(x_ptr, out_ptr, B, stride_b, V: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """One program: every row's first maximal index, then the any-non-finite flag, into ``out [B + 1]``."""
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for b in range(B):
        row = x_ptr + b * stride_b  # B * V < 2**31 at decode sizes
        best = -float("inf")
        idx = 0
        for i in tl.static_range(NB):  # unrolled: every block's load can be in flight at once
            o = i * BLOCK + offs
            valid = o < V
            x = tl.load(row + o, mask=valid, other=0.0).to(tl.float32)
            bad = tl.maximum(bad, tl.where(valid & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0))
            xm = tl.where(valid, x, -float("inf"))
            bm = tl.max(xm, axis=0)
            bi = tl.min(tl.where(xm == bm, o, V), axis=0)  # V: no lane matched (a NaN maximum)
            take = (bm > best) & (bi < V)  # strictly greater: an earlier block keeps a tie
            idx = tl.where(take, bi, idx)
            best = tl.where(take, bm, best)
        tl.store(out_ptr + b, idx.to(tl.int64))
    tl.store(out_ptr + B, tl.max(bad, axis=0).to(tl.int64))


def greedy_pack(logits: torch.Tensor) -> torch.Tensor:
    """Contiguous ``[B, V]`` logits (fp16 / bf16 / fp32) -> int64 ``[B + 1]``: each row's argmax (first
    maximal index), then 1 if any logit is NaN or Inf, else 0. Raises ValueError on other shapes, dtypes
    or a vocabulary past 256k."""
    check_launch(logits, "greedy_pack: logits", _DTYPES)
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"greedy_pack: logits must be [B, V] with B, V >= 1, got {tuple(logits.shape)}")
    b, v = logits.shape
    nb = triton.cdiv(v, _BLOCK)
    if nb > _MAX_BLOCKS:
        raise ValueError(
            f"greedy_pack: at most {_MAX_BLOCKS * _BLOCK} logits a row, got {v}; use the torch form"
        )
    out = torch.empty((b + 1,), dtype=torch.int64, device=logits.device)
    _greedy_kernel[(1,)](logits, out, b, logits.stride(0), V=v, BLOCK=_BLOCK, NB=nb, num_warps=16)
    return out


def greedy_pack_ref(logits: torch.Tensor) -> torch.Tensor:
    """The torch form: argmax ids, then the non-finite flag (as ``cuda_decode.greedy_pack``)."""
    bad = (~torch.isfinite(logits).all()).to(torch.int64)
    return torch.cat([logits.argmax(dim=-1).to(torch.int64), bad[None]])
