"""The worker's step path on CUDA: the compute thread only *enqueues*, a completion thread ships.

On the CPU a step is forward -> encode -> send, all on the compute thread. On a GPU that would
leave the device idle while the host waits for each step's result and prepares the next, so:

    compute thread:    H2D (pinned staging, copy stream) -> forward (graph replay or eager kernels
                       on the compute stream) -> [last stage, greedy: argmax + finite flag on device]
                       -> D2H into pinned memory on the copy stream -> hand the step over; take the
                       next queued step at once (no host sync).
    completion thread: wait for each step's copy event (in order), record its GPU time in the
                       trace, build the frame and write it to the socket (``SocketSender``).

``run_step`` runs on the compute thread, or on the worker's event loop for decode steps whose
CUDA graph is captured (it only enqueues then; see ``Worker._accept_tensor``). A worker holding every
layer has its token loop's next step launched by the completion thread itself, right after the sample
(``run_ring``, ``gpu_arming.py``). Every launch holds the stepper's lock.

With several sessions in flight the GPU always has the next session's step queued behind the
current one, while copies and socket sends of finished steps proceed in parallel. Sampled
(non-greedy) generation and non-raw codecs run on the completion thread on a side stream, with the
same code as the CPU path, so their results are the same as before.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.cuda_decode import graph_greedy, greedy_pack
from hyperlane_lab.models.decode_armed import ArmedStep, Arming, host_orders_stores
from hyperlane_lab.models.decode_linear import env_flag
from hyperlane_lab.models.decode_wire import WireSpec, frame_wire_spec
from hyperlane_lab.models.sessions import check_positions, check_token_ids
from hyperlane_lab.runtime.frame import FLAG_MORE, FrameHeader
from hyperlane_lab.runtime.gpu_arming import ArmedSteps
from hyperlane_lab.runtime.gpu_chain import ChainedSteps
from hyperlane_lab.runtime.gpu_complete import CompletionThread
from hyperlane_lab.runtime.gpu_pending import _Pending, _step_io, _StepIO
from hyperlane_lab.runtime.hop_warm import HopWarm
from hyperlane_lab.runtime.staging import StagingPool
from hyperlane_lab.runtime.wire import CudaStager, decode_payload

if TYPE_CHECKING:
    from hyperlane_lab.runtime.dataplane import Frame
    from hyperlane_lab.runtime.worker import Worker

__all__ = ["GpuStepper", "uses_gpu_path"]

log = logging.getLogger(__name__)


def uses_gpu_path(engine: Any) -> bool:
    """The torch engine on a CUDA device (other engines keep the synchronous path)."""
    dev = getattr(engine, "device", None)
    return (
        getattr(engine, "engine_name", "") == "torch" and isinstance(dev, torch.device) and dev.type == "cuda"
    )


class GpuStepper(CompletionThread, ArmedSteps, ChainedSteps, HopWarm):
    """One per worker and device; ``run_step`` is called on the worker's compute thread or event loop, and
    ``run_ring`` on its completion thread (module docstring)."""

    def __init__(self, worker: Worker, device: torch.device) -> None:
        self.w = worker
        self.device = device
        self.stager = CudaStager(device)
        self.side_stream = torch.cuda.Stream(device)  # completion-thread GPU work (sampling, codecs)
        # steps run on the device's default stream: the threads that run them (compute, event loop) never
        # set another, and a graph replays on the current one. Looked up once (~6 µs a call from Python)
        self.compute_stream = torch.cuda.default_stream(device)
        self._threads = threading.local()  # _on_device's note of the threads it has set
        self._init_hop_warm()  # a hop's warm-up before each lone decode step's frame (hop_warm.py)
        self._q: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._complete_loop, name="hyperlane-complete", daemon=True)
        self._thread.start()
        self._specs: dict[
            tuple[Any, ...], tuple[WireSpec, int] | None
        ] = {}  # per frame kind: (spec, payload bytes)
        self.wire_enabled = env_flag("HYPERLANE_WIRE", True)  # 0: every decode step takes the staged path
        # uploads of prompt chunks and codec frames into device buffers kept for reuse (staging.py)
        self.pool = StagingPool(device) if worker.staging_pool else None
        # prompt chunks uploaded straight into their captured prompt graph's input (TorchStage.prompt_input_slot)
        self.direct_prompts = bool(getattr(worker, "direct_prompt_upload", False))
        self.direct_uploads = 0
        # armed decode steps (decode_armed.py): a session's next wire step enqueued behind a gate while
        # it is the worker's only session. The lock orders arming (completion thread) against every
        # launch (loop, compute or completion thread): nothing is enqueued behind a gate that no frame will open
        self.arming = None
        if getattr(worker, "armed_graphs", False):
            if host_orders_stores():
                self.arming = Arming()
            else:
                log.warning("armed decode steps need an x86-64 host (ordered stores); launching on arrival")
        self._arm_lock = threading.RLock()
        self._armed: ArmedStep | None = None
        self._arming_now = False  # the completion thread holds the lock to arm (ArmedSteps.disarm reads it)
        self._closing = False  # close() was called: arm nothing more
        # steps handed to / finished by the completion thread. ``_put``'s writers (``run_step``, ``run_wire``
        # on the loop or compute thread, ``run_ring`` on the completion thread) hold ``_arm_lock``
        self._put = 0
        self._done = 0
        self._read = 0  # steps whose result the completion thread has read (a sampled step's: ArmedSteps)
        self._orphan = None
        self.ring_steps = 0  # one-stage token loop steps the completion thread enqueued (``run_ring``)
        self.ring_ahead: tuple[str, int] | None = None  # (session, step) of the last step run_ring enqueued
        # a one-stage ring's step after the one run_ring enqueued is armed behind it (gpu_arming.py)
        self.arm_ahead = env_flag("HYPERLANE_ARM_AHEAD", True)
        # ... and, greedy, its step after the one in flight is chained behind it instead (gpu_chain.py)
        self.chain = env_flag("HYPERLANE_RING_CHAIN", True)

    def _on_device(self) -> None:
        """Make this stepper's device the calling thread's current one, once per thread (the threads
        that run steps serve this device only; a reloaded stage on another GPU gets a new stepper)."""
        if not getattr(self._threads, "on", False):
            torch.cuda.set_device(self.device)
            self._threads.on = True

    def idle(self) -> bool:
        """No step of this stepper is on the GPU or waiting to be shipped."""
        return self._put == self._done

    def _enqueue(self, p: _Pending) -> None:
        self._put += 1
        self._last = p
        self._q.put(p)

    def close(self) -> None:
        self._closing = True  # before disarm: an arm whose checks come later sees it (_may_arm)
        self.disarm()
        self._q.put(None)

    # ------------------------------------------------------------------ wire-mode decode steps

    def forget_specs(self) -> None:
        """Drop the wire specs decided so far and the free staging buffers (a new stage was loaded or the
        stage unloaded: first/last, dtype and sizes change), and release an armed step."""
        self.disarm()
        self._specs = {}
        if self.pool is not None:
            self.pool.clear()

    def wire_spec(self, h: FrameHeader) -> WireSpec | None:
        """The wire-mode graph spec for a decode frame, or None where wire mode does not apply (the
        staged path takes the frame). Checks the payload length against the declared shape and codec
        (ProtocolError), since the wire path sends the bytes to the GPU undecoded."""
        w, eng = self.w, self.w.engine
        graphs = eng.graph_decoder() if eng is not None and hasattr(eng, "graph_decoder") else None
        if (
            not self.wire_enabled
            or h.seq != 1
            or graphs is None
            or graphs.wire_broken
            or graphs._broken  # graphs failed here: the staged path decodes eagerly, off the loop
            or h.flags & FLAG_MORE  # a one-token prompt chunk: the staged path sends nothing for it
            or eng.device != self.device
        ):
            return None
        key = (h.codec, h.group_size, h.dtype, h.batch, w.out.codec, w.out.group_size)
        if key not in self._specs:  # None is cached too: the staged path for such frames
            self._specs[key] = self._new_spec(h, eng)
        hit = self._specs[key]
        if hit is None:
            return None
        spec, want = hit
        if h.payload_len != want:
            raise ProtocolError(
                f"payload is {h.payload_len} bytes but shape {h.shape} of {h.dtype} with codec id "
                f"{h.codec} (group {h.group_size}) needs {want}"
            )
        return spec

    def _new_spec(self, h: FrameHeader, eng: Any) -> tuple[WireSpec, int] | None:
        try:
            return frame_wire_spec(h.codec, h.group_size, h.dtype, h.shape, eng.dtype, eng.is_first,
                                   eng.is_last, self.w.out.codec, self.w.out.group_size,
                                   eng.spec.hidden_size)  # fmt: skip
        except ValueError as e:  # a group size the codec refuses
            raise ProtocolError(str(e)) from e

    def run_wire(self, frame: Frame, spec: WireSpec, queued_at: float) -> None:
        """A decode step in wire mode: numpy writes into the graph's pinned inputs, one replay, one
        event; the completion thread sends the pinned result. Runs where ``run_step`` runs, or on the
        completion thread for a one-stage token loop (``run_ring``). An armed
        step of the session (decode_armed.py) only needs the writes and its flag."""
        with self._arm_lock:  # (uncontended but for an arm or a ring launch on the completion thread)
            self._run_wire(frame, spec, queued_at)

    def _run_wire(self, frame: Frame, spec: WireSpec, queued_at: float) -> None:
        t_run = time.perf_counter()
        w, h = self.w, frame.header
        eng, sid, step = w.engine, h.session, h.step
        hs = host_stamps()
        hs.begin("wire", sid, step, h.batch, frame.completed_at)
        sess = w.sessions.get(sid)
        released = False
        try:
            if sess is None or eng is None:
                raise ValueError(f"session {sid} was closed")
            cache = eng.session(sid)
            pos = np.frombuffer(frame.positions_view, dtype=np.int64)
            one = h.batch == 1  # batch 1 (the latency case): Python compares, not numpy reductions
            check_positions(int(pos[0]) if one else int(pos.max()), sid, cache.limit)
            x: Any = frame.payload_view
            if eng.is_first:
                x = np.frombuffer(x, dtype=np.int64)
                if not one or not 0 <= int(x[0]) < eng.spec.vocab_size:
                    check_token_ids(x, eng.spec.vocab_size)  # a batch, or the error for a bad id
            armed = self._take_armed(sid, cache, spec)
            if armed is not None and not self._fire(armed, pos, x, eng.is_first):
                armed = None  # armed too long ago (released): launched as usual below
            if armed is not None:  # enqueued already: the flag started it
                g, start, end = armed.graph, armed.start, armed.end
                cache.writes += 1
                hs.mark("fired")
            else:
                start, end, _ = _step_io(cache).take()
                self._on_device()  # in place of a device context per step (each torch call costs here)
                start.record(self.compute_stream)
                hs.mark("checked")
                g = eng.graph_decoder().step_wire(cache, spec, pos, x)
                if g is None:  # wire capture failed on this GPU: the staged path from now on
                    hs.end()
                    xt = decode_payload(h, frame.payload_view)
                    positions = torch.from_numpy(pos.copy()).view(h.batch, h.seq)
                    self.run_step(frame, xt, positions, queued_at)
                    return
                hs.mark("replay")
            pos_bytes = pos.tobytes()  # a copy: the frame buffer goes back to the pool now
            n_tok = int((pos >= 0).sum())
            frame.body.release()
            released = True
            if armed is None:
                end.record(self.compute_stream)
            t_launched = time.perf_counter()
            wio, out, host = g.wire, g.out, g.wire.out_host
            if eng.is_last:
                assert sess.sampler is not None
                mode = "greedy" if sess.sampler.params.greedy else "sample"
            else:
                mode = "hidden" if spec.out_codec == 0 else "wire"
        except Exception as e:
            self._step_error(frame, released, sess, e)
            return
        finally:
            hs.end()
        sess.steps += 1
        self._enqueue(
            _Pending(sid, step, h.batch, h.seq, queued_at, n_tok, pos_bytes, out, start, end, host,
                     None, mode, h.flags, wio, t_run, t_launched, armed=armed)
        )  # fmt: skip

    def _step_error(self, frame: Frame, released: bool, sess: Any, e: Exception) -> None:
        w, h = self.w, frame.header
        if not released:
            frame.body.release()
        log.warning("stage %d: step %d of session %s failed: %s", w.stage_index, h.step, h.session, e)
        w.step_failed(sess, h.session, h.step, f"stage {w.stage_index}: {e}")

    # ------------------------------------------------------------------ compute thread

    def run_step(
        self, frame: Frame, x: torch.Tensor, positions: torch.Tensor, queued_at: float, encoded: bool = False
    ) -> None:
        """``encoded``: ``x`` is the frame's codec payload as uint8 bytes, already checked against the
        header (``wire.check_payload``): it is uploaded and decoded on this GPU, in stream order. An
        armed step is released first (this step must not queue behind its gate)."""
        with self._arm_lock:
            self.disarm()
            self._run_step(frame, x, positions, queued_at, encoded)

    def _run_step(
        self, frame: Frame, x: torch.Tensor, positions: torch.Tensor, queued_at: float, encoded: bool
    ) -> None:
        t_run = time.perf_counter()
        w, h = self.w, frame.header
        eng, sid, step = w.engine, h.session, h.step
        hs = host_stamps()  # opt-in marks of the host path (HYPERLANE_HOST_STAMPS)
        hs.begin("decode" if h.seq == 1 else "prompt", sid, step, h.batch * h.seq, frame.completed_at)
        sess = w.sessions.get(sid)
        released = False
        uploaded: torch.cuda.Event | None = None
        staging = False  # an upload from the frame body may be in flight
        slot: torch.Tensor | None = None  # the pool buffer it went to (HYPERLANE_STAGING_POOL)
        try:
            if sess is None or eng is None:
                raise ValueError(f"session {sid} was closed")
            # CPU tensors: id range checked here, no device sync (a codec payload: its header's shape)
            eng.input_shape_ok(
                torch.empty(h.shape, dtype=h.dtype, device="meta") if encoded else x, positions
            )
            pos_np = positions.numpy().copy()  # numpy: the host is slow at tiny torch ops
            positions = torch.from_numpy(pos_np)  # our copy: the frame buffer goes back to the pool
            pos_bytes = pos_np.tobytes()
            n_tok = int((pos_np >= 0).sum())
            hs.mark("checked")
            # a decode step replays a CUDA graph, which stages its small inputs itself (pinned
            # buffer, one copy); larger inputs go through the upload stream
            graphs = eng.graph_decoder() if hasattr(eng, "graph_decoder") else None
            cache = eng.session(sid) if graphs is not None and h.seq == 1 else None
            # reused events and pinned buffers (decode steps: a one-token chunk shares its step number)
            io = _step_io(cache) if cache is not None and not h.flags & FLAG_MORE else None
            events = io.take() if io is not None else None
            with torch.cuda.device(self.device):
                # the upload is not waited for here: the host enqueues the step while the DMA runs
                staging = cache is None or encoded
                direct = None
                if staging and not encoded and self.direct_prompts and h.seq > 1:
                    slot_of = getattr(eng, "prompt_input_slot", None)  # torch engines only
                    direct = slot_of(sid, positions, x.dtype) if slot_of is not None else None
                if staging and direct is None and self.pool is not None:
                    slot = self.pool.take(x.nbytes, self.stager.h2d_stream)
                if not staging:
                    x_in, uploaded = x, None
                elif direct is not None:  # the graph's input: one copy, no allocation (prompt_graphs.py)
                    here = torch.cuda.current_stream(self.device)  # the stream the graph replays on
                    x_in, uploaded = self.stager.upload_to(x, direct[0], direct[1], here)
                    self.direct_uploads += 1
                elif slot is not None:
                    x_in, uploaded = self.stager.upload_into(x, slot)
                else:
                    x_in, uploaded = self.stager.upload(x)
                hs.mark("upload")
                compute = self.compute_stream
                start = events[0] if events is not None else torch.cuda.Event(enable_timing=True)
                start.record(compute)
                if encoded:  # the codec's kernels, on the compute stream after the upload (in "compute")
                    x_in = decode_payload(h, x_in, self.device, trusted=True)
                out = eng.forward(sid, x_in, positions)
                hs.mark("forward")
                if uploaded is not None:  # the frame body was read by DMA: done before it is reused
                    uploaded.synchronize()
                    hs.mark("dma_wait")
                frame.body.release()  # x has been copied out (staged) by now
                released = True
                host = done = None
                if eng.is_last and h.flags & FLAG_MORE:  # a prompt chunk: cache filled, no token yet
                    mode = "none"
                elif eng.is_last:
                    assert sess.sampler is not None
                    if sess.sampler.params.greedy:
                        # the Sampler's greedy choice and finiteness check, kept on the device
                        # (computed inside the decode graph when the step replayed one)
                        packed = graph_greedy(cache, out) if cache is not None else None
                        out = packed if packed is not None else greedy_pack(out)
                        mode = "greedy"
                    else:
                        mode = "sample"
                else:
                    mode = "hidden" if w.out.codec in ("raw", "none") else "codec"
                end = events[1] if events is not None else torch.cuda.Event(enable_timing=True)
                end.record(compute)
                t_launched = time.perf_counter()
                hs.mark("launched")
                if mode in ("hidden", "greedy"):
                    if io is not None and events is not None:
                        host, done = self._to_host_reused(io, mode, out, end, events[2])
                    else:
                        host, done = self.stager.to_host(out, end)
        except Exception as e:
            if staging and not released:  # the DMA may still read the frame body (upload() may have failed)
                with contextlib.suppress(Exception):
                    self.stager.h2d_stream.synchronize()
            self._release_slot(slot, done=False)
            self._step_error(frame, released, sess, e)
            return
        finally:
            hs.end()
        sess.steps += 1
        self._enqueue(
            _Pending(
                sid,
                step,
                h.batch,
                h.seq,
                queued_at,
                n_tok,
                pos_bytes,
                out,
                start,
                end,
                host,
                done,
                mode,
                h.flags,
                t_run=t_run,
                t_launched=t_launched,
                staged_in=slot,
            )
        )

    def _to_host_reused(
        self, io: _StepIO, mode: str, out: torch.Tensor, end: torch.cuda.Event, done: torch.cuda.Event
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``CudaStager.to_host`` into the session cache's own pinned buffer (no allocation per
        step). Safe to reuse: a session has one step in flight per stage, and its next step
        reaches this stage only after this one's frame was sent (the send is synchronous)."""
        buf = io.host.get(mode)
        if buf is None or buf.shape != out.shape or buf.dtype != out.dtype:
            buf = io.host[mode] = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        cs = self.stager.copy_stream
        with torch.cuda.stream(cs):
            cs.wait_event(end)
            buf.copy_(out, non_blocking=True)  # ``out`` is a graph's static buffer: no record_stream
            done.record(cs)
        return buf, done
