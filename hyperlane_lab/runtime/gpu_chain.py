"""Chained steps, for ``GpuStepper`` (``gpu_steps.py``): a one-stage greedy token loop runs a step ahead on the GPU.

A worker holding every layer runs its session's token loop itself (``outbox.ring_here``): each step's ship makes
the next step's frame, which the completion thread launches (``run_ring``) or fires (an armed step). Either way the
token goes to the host and back before the next step starts: 50-95 µs a token of an idle GPU on the lent H200
hosts. Greedy decoding needs no host for the choice, so, as the in-process engine's run-ahead does
(``generation/driver.py``), the step after the one in flight is enqueued behind it at once, its inputs made on
the GPU from that step's result (``kernels/ring_chain.py``: the next ids and positions written into the graph's
pinned inputs, the result saved into a pinned slot, since the next replay overwrites the graph's own):

    ship of step k:   read k's ids (its slot) -> ring frame of k+1 (``outbox.ring_next``) -> ``run_ring``
                      *confirms* k+1, already on the GPU (``_confirm``) -> TOKENS of k to the client
    after the ship:   chain k+2 behind k+1 (``_chain_after``): the link kernel, the graph's replay, events

The host keeps deciding: a chained step ships only once its predecessor's ring frame confirmed it (positions,
flags, token count come from that frame, which the link kernel's rule matches row for row). One never confirmed
(every row sampled EOS, a failed step, a session gone) ran as padding, its K/V writes on the trash slot: at most
one wasted step a session, as in process, and nothing of it is sent. A step is never chained past the token
budget, nor with an armed step ahead of it, nor while other work may launch (the rules of ``run_ring``:
the completion thread only tries the stepper's lock, and a task counted meanwhile waits for the launch).

The link kernel is compiled, and the session's EOS ids uploaded, on the compute thread when such a session opens
(``warm_chain``, from ``Worker.open_session``), where no graph capture can run beside the launch.
``HYPERLANE_RING_CHAIN=0`` turns it off (the loop then arms steps ahead, ``gpu_arming.py``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.runtime.frame import FLAG_LAST
from hyperlane_lab.runtime.gpu_pending import StepperState, _Pending, _step_io

if TYPE_CHECKING:
    from hyperlane_lab.runtime.dataplane import Frame
    from hyperlane_lab.runtime.worker import _Session

__all__ = ["ChainedSteps"]


def _row(batch: int) -> int:
    """A pinned slot row's length in int64 words: the result's ``batch + 1``, rounded up to 16 bytes (each
    slot starts 16-byte aligned, so the kernel is compiled once for both)."""
    return (batch + 2) // 2 * 2


def _linkable(batch: int, eos: frozenset[int]) -> bool:
    """Within the link kernel's limits (``kernels/ring_chain.py``): up to 1,024 rows and 64 EOS ids."""
    return batch <= 1024 and len(eos) <= 64


def _warm_key(batch: int, eos: frozenset[int]) -> tuple[int, int]:
    """The link kernel's compiled variant: its row and EOS blocks (``triton.next_power_of_2``, without
    importing Triton; an empty EOS set is one -1)."""
    return 1 << (batch - 1).bit_length(), 1 << (max(len(eos), 1) - 1).bit_length()


log = logging.getLogger("hyperlane_lab.runtime.gpu_steps")


class ChainedSteps(StepperState):
    """Mixed into ``GpuStepper``: the chained step in flight (at most one) and the rules above."""

    chain = False  # HYPERLANE_RING_CHAIN (GpuStepper sets it)
    chained_steps = 0  # steps enqueued behind the one before them, inputs made on the GPU
    _chained: _Pending | None = None  # the last one, until its predecessor's ring frame confirms it
    _chain_due: _Pending | None = None  # a step to chain the next one behind, once the current ship is out
    _last: _Pending | None = None  # the last step enqueued (``GpuStepper._enqueue``)

    def _confirm(self, frame: Frame) -> bool:
        """(Completion thread, from ``run_ring``.) ``frame`` is the ring frame of the step chained behind the step
        being shipped: that step is on the GPU already. Take the frame's positions, token count and flags for its
        ship, and chain the next one once this ship is out. A session closed or failed meanwhile: the frame is
        dropped and the step stays unconfirmed (it ships nothing). False: no such step (``run_ring`` goes on)."""
        c, h = self._chained, frame.header
        if c is None or c.sid != h.session or c.step != h.step:
            return False
        self._chained = None
        sess = self.w.sessions.get(c.sid)
        if sess is None or sess.error:
            frame.body.release()
            return True
        c.pos_bytes = bytes(frame.positions_view)
        c.tokens = sum(1 for q in memoryview(c.pos_bytes).cast("q") if q >= 0)
        c.flags, c.confirmed = h.flags, True
        frame.body.release()
        self._chain_due = c
        return True

    def _chain_after(self) -> None:
        """(Completion thread, after a ship.) Chain a step behind the one that ship confirmed or launched."""
        c, self._chain_due = self._chain_due, None
        if c is None or not self.chain:
            return
        try:
            self._maybe_chain(c)
        except Exception as e:  # e.g. no Triton here: the loop launches or arms each step as before
            self._chain_off(e)

    def _chain_off(self, e: Exception) -> None:
        log.warning("stage %d: cannot chain decode steps on %s (%s); launching them from each ship",
                    self.w.stage_index, self.device, e)  # fmt: skip
        self.chain = False

    def _forget_chain(self, p: _Pending) -> None:
        """(Completion thread, ``p`` completed or failed.) A step chained behind ``p`` that ``p``'s ship did not
        confirm stays unconfirmed (it ships nothing); nothing is chained behind it."""
        c = self._chained
        if c is not None and c.sid == p.sid and c.step == p.step + 1:
            self._chained = None
        self._chain_due = None

    def _maybe_chain(self, c: _Pending) -> None:
        w = self.w
        sess = w.sessions.get(c.sid)
        eng = w.engine
        if sess is None or eng is None or not self._may_chain(c, sess, eng):
            return
        try:
            cache = eng.session(c.sid)
        except KeyError:  # closed meanwhile
            return
        assert sess.ring is not None
        self._on_device()
        # done when the session opened (``warm_chain``, on the compute thread); else here, not under the lock
        link, eos = self._link(c.batch, sess.ring[2])
        if not self._arm_lock.acquire(blocking=False):  # a launch elsewhere: the next ship launches the step
            return
        self._arming_now = True  # before the checks read the task count (see ArmedSteps.disarm)
        try:  # re-checked under the lock: a launch, a task, a close or a failure may have come meanwhile
            g = cache.graph
            if not self._may_chain(c, sess, eng) or g is None or g.wire is not c.wire or g.greedy is None:
                return
            io = _step_io(cache)
            slots = io.host.get("chain")
            if slots is None or slots.shape[1] != _row(c.batch):  # two slots: a step's and the one before it
                pinned = torch.cuda.is_available()  # (plain memory for the CPU tests of the rules)
                slots = io.host["chain"] = torch.empty(
                    (2, _row(c.batch)), dtype=torch.int64, pin_memory=pinned
                )
            slot = slots[c.step % 2, : c.batch + 1]
            start, end, linked = io.take()
            cs = self.compute_stream
            limit = min(sess.max_len, cache.limit)
            with torch.cuda.stream(cs):
                start.record(cs)
                link(g.greedy, g.io, g.io_host, slot, eos, limit, eng.spec.vocab_size)
                linked.record(cs)  # c's result is in its slot: the completion thread waits for this
                g.graph.replay()
                g.staged.record(cs)
                end.record(cs)
            now = time.perf_counter()
            c.slot, c.done = slot.numpy(), linked
            p = _Pending(c.sid, c.step + 1, c.batch, 1, now, 0, b"", g.out, start, end, None, None, "greedy",
                         wire=g.wire, t_run=now, t_launched=now, chained=True)  # fmt: skip
            cache.writes += 1
            sess.steps += 1
            self._chained = p
            self.chained_steps += 1
            self._enqueue(p)
        finally:
            self._arming_now = False
            self._arm_lock.release()

    def _may_chain(self, c: _Pending, sess: _Session, eng: Any) -> bool:
        """``c`` is a greedy wire step of a one-stage token loop (this worker holds every layer), the last step
        enqueued; the next one is within the budget; nothing armed or chained; the stepper not closing; the
        compute thread idle and no other GPU user (Profile); the session not failed."""
        w = self.w
        ring = sess.ring
        return bool(
            self.chain
            and self._last is c
            and self._chained is None
            and self._armed is None
            and not self._closing
            and c.mode == "greedy"
            and c.wire is not None
            and not c.flags & FLAG_LAST
            and eng.is_first
            and eng.is_last
            and sess.ring_here
            and ring is not None
            and c.step + 1 < ring[1]
            and _linkable(c.batch, ring[2])
            and not sess.error
            and w.sessions.get(c.sid) is sess
            and w._submitted == w._finished
            and not w.gpu_users
        )

    def chain_ready(self, batch: int, eos: frozenset[int]) -> bool:
        """The link kernel is compiled for these sizes and the EOS ids are on the device (``warm_chain``), or
        chaining is off (nothing to warm)."""
        return not self.chain or (eos in self._eos_ids() and _warm_key(batch, eos) in self._link_warm())

    def warm_chain(self, batch: int, eos: frozenset[int]) -> None:
        """(Compute thread, when a one-stage greedy loop's session opens.) Compile the link kernel for these sizes
        and upload the EOS ids where no capture can run beside it; the completion thread would otherwise do it at
        the session's first chain. A failure turns chaining off (the loop launches or arms each step)."""
        if not self.chain or not _linkable(batch, eos):
            return
        try:
            self._on_device()
            self._link(batch, eos)
        except Exception as e:
            self._chain_off(e)

    def _eos_ids(self) -> dict[frozenset[int], tuple[torch.Tensor, torch.Tensor]]:
        """Per EOS set: its ids on the device and the (pinned) host tensor they were uploaded from."""
        return self.__dict__.setdefault("_eos_dev", {})  # type: ignore[no-any-return]

    def _link_warm(self) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
        """The sizes the link kernel was compiled for, with the buffers of that launch."""
        return self.__dict__.setdefault("_warm_links", {})  # type: ignore[no-any-return]

    def _link(self, batch: int, eos: frozenset[int]) -> tuple[Any, torch.Tensor]:
        """The link kernel's launcher, compiled for ``batch`` rows and this many EOS ids (a launch on buffers of
        its own, on the current stream, the first time), and the EOS ids on the device (-1 for none), uploaded
        from pinned memory without a wait. Both made once (a few EOS sets kept)."""
        from hyperlane_lab.codecs._kernels import kernel_module

        link = kernel_module("ring_chain").ring_chain
        known = self._eos_ids()
        if eos not in known:
            if len(known) > 16:
                known.clear()
            host = ids = torch.tensor(sorted(eos) or [-1], dtype=torch.int64)
            if self.device.type == "cuda":  # (the CPU tests of the rules keep host memory)
                host = host.pin_memory()
                ids = torch.empty_like(host, device=self.device)
                ids.copy_(host, non_blocking=True)  # the upload reads ``host`` later: kept with it
            known[eos] = (ids, host)
        ids = known[eos][0]
        warm, key = self._link_warm(), _warm_key(batch, eos)
        if key not in warm:  # the compile, on buffers of the same alignment as the real ones
            dev = self.device
            res = torch.zeros(batch + 1, dtype=torch.int64, device=dev)
            io = torch.full((2, batch), -1, dtype=torch.int64, device=dev)
            out = torch.empty((2, _row(batch)), dtype=torch.int64, device=dev)
            nxt = torch.empty((2, batch), dtype=torch.int64, device=dev)
            link(res, io, nxt, out[0, : batch + 1], ids, 1, 1)
            warm[key] = (res, io, out, nxt)  # alive until the launch has run (they are tiny)
        return link, ids
