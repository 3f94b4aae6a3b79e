"""The GPU completion thread, for ``GpuStepper`` (``gpu_steps.py``): it waits for each step's events in order,
ships the step's frames (the next stage's, or the token loop's next step and the client's tokens), and places the
step's GPU interval on the host clock in the trace. After a ship it chains or arms the session's next step
(``gpu_chain.py``, ``gpu_arming.py``)."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from hyperlane_lab.generation.sampling import NON_FINITE
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
from hyperlane_lab.runtime.gpu_pending import StepperState, _Pending
from hyperlane_lab.runtime.wire import encode_tensor, tensor_bytes

__all__ = ["CompletionThread"]

log = logging.getLogger("hyperlane_lab.runtime.gpu_steps")


class CompletionThread(StepperState):
    """Mixed into ``GpuStepper``: the body of its completion thread."""

    def _complete_loop(self) -> None:
        while True:
            p = self._q.get()
            if p is None:
                return
            try:
                self._complete(p)
            except Exception as e:
                log.exception("stage %d: could not emit step %d of %s", self.w.stage_index, p.step, p.sid)
                self.mark_read()  # nothing will read its result: a release elsewhere must not wait for it
                self.w._call_soon(self.w._forward_error, p.sid, p.step, f"stage {self.w.stage_index}: {e}")
                self.release_session(p.sid)  # no frame comes for a step armed behind this one
            else:
                self._chain_after()
                self._arm_after(p)
            finally:
                self.ring_ahead = None  # (set by run_ring during this step's ship)
                self._forget_chain(p)
                if self._read <= self._done:  # (a step shipped without a sampled result)
                    self.mark_read()
                self._done += 1
            if self._done == self._put and self.w.busy_polling:
                self.w.wake_loop()  # the loop thread may spin for the next frame now

    def _complete(self, p: _Pending) -> None:
        w = self.w
        hs = host_stamps()
        hs.begin("complete", p.sid, p.step, p.tokens)
        synced = False
        try:
            if self._warm_hop(p):  # shortly before the step ends: its connection's warm-up (hop_warm.py)
                hs.mark("warmed")
            p.last.synchronize()  # releases the GIL while it waits
            synced = True
            t_done = time.perf_counter()
            hs.mark("synced")
            if p.armed is not None and self.arming is not None and self.arming.gave_up_on(p.armed):
                raise RuntimeError(  # never seen: the host fires only within half the gate's limit
                    "the armed decode step's gate gave up before its frame released it (the step ran "
                    "as padding); retry the request, or run workers without --armed-graphs"
                )
        except BaseException:
            hs.end()
            self._release_slot(p.staged_in, done=synced)
            raise
        if p.wasted:  # ran as padding: nothing to ship, no times to trace
            hs.end()
            return
        try:
            t_sampled = self._ship(p)  # frames first (the next stage waits for them), bookkeeping after
            hs.mark("shipped")
        finally:
            hs.end()
            # every reader of the uploaded input is done: the step's events were waited for above and what
            # the side stream did for it (sampling, a codec) came back to the host in _ship
            self._release_slot(p.staged_in, done=True)
        # place the GPU interval on the host clock: it ended when its copy (if any) began. The events
        # are still this step's: a session's next step records into the other set (_StepIO)
        try:
            tail = p.end.elapsed_time(p.done) / 1e3 if p.done is not None else 0.0
            t_end = t_done - tail
            t_start = t_end - p.start.elapsed_time(p.end) / 1e3
        except Exception as e:  # the frame is out: a lost timing must not fail the step
            log.debug("stage %d: no GPU times for step %d of %s: %s", w.stage_index, p.step, p.sid, e)
            return
        self._note_gpu_time(p, t_end - t_start)
        if t_sampled is not None:
            w.trace.add("sample", t_end, t_sampled, p.sid, p.step)
        # queue: waiting for the thread that runs the step (as on the CPU path); from its
        # start to the GPU's start the host stages inputs and launches
        w.trace.add("queue", p.queued_at, max(p.queued_at, min(p.t_run, t_start)), p.sid, p.step)
        # host staging and enqueueing (the GPU may start during it)
        w.trace.add("launch", p.t_run, p.t_launched, p.sid, p.step)
        w.trace.add("compute", max(p.queued_at, t_start), t_end, p.sid, p.step, tokens=p.tokens)

    def _release_slot(self, slot: torch.Tensor | None, done: bool) -> None:
        """Give a step's staging buffer back to the pool (``done``: its GPU work finished), or drop it
        behind the compute stream's work (a step that failed before that)."""
        if slot is None or self.pool is None:
            return
        if done:
            self.pool.give(slot)
        else:
            with contextlib.suppress(Exception):
                self.pool.discard(slot, self.compute_stream)

    def _ship(self, p: _Pending) -> float | None:
        """Send the step's frames. Returns when a sampled (last-stage) step's token was ready on the
        host (the "sample" span ends there), else None."""
        w = self.w
        if p.mode == "none":
            return None
        if p.mode in ("greedy", "sample"):
            sess = w.sessions.get(p.sid)
            if p.mode == "greedy":
                # a wire graph's view made once (``.numpy()`` is a torch call: µs on a woken thread); a step
                # with one chained behind it: the pinned copy the link kernel made (the graph's is overwritten)
                host = p.slot
                if host is None and p.wire is not None and p.wire.out_ids is not None:
                    host = p.wire.out_ids
                if host is None:
                    assert p.host is not None
                    host = p.host.numpy()
                if int(host[-1]):
                    raise ValueError(NON_FINITE)
                # a copy: the pinned buffer is reused by the session's next step, which the ring
                # frame below may start before the client's frame is out (one-stage pipelines).
                # numpy from here on: each torch call costs tens of µs on a thread woken from idle
                ids: np.ndarray = host[:-1].copy()
            else:
                if sess is None or sess.sampler is None:
                    return None  # closed meanwhile
                with torch.cuda.device(self.device), torch.cuda.stream(self.side_stream):
                    p.out.record_stream(self.side_stream)
                    ids = sess.sampler(p.out).to(torch.int64).contiguous().numpy()
            self.mark_read()  # this step's: a step armed behind it may start now (ArmedSteps)
            if sess is None:
                return None
            t2 = time.perf_counter()
            # the next step first: critical path. No next step (budget, EOS): nothing to arm for it
            p.final = not w.ring_next(sess, p.sid, p.step, ids, p.pos_bytes)
            payload = [ids.data.cast("B")]
            header = FrameHeader(
                FrameKind.TOKENS,
                p.sid,
                p.step,
                p.batch,
                0,
                torch.int64,
                0,
                0,
                tuple(ids.shape),
                payload[0].nbytes,
            )
            w._send(sess.reply_to, header, [p.pos_bytes[:0], *payload], p.sid, p.step)
            return t2
        if p.sid not in w.sessions:  # closed while the step was in flight: nothing to ship
            return None
        if p.mode == "hidden":
            assert p.host is not None
            # a wire graph's pinned result has a byte view made once (tensor_bytes is five torch calls)
            parts, dtype, codec, group, shape = (
                [p.wire.payload() if p.wire is not None else tensor_bytes(p.host)],
                p.host.dtype,
                0,
                0,
                tuple(p.host.shape),
            )
        elif p.mode == "wire":  # encoded inside the graph; the kernels counted NaN/Inf groups
            wio = p.wire
            bad = wio.bad_groups()
            if bad:  # the codec's own check on the same tensor names the index and the fix
                from hyperlane_lab import codecs

                c = codecs.get_by_id(wio.spec.out_codec, wio.spec.out_group or 64)
                with torch.cuda.device(self.device), torch.cuda.stream(self.side_stream):
                    p.out.record_stream(self.side_stream)
                    c.encode(p.out)  # raises ValueError (NaN/Inf, or beyond the fp16 scale range)
                raise ValueError(
                    f"codec {c.name!r} flagged {bad} group(s) of the hidden state it cannot encode"
                )
            parts, dtype, codec, group, shape = (
                [wio.payload()],
                p.out.dtype,
                wio.spec.out_codec,
                wio.spec.out_group,
                tuple(p.out.shape),
            )
        else:  # a codec: the same encode as the CPU path, on the side stream
            t1 = time.perf_counter()
            with torch.cuda.device(self.device), torch.cuda.stream(self.side_stream):
                p.out.record_stream(self.side_stream)
                enc = encode_tensor(p.out, w.out.codec, w.out.group_size)
            w.trace.add("quantize", t1, time.perf_counter(), p.sid, p.step)
            parts, dtype, codec, group, shape = enc.parts, enc.dtype, enc.codec, enc.group_size, enc.shape
        header = FrameHeader(
            FrameKind.TENSOR,
            p.sid,
            p.step,
            p.batch,
            p.seq,
            dtype,
            codec,
            group,
            shape,
            sum(x.nbytes for x in parts),
            p.flags,
        )
        w._send("", header, [p.pos_bytes, *parts], p.sid, p.step)
        return None
