"""The link of a *chained* token loop: a greedy decode step's next inputs made on the GPU, from its result.

Why: a worker holding every layer runs its token loop itself. Without this, each step's token goes to the host
(the completion thread wakes, reads it, builds the next frame, writes the graph's pinned inputs) before the next
step can start: 50-95 µs a token of an idle GPU on the lent H200 hosts. Greedy decoding needs no host for the
choice, so the next step can be enqueued *behind* the current one, its inputs made here, in stream order:

    [graph of step k] -> ring_chain -> [graph of step k+1] -> ...

The graph of a wire-mode step copies its inputs from pinned host memory itself (``models/decode_wire.py``), so
this kernel writes them there (the GPU reaches pinned memory through its mapping), and saves step k's result into
a pinned slot of its own: step k+1's graph overwrites the graph's result buffer before the host may read it.

Per row ``b`` (the rule of ``runtime/outbox.ring_frame``, which the host applies to the same ids afterwards):

- next id: the sampled id (0 when it is out of ``[0, vocab)``, which a finite argmax never is);
- next position: -1 (padding: its K/V writes go to the trash slot) when the row was padding, sampled an EOS id,
  would reach ``limit`` (the session's max length), or the logits held NaN/Inf (the result's last word);
  else its position + 1.

Layout: ``_ring_chain`` (``@triton.jit``) -> ``ring_chain`` (launcher: checks) -> ``ring_chain_reference`` (the
same rule in torch, for the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ring_chain", "ring_chain_reference"]


@triton.jit(do_not_specialize=["batch", "n_eos", "limit", "vocab"])
def _ring_chain(
    res_ptr, io_ptr, next_ptr, slot_ptr, eos_ptr, batch, n_eos, limit, vocab,
    BLOCK: tl.constexpr, EOS: tl.constexpr,
):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    rows = offs < batch
    ids = tl.load(res_ptr + offs, mask=rows, other=0)
    bad = tl.load(res_ptr + batch + offs * 0)  # the finite flag, as a block (the interpreter's masks)
    pos = tl.load(io_ptr + batch + offs, mask=rows, other=-1)  # io[1]: the positions the step ran at
    e = tl.arange(0, EOS)
    eos = tl.load(eos_ptr + e, mask=e < n_eos, other=-1)
    hit = tl.sum((ids[:, None] == eos[None, :]).to(tl.int32), axis=1) > 0
    nxt = pos + 1
    stop = (pos < 0) | hit | (nxt >= limit) | (bad != 0)
    tl.store(next_ptr + offs, tl.where((ids >= 0) & (ids < vocab), ids, 0), mask=rows)
    tl.store(next_ptr + batch + offs, tl.where(stop, -1, nxt), mask=rows)
    tl.store(slot_ptr + offs, ids, mask=rows)
    tl.store(slot_ptr + batch + offs, bad, mask=offs == 0)


def _check(result: torch.Tensor, io: torch.Tensor, nxt: torch.Tensor, slot: torch.Tensor, eos: torch.Tensor,
           limit: int, vocab: int) -> int:  # fmt: skip
    for name, t in (("result", result), ("io", io), ("next", nxt), ("slot", slot), ("eos", eos)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"ring_chain: {name} must be a contiguous int64 tensor, got {t.dtype}")
    if io.dim() != 2 or io.shape[0] != 2 or not 1 <= io.shape[1] <= 1024:
        raise ValueError(f"ring_chain: io must be [2, B] (ids, positions) with 1 <= B <= 1024, got "
                         f"{tuple(io.shape)}")  # fmt: skip
    batch = io.shape[1]
    if nxt.shape != io.shape or result.shape != (batch + 1,) or slot.shape != (batch + 1,):
        raise ValueError(
            f"ring_chain: next must be [2, {batch}] and result and slot [{batch + 1}] (ids, then the "
            f"non-finite flag), got {tuple(nxt.shape)}, {tuple(result.shape)}, {tuple(slot.shape)}"
        )
    if eos.dim() != 1 or not 1 <= eos.numel() <= 64:
        raise ValueError(
            f"ring_chain: eos must be 1-D with 1 to 64 ids (pad with -1), got {tuple(eos.shape)}"
        )
    if limit < 1 or vocab < 1:
        raise ValueError(f"ring_chain: limit and vocab must be >= 1, got {limit}, {vocab}")
    return batch


def ring_chain(result: torch.Tensor, io: torch.Tensor, nxt: torch.Tensor, slot: torch.Tensor, eos: torch.Tensor,
               limit: int, vocab: int) -> None:  # fmt: skip
    """Enqueue on the current stream: from ``result`` ([B + 1] int64: greedy ids, then 1 if the logits held
    NaN/Inf) and ``io`` ([2, B]: the ids and positions the step ran at), write the next step's ids and positions
    into ``nxt`` ([2, B], e.g. the graph's pinned inputs) and a copy of ``result`` into ``slot``. ``eos``: the
    EOS ids (1-D, -1 for none), ``limit``: the first position the session may not write."""
    batch = _check(result, io, nxt, slot, eos, limit, vocab)
    _ring_chain[(1,)](result, io, nxt, slot, eos, batch, eos.numel(), limit, vocab,
                      BLOCK=triton.next_power_of_2(batch), EOS=triton.next_power_of_2(eos.numel()),
                      num_warps=1)  # fmt: skip


def ring_chain_reference(result: torch.Tensor, io: torch.Tensor, nxt: torch.Tensor, slot: torch.Tensor,
                         eos: torch.Tensor, limit: int, vocab: int) -> None:  # fmt: skip
    """The kernel's rule, row by row in Python."""
    batch = _check(result, io, nxt, slot, eos, limit, vocab)
    stops = set(eos.tolist())
    bad = int(result[batch])
    for b in range(batch):
        tok, pos = int(result[b]), int(io[1, b])
        done = pos < 0 or tok in stops or pos + 1 >= limit or bad != 0
        nxt[0, b] = tok if 0 <= tok < vocab else 0
        nxt[1, b] = -1 if done else pos + 1
    slot.copy_(result)
