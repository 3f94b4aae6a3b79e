"""The gate of an *armed* decode step: a one-program kernel that holds its stream until the host says go.

Why: a worker normally launches a decode step when the step's frame arrives (numpy writes into the
CUDA graph's pinned inputs, an event, ``graph.replay()``), 50-100 µs of Python on the critical path of
every hop. An armed step is enqueued *before* its frame comes: this kernel, then the session's
wire-mode graph (which copies its inputs from pinned host memory itself). On arrival the host only
writes the inputs and then the flag; the kernel sees the flag and ends, and the graph runs at once.

Protocol (one armed step per stream at a time; the flag only grows):

- ``flag`` (pinned host int64, read by the GPU through its mapping) is the host's go: the kernel ends
  when ``flag >= target``, ``target`` being the armed step's number.
- ``status`` (pinned host int64) is written when the kernel ends: ``target`` when the flag came,
  ``-target`` when it gave up after ``limit`` (nanoseconds of the GPU's global timer with ``TIMER``,
  else flag reads: the CPU interpreter has no timer). On giving up it also writes -1 over the graph's
  ``batch`` pinned positions, so the graph that follows runs as padding (its K/V writes go to the
  trash slot) instead of on stale or half-written inputs.
- The host never fires a step later than half the limit after arming it (``decode_armed.py``), so a
  fired step is never one the kernel gave up on; the status lets the completion thread check that.

x86 orders the host's stores, so inputs written before the flag are visible to the GPU once the flag is;
the graph's input copies run after this kernel, in stream order.

Layout: ``_armed_wait`` (``@triton.jit``) -> ``armed_wait`` (launcher: checks) -> reference
``armed_wait_reference`` (the same rule on host memory, for the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

__all__ = ["armed_wait", "armed_wait_reference"]


@triton.jit(do_not_specialize=["target", "limit"])
def _armed_wait(
    flag_ptr, status_ptr, pos_ptr, batch, target, limit, TIMER: tl.constexpr, BLOCK: tl.constexpr
):
    v = tl.load(flag_ptr, volatile=True)
    waited = tl.full((), 0, tl.int64)
    if TIMER:
        t0 = globaltimer()
    while (v < target) & (waited < limit):
        v = tl.load(flag_ptr, volatile=True)
        if TIMER:
            waited = globaltimer() - t0
        else:
            waited += 1
    released = v >= target
    tl.store(status_ptr, tl.where(released, target, -target).to(tl.int64))
    offs = tl.arange(0, BLOCK)
    late = (tl.zeros((BLOCK,), tl.int64) + v) < target  # (a block of the scalar: the interpreter's masks)
    tl.store(pos_ptr + offs, tl.full((BLOCK,), -1, tl.int64), mask=(offs < batch) & late)


def _check(
    flag: torch.Tensor, status: torch.Tensor, positions: torch.Tensor, target: int, limit: int
) -> None:
    for name, t in (("flag", flag), ("status", status), ("positions", positions)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"armed_wait: {name} must be a contiguous int64 tensor, got {t.dtype}")
    if flag.numel() != 1 or status.numel() != 1:
        raise ValueError("armed_wait: flag and status hold one int64 each")
    if positions.dim() != 1 or not 1 <= positions.numel() <= 4096:
        raise ValueError(
            f"armed_wait: positions must be 1-D with 1 to 4096 rows, got {tuple(positions.shape)}"
        )
    if target < 1 or limit < 1:
        raise ValueError(f"armed_wait: target and limit must be >= 1, got {target}, {limit}")


def armed_wait(
    flag: torch.Tensor, status: torch.Tensor, positions: torch.Tensor, target: int, limit: int, timer: bool
) -> None:
    """Enqueue the gate on the current stream. ``flag``, ``status``: pinned (or device) int64 [1];
    ``positions``: the graph's pinned int64 positions [B]; ``limit``: ns with ``timer`` (a GPU), else reads."""
    _check(flag, status, positions, target, limit)
    block = triton.next_power_of_2(positions.numel())
    _armed_wait[(1,)](flag, status, positions, positions.numel(), target, limit, TIMER=timer, BLOCK=block,
                      num_warps=1)  # fmt: skip


def armed_wait_reference(
    flag: torch.Tensor, status: torch.Tensor, positions: torch.Tensor, target: int, limit: int
) -> None:
    """The kernel's rule on host tensors (``limit`` in reads)."""
    _check(flag, status, positions, target, limit)
    reads = 0
    v = int(flag[0])
    while v < target and reads < limit:
        v = int(flag[0])
        reads += 1
    status[0] = target if v >= target else -target
    if v < target:
        positions.fill_(-1)
