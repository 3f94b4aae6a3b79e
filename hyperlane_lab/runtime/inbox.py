"""A worker's incoming frames: header checks before any body memory is taken, routing each tensor frame to
the GPU step path (``gpu_steps.py``, enqueued on the loop thread when nothing would be overtaken) or to the
compute thread, and the step itself where no GPU runs it (forward, sample or encode, send).

Mixed into ``Worker`` (``worker.py``) over ``WorkerOutbox`` (``outbox.py``: what leaves the worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.decode_wire import IDX_CODECS
from hyperlane_lab.runtime.dataplane import Frame, FrameConnection
from hyperlane_lab.runtime.frame import FLAG_MORE, FrameHeader, FrameKind, raw_nbytes
from hyperlane_lab.runtime.outbox import WorkerOutbox
from hyperlane_lab.runtime.wire import check_payload, decode_payload, encode_tensor

if TYPE_CHECKING:
    from hyperlane_lab.runtime.gpu_steps import GpuStepper
    from hyperlane_lab.runtime.worker import _Session

__all__ = ["MAX_ERROR", "MAX_PROBE", "PROMPT_ON_LOOP_MAX_BYTES", "WorkerInbox"]

log = logging.getLogger("hyperlane_lab.runtime.worker")
MAX_PROBE = 64 << 20  # link-probe payloads
MAX_ERROR = 64 << 10  # error messages
PROMPT_ON_LOOP_MAX_BYTES = 4 << 20  # --prompt-on-loop: larger prompt bodies still go to the compute thread


class WorkerInbox(WorkerOutbox):
    """Mixed into ``Worker``: everything that comes in on the data plane, and the CPU step."""

    _submitted: int
    _finished: int
    fast_steps: int
    fast_prompts: int
    prompt_on_loop: bool
    _pongs: dict[int, asyncio.Future[float]]
    warm_frames_in: int  # WARM frames dropped on arrival (hop_warm.py)

    def _submit(self, fn: Any, *args: Any) -> Any:  # Worker's
        raise NotImplementedError

    def _gpu_for(self, eng: Any) -> GpuStepper | None:  # Worker's
        raise NotImplementedError

    # ------------------------------------------------------------------ data plane (loop thread)

    def _on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        h = frame.header
        if h.kind == FrameKind.WARM:  # a hop's warm-up (hop_warm.py): its work was the arrival itself
            frame.body.release()
            self.warm_frames_in += 1
            return
        if h.kind == FrameKind.PING:
            conn.send(
                FrameHeader(FrameKind.PONG, h.session, h.step, 0, 0, torch.uint8, 0, 0, (), h.payload_len),
                bytes(frame.payload_view),
            )
            frame.body.release()
            return
        if h.kind == FrameKind.PONG:
            fut = self._pongs.pop(h.step, None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())
            frame.body.release()
            return
        if h.kind == FrameKind.ERROR:
            msg = bytes(frame.payload_view).decode("utf-8", "replace")
            frame.body.release()
            self._forward_error(h.session, h.step, msg)
            return
        if h.kind != FrameKind.TENSOR:
            raise ProtocolError(f"a worker does not accept frames of kind {h.kind}")
        self._accept_tensor(frame)

    def _check_header(self, conn: FrameConnection, h: FrameHeader) -> bool:
        """Vet a header before any body memory is taken (see dataplane.HeaderCheck)."""
        if h.kind == FrameKind.WARM:
            if h.payload_len or h.batch * h.seq:
                raise ProtocolError(
                    f"a warm-up frame carries nothing, got {h.batch}x{h.seq} positions and {h.payload_len} bytes"
                )
            return True
        if h.kind in (FrameKind.PING, FrameKind.PONG):
            if h.payload_len > MAX_PROBE:
                raise ProtocolError(f"probe frame of {h.payload_len} bytes exceeds {MAX_PROBE}")
            return True
        if h.kind == FrameKind.ERROR:
            if h.payload_len > MAX_ERROR:
                raise ProtocolError(f"error frame of {h.payload_len} bytes exceeds {MAX_ERROR}")
            return True
        if h.kind != FrameKind.TENSOR:
            raise ProtocolError(f"a worker does not accept frames of kind {h.kind}")
        eng, sess = self.engine, self.sessions.get(h.session)
        if eng is None or sess is None:  # e.g. a step still in flight when its session closed
            log.info("dropping a frame of unknown or closed session %s (step %d)", h.session[:8], h.step)
            return False
        if h.batch != sess.batch or not 1 <= h.seq <= sess.max_len:
            raise ProtocolError(
                f"frame has batch {h.batch}x{h.seq}, session {h.session} has batch {sess.batch}, "
                f"max length {sess.max_len}"
            )
        if eng.is_first and (h.dtype != torch.int64 or h.shape != (h.batch, h.seq)):
            raise ProtocolError(
                f"first stage expects int64 ids [{h.batch}, {h.seq}], got {h.dtype} {h.shape}"
            )
        if not eng.is_first and (
            h.shape != (h.batch, h.seq, eng.spec.hidden_size) or not h.dtype.is_floating_point
        ):
            raise ProtocolError(
                f"stage expects hidden [{h.batch}, {h.seq}, {eng.spec.hidden_size}] float, got {h.dtype} {h.shape}"
            )
        if h.payload_len > raw_nbytes(h.shape, h.dtype):  # no codec makes a tensor bigger than raw
            raise ProtocolError(
                f"payload of {h.payload_len} bytes is larger than shape {h.shape} of {h.dtype}"
            )
        return True

    def _accept_tensor(self, frame: Frame) -> None:
        h = frame.header
        sess = self.sessions.get(h.session)
        if self.engine is None or sess is None:  # closed since its header arrived
            frame.body.release()
            return
        if self._failed(frame):
            return
        sess.last_used = time.monotonic()
        gpu = self._gpu_for(self.engine)
        spec = gpu.wire_spec(h) if gpu is not None else None  # checks the payload length (ProtocolError)
        if gpu is not None and spec is not None:  # a decode step through a wire-mode graph
            if spec.in_codec in IDX_CODECS:  # outlier columns: checked here, before a graph scatters by them
                check_payload(h, frame.payload_view)
            t1 = time.perf_counter()
            if self._submitted == self._finished and self.engine.decode_graph_ready(h.session, spec):
                self.fast_steps += 1  # enqueue on the loop thread: nothing to overtake, nothing to capture
                gpu.run_wire(frame, spec, t1)
            else:
                self._submit(self._run_wire, frame, spec, t1)
            # after the launch: the trace is not on the critical path (the frame's times outlive its body)
            self.trace.add("receive", frame.received_at, frame.completed_at, h.session, h.step, h.body_len)
            return
        t0 = time.perf_counter()
        # this thread's part of the hand-off (HYPERLANE_HOST_STAMPS; ended before the step runs anywhere)
        hs = host_stamps()
        hs.begin("dispatch", h.session, h.step, h.batch * h.seq, frame.completed_at)
        # a codec frame for a GPU stage is checked here and decoded on its GPU by the step (the torch
        # reference on the host took 12-17 ms for a 256-token int8 chunk, on this thread)
        encoded = bool(h.codec) and gpu is not None  # (a stepper is always on the engine's device)
        # (a record left open by a bad frame's ProtocolError is replaced by the next begin on this thread)
        if encoded:
            check_payload(h, frame.payload_view)  # lengths, outlier indices (ProtocolError)
            x = torch.frombuffer(frame.payload_view, dtype=torch.uint8)  # codec payloads are never empty
        else:
            x = decode_payload(h, frame.payload_view)  # validates payload length (ProtocolError)
        t1 = time.perf_counter()
        hs.mark("decoded")
        positions = torch.frombuffer(frame.positions_view, dtype=torch.int64).view(h.batch, h.seq)
        self.trace.add("receive", frame.received_at, frame.completed_at, h.session, h.step, h.body_len)
        if h.codec and not encoded:
            self.trace.add("decode", t0, t1, h.session, h.step)
        eng = self.engine
        ready = getattr(eng, "decode_graph_ready", None)  # torch engines only
        prompt_ready = getattr(eng, "prompt_graph_ready", None) if self.prompt_on_loop else None
        if (
            gpu is not None  # (``_gpu_for`` gives the stepper of the engine's device)
            and self._submitted == self._finished  # the compute thread is idle: nothing to overtake
            and (
                (h.seq == 1 and ready is not None and ready(h.session))
                or (
                    h.seq > 1
                    and prompt_ready is not None
                    and h.payload_len <= PROMPT_ON_LOOP_MAX_BYTES
                    and prompt_ready(h.session, positions)
                )
            )
        ):
            if h.seq == 1:
                self.fast_steps += 1
            else:
                self.fast_prompts += 1
            hs.mark("on_loop")
            hs.end()
            # enqueue only (graph replay), then back to the loop
            gpu.run_step(frame, x, positions, t1, encoded)
            return
        hs.mark("routed")
        self._submit(self._run_step, frame, x, positions, time.perf_counter(), encoded)
        hs.mark("submitted")  # the compute thread's "received -> begin" = this record + its wake-up
        hs.end()

    # ------------------------------------------------------------------ compute (compute thread)

    def step_failed(self, sess: _Session | None, sid: str, step: int, message: str) -> None:
        """A step failed here (any thread): the session is marked at once, so that frames of it
        already queued behind (a prompt's later chunks) are dropped, and the error goes on."""
        if sess is not None and not sess.error:
            sess.error = message
        self._call_soon(self._forward_error, sid, step, message)

    def _failed(self, frame: Frame) -> bool:
        """True (and the frame released) for a frame of a session that already failed."""
        sess = self.sessions.get(frame.header.session)
        if sess is None or not sess.error:
            return False
        frame.body.release()
        log.debug("stage %d: dropping step %d of failed session %s", self.stage_index, frame.header.step,
                  frame.header.session[:8])  # fmt: skip
        return True

    def _run_wire(self, frame: Frame, spec: Any, queued_at: float) -> None:
        if self._failed(frame):
            return
        gpu = self._gpu_for(self.engine)
        if gpu is None:  # the engine changed while the frame waited
            frame.body.release()
            self.step_failed(self.sessions.get(frame.header.session), frame.header.session,
                             frame.header.step, f"stage {self.stage_index}: the stage was reloaded")  # fmt: skip
            return
        gpu.run_wire(frame, spec, queued_at)

    def _run_step(
        self, frame: Frame, x: torch.Tensor, positions: torch.Tensor, queued_at: float, encoded: bool = False
    ) -> None:
        """``encoded``: ``x`` is the frame's codec payload (uint8), checked, for the GPU step to decode."""
        h, eng = frame.header, self.engine
        if self._failed(frame):
            return
        gpu = self._gpu_for(eng)
        if gpu is not None:  # CUDA: enqueue only; a completion thread ships (gpu_steps.py)
            gpu.run_step(frame, x, positions, queued_at, encoded)
            return
        sid, step = h.session, h.step
        sess = self.sessions.get(sid)
        t0 = time.perf_counter()
        self.trace.add("queue", queued_at, t0, sid, step)
        try:
            if sess is None or eng is None:
                raise ValueError(f"session {sid} was closed")
            if encoded:  # the stage was reloaded off CUDA while the frame waited: decode it here
                x = decode_payload(h, frame.payload_view)
            eng.input_shape_ok(x, positions)
            out = eng.forward(sid, x, positions)
            n_tok = int((positions >= 0).sum())
            if eng.device.type == "cuda":
                torch.cuda.current_stream(eng.device).synchronize()
            t1 = time.perf_counter()
            self.trace.add("compute", t0, t1, sid, step, tokens=n_tok)
            pos_bytes = bytes(frame.positions_view)
        except Exception as e:
            frame.body.release()
            log.warning("stage %d: step %d of session %s failed: %s", self.stage_index, step, sid, e)
            self.step_failed(sess, sid, step, f"stage {self.stage_index}: {e}")
            return
        frame.body.release()
        sess.steps += 1
        try:
            if eng.is_last and h.flags & FLAG_MORE:  # a prompt chunk: its cache is filled, no token yet
                return
            if eng.is_last:
                assert sess.sampler is not None
                ids = sess.sampler(out).to(torch.int64).contiguous()
                t2 = time.perf_counter()
                self.trace.add("sample", t1, t2, sid, step)
                payload = encode_tensor(ids)
                header = FrameHeader(
                    FrameKind.TOKENS,
                    sid,
                    step,
                    h.batch,
                    0,
                    torch.int64,
                    0,
                    0,
                    tuple(ids.shape),
                    payload.nbytes,
                )
                self.ring_next(sess, sid, step, ids, pos_bytes)  # the next step first: critical path
                self._send(sess.reply_to, header, [pos_bytes[:0], *payload.parts], sid, step)
            else:
                payload = encode_tensor(out, self.out.codec, self.out.group_size)
                t2 = time.perf_counter()
                if payload.codec:
                    self.trace.add("quantize", t1, t2, sid, step)
                header = FrameHeader(
                    FrameKind.TENSOR,
                    sid,
                    step,
                    h.batch,
                    h.seq,
                    payload.dtype,
                    payload.codec,
                    payload.group_size,
                    payload.shape,
                    payload.nbytes,
                    h.flags,
                )
                self._send("", header, [pos_bytes, *payload.parts], sid, step)
        except Exception as e:
            log.exception("stage %d: could not emit step %d of %s", self.stage_index, step, sid)
            self._call_soon(self._forward_error, sid, step, f"stage {self.stage_index}: {e}")
