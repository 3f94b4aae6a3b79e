"""The worker: one stage engine, its sessions, and the data-plane handling around it.

Threads: the asyncio loop owns the listening sockets and gRPC and receives frames; one compute
thread runs ``forward`` (FIFO, so a session's steps stay in order) plus codec work and sampling.
Frames for stage i+1 leave as soon as stage i's compute ends, so with several sessions in flight
every stage can be busy. Outgoing frames are written by the thread that has them (compute or GPU
completion thread) through a blocking ``SocketSender``: no hand-off to the loop per frame
(``outbox.py``: connections, the server-side token loop, error relaying; ``worker_config.py``:
configuration and device facts).

Latency path on CUDA: a decode step whose graph is already captured only *enqueues* GPU work, so
when the compute thread is idle the loop thread enqueues it itself as soon as the frame is in,
saving a thread hand-off per hop; anything else (prefill, first step, CPU) goes to the compute
thread. A worker holding every layer hands its token loop's next step to itself in memory, and on CUDA
its completion thread enqueues it (``outbox.ring_here``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.generation.sampling import Sampler
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.decode_linear import env_flag
from hyperlane_lab.models.decode_wire import IDX_CODECS
from hyperlane_lab.runtime.blobs import BlobStore
from hyperlane_lab.runtime.dataplane import (
    READ_TIMEOUT_S,
    BufferPool,
    Frame,
    FrameConnection,
    open_connection,
    start_server,
)
from hyperlane_lab.runtime.frame import (
    FLAG_MORE,
    MAX_PAYLOAD,
    MAX_STRIPES,
    FrameHeader,
    FrameKind,
    raw_nbytes,
)
from hyperlane_lab.runtime.gpu_steps import GpuStepper, uses_gpu_path
from hyperlane_lab.runtime.hot_thread import HotThread
from hyperlane_lab.runtime.outbox import WorkerOutbox, _Outgoing
from hyperlane_lab.runtime.stripes import MIN_PART, STRIPE_FROM, StripeRegistry
from hyperlane_lab.runtime.trace_recorder import TraceRecorder
from hyperlane_lab.runtime.wire import check_payload, decode_payload, encode_tensor
from hyperlane_lab.runtime.worker_config import (
    WorkerConfig,
    compute_spin_window_us,
    device_memory,
    hold_cpu_latency,
    resolve_device,
)
from hyperlane_lab.types import SamplingParams

__all__ = ["Worker", "WorkerConfig", "device_memory", "hold_cpu_latency", "resolve_device"]

log = logging.getLogger(__name__)
MAX_PROBE = 64 << 20  # link-probe payloads
MAX_ERROR = 64 << 10  # error messages


@dataclass
class _Session:
    batch: int
    max_len: int
    sampler: Sampler | None
    reply_to: str
    steps: int = 0
    error: str = ""
    last_used: float = field(default_factory=time.monotonic)
    # server-side token loop (last stage): (first stage's data address, steps, EOS ids) or None
    ring: tuple[str, int, frozenset[int]] | None = None
    flag_last: bool = False  # ... whose last step's frame is flagged LAST (every stage takes the flag)
    # ... whose first stage is this worker (it holds every layer): the next step's frame is handed to the
    # step path in memory (``outbox.ring_here``), not sent to this worker's own socket
    ring_here: bool = False


def _noop() -> None:
    pass


def _pinned_bytes(n: int) -> Any:
    """A page-locked host byte array (the numpy view keeps its tensor alive)."""
    return torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()


def _opt_in(setting: bool | None, env: str) -> bool:
    """A worker switch that is off by default: the config's value, or the environment's when unset."""
    return env_flag(env, False) if setting is None else setting


def _setting(value: int | None, env: str, default: int, lo: int, hi: int) -> int:
    """An integer worker setting: the config's value, else the environment's, else ``default``."""
    if value is not None:
        return value
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = lo - 1
    if not lo <= v <= hi:
        raise ValueError(f"{env} must be an integer from {lo} to {hi}, got {raw!r}")
    return v


PROMPT_ON_LOOP_MAX_BYTES = 4 << 20  # --prompt-on-loop: larger prompt bodies still go to the compute thread


class Worker(WorkerOutbox):
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        cache = config.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hyperlane_lab", "blobs")
        self.blobs = BlobStore(cache)
        self.engine: Any = None
        self.engine_name = ""
        self.stage_index = 0
        self.sessions: dict[str, _Session] = {}
        self.out = _Outgoing()
        self.trace = TraceRecorder()
        self.pool = BufferPool()
        if self.device.type == "cuda":  # prompt-sized bodies in page-locked memory: DMA to the GPU
            self.pool.pinned_alloc = _pinned_bytes
        self.profile: dict[str, float] = {}
        # one thread runs engine calls in order; it spins for the next call for a while after each where
        # compute_spin_window_us says so (runtime/hot_thread.py: a prompt chunk's host path on a warm core)
        spin_us = compute_spin_window_us(config)
        if spin_us:
            log.info("worker: the compute thread spins up to %d µs for its next call after each", spin_us)
        self._compute = HotThread("hyperlane-compute", spin_us / 1e6)
        # tasks given to / finished by the compute thread; each counter has one writer (the loop
        # thread / the compute thread), so "idle" = equal needs no lock
        self._submitted = 0
        self._finished = 0
        self.fast_steps = 0  # decode steps enqueued on the loop thread (the latency path)
        # prompt steps whose graph is captured enqueued on the loop thread too, saving the hand-off to the
        # compute thread (~0.27 ms a chunk on 4 x H100, bench/gpu_notes.md); experimental, off by default.
        # Bodies up to PROMPT_ON_LOOP_MAX_BYTES only: the step waits for its upload before the body goes
        # back to the pool, and a larger body's copy would hold the loop (other sessions' frames) longer
        self.prompt_on_loop = _opt_in(config.prompt_on_loop, "HYPERLANE_PROMPT_ON_LOOP")
        self.fast_prompts = 0  # prompt steps enqueued on the loop thread
        # uploads into kept device buffers (GpuStepper, runtime/staging.py)
        self.staging_pool = _opt_in(config.staging_pool, "HYPERLANE_STAGING_POOL")
        # prompt chunks uploaded straight into their prompt graph's input (GpuStepper, models/prompt_graphs.py)
        self.direct_prompt_upload = _opt_in(config.direct_prompt_upload, "HYPERLANE_DIRECT_PROMPT_UPLOAD")
        # a lone session's next decode step enqueued before its frame arrives (GpuStepper, models/decode_armed.py)
        self.armed_graphs = _opt_in(config.armed_graphs, "HYPERLANE_ARMED_GRAPHS")
        # a one-stage pipeline's token loop hands its next step over in memory (outbox.ring_here)
        self.local_ring = (
            env_flag("HYPERLANE_LOCAL_RING", True) if config.local_ring is None else config.local_ring
        )
        # GPU work outside the step paths and the compute thread (Profile): nothing is armed while > 0
        self.gpu_users = 0
        # large tensor frames to the next stage split over several connections (runtime/stripes.py); the
        # data server takes striped frames from any sender
        self.stripes = _setting(config.stripes, "HYPERLANE_STRIPES", 1, 1, MAX_STRIPES)
        self.stripe_from = _setting(
            config.stripe_from, "HYPERLANE_STRIPE_FROM", STRIPE_FROM, MIN_PART, MAX_PAYLOAD
        )
        self.stripe_registry = StripeRegistry(READ_TIMEOUT_S, config.max_payload)
        self._gpu: GpuStepper | None = None  # made on first use for a CUDA engine (loop or compute thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._lock = threading.Lock()
        self.grpc_port = config.grpc_port
        self.data_port = 0
        self.on_change: list[Any] = []  # callbacks when shard/memory changes (mDNS re-announce)
        # the loop's BusyPollSelector, set by ``serve`` when it has one: the loop spins for frames
        # while ``quiet()``, and threads that make the worker quiet wake it (``wake_loop``)
        self.selector: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start_data_plane(self) -> int:
        self._loop = asyncio.get_running_loop()
        port = self.config.data_port
        if port is None:
            port = self.grpc_port + 1 if self.grpc_port else 0
        self._server = await start_server(
            self.config.host,
            port,
            self._on_frame,
            self.pool,
            max_payload=self.config.max_payload,
            on_header=self._check_header,
            stripes=self.stripe_registry,
        )
        self.data_port = self._server.sockets[0].getsockname()[1]
        if self.config.session_ttl_s > 0:
            self._reaper = asyncio.create_task(self._reap_idle_sessions())
        return self.data_port

    async def _reap_idle_sessions(self) -> None:
        ttl = self.config.session_ttl_s
        while True:
            await asyncio.sleep(min(30.0, ttl / 2))
            now = time.monotonic()
            for sid, sess in list(self.sessions.items()):
                if now - sess.last_used > ttl:
                    log.warning(
                        "closing session %s: idle for %.0f s (its client is gone?)",
                        sid[:8],
                        now - sess.last_used,
                    )
                    await self.close_session(sid)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in [self.out.conn, *self.out.extra.values()]:
            if conn is not None:
                conn.close()
        self.stripe_registry.close()
        self._compute.shutdown(wait=False, cancel_futures=True)
        if self._gpu is not None:
            self._gpu.close()
        host_stamps().flush()  # opt-in diagnostics (HYPERLANE_HOST_STAMPS)

    def changed(self) -> None:
        for cb in self.on_change:
            try:
                cb()
            except Exception:
                log.exception("on_change callback failed")

    def memory(self, device: torch.device | None = None) -> tuple[int, int]:
        """(total, free) bytes this worker offers, honouring ``memory_limit``."""
        total, free = device_memory(device or self.device)
        limit = self.config.memory_limit
        if limit:
            used = (
                self.engine.weights.nbytes()
                if self.engine is not None and hasattr(self.engine, "weights")
                else 0
            )
            total, free = min(total, limit), max(0, min(free, limit - used))
        return total, free

    # ------------------------------------------------------------------ control (called from gRPC)

    def set_engine(self, engine: Any, engine_name: str, stage_index: int) -> None:
        with self._lock:
            self.engine, self.engine_name, self.stage_index = engine, engine_name, stage_index
            self.sessions.clear()
            self.trace.stage = stage_index
            if self._gpu is not None:
                self._gpu.forget_specs()  # decided for the previous stage
        self.changed()

    def unload(self) -> bool:
        with self._lock:
            was = self.engine is not None
            self.engine, self.engine_name = None, ""
            self.sessions.clear()
            if self._gpu is not None:
                self._gpu.forget_specs()  # and its free staging buffers, before empty_cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.changed()
        return was

    async def open_session(
        self,
        sid: str,
        batch: int,
        max_len: int,
        params: SamplingParams,
        reply_to: str,
        ring: tuple[str, int, frozenset[int]] | None = None,
        flag_last: bool = False,
    ) -> int:
        """``flag_last``: with ``ring``, every stage takes frames flagged LAST (``outbox.ring_next``)."""
        eng = self.engine
        if eng is None:
            raise ValueError("no shard is loaded on this worker; call LoadShard first")
        if sid in self.sessions:
            raise ValueError(f"session {sid} is already open")
        if ring is not None and not eng.is_last:
            raise ValueError("only the last stage runs a server-side token loop (ring_to)")
        # one stage holds every layer: its token loop's first stage is itself (any other address names a
        # worker that would run the same layers on a cache it does not have)
        here = ring is not None and eng.is_first and self.local_ring
        if here:
            log.debug(
                "session %s: one stage holds every layer; its token loop runs in memory (ring_to unused)", sid
            )
        if eng.is_last:
            if not reply_to:
                raise ValueError("the last stage needs reply_to (the client's data address)")
            await self._connection_to(reply_to)
            if ring is not None and not here:
                await self._connection_to(ring[0])
        need = eng.kv_cache_bytes(batch, max_len) if hasattr(eng, "kv_cache_bytes") else 0
        _, free = self.memory()
        if need and free and need > free:
            raise MemoryError(
                f"KV cache for batch {batch} x {max_len} tokens needs {need / 2**30:.2f} GiB, "
                f"worker {self.worker_id} has {free / 2**30:.2f} GiB free; use a shorter max length or smaller batch"
            )
        await self._on_compute(eng.open_session, sid, batch, max_len)
        self.sessions[sid] = _Session(
            batch,
            max_len,
            Sampler(params) if eng.is_last else None,
            reply_to,
            ring=ring,
            flag_last=flag_last,
            ring_here=here,
        )
        return need

    async def close_session(self, sid: str) -> bool:
        s = self.sessions.pop(sid, None)
        self._prune_senders()
        if self.engine is not None:
            await self._on_compute(self.engine.close_session, sid)
        return s is not None

    def staged_reuses(self) -> int:
        """Uploads that went into a kept device buffer (``HYPERLANE_STAGING_POOL=1``; 0 otherwise)."""
        gpu = self._gpu
        return gpu.pool.reused if gpu is not None and gpu.pool is not None else 0

    def direct_uploads(self) -> int:
        """Prompt chunks uploaded straight into their prompt graph's input (``--direct-prompt-upload``)."""
        gpu = self._gpu
        return gpu.direct_uploads if gpu is not None else 0

    def decode_choices(self) -> str:
        """The loaded stage's decode kernel choices as JSON text (``TorchStage.decode_choices``; Health
        reports it): "{}" when the engine has none to report yet, "" when no shard is loaded."""
        eng = self.engine
        if eng is None:
            return ""
        choices = eng.decode_choices() if hasattr(eng, "decode_choices") else {}
        try:
            return json.dumps(choices, sort_keys=True, default=str)
        except (TypeError, ValueError) as e:  # not JSON-shaped: say so rather than fail Health
            return json.dumps({"error": f"decode choices not reportable: {e}"})

    @property
    def busy_polling(self) -> bool:
        return self.selector is not None

    def quiet(self) -> bool:
        """Nothing in flight here: the compute thread is idle and no GPU step waits to be shipped.
        The busy-polling selector spins only then (other threads need the GIL otherwise)."""
        gpu = self._gpu
        return self._submitted == self._finished and (gpu is None or gpu.idle())

    def wake_loop(self) -> None:
        """Wake the event loop from another thread (a no-op callback); nothing if it has stopped."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # closed: the worker is shutting down
            loop.call_soon_threadsafe(_noop)

    def disarm(self) -> None:
        """Release an armed decode step (it runs as padding) before GPU work that does not go through the
        step paths: an armed step holds the compute stream until its frame comes."""
        gpu = self._gpu
        if gpu is not None:
            gpu.disarm()

    def ring_here_steps(self) -> int:
        """Token loop steps this worker's GPU completion thread enqueued itself (``outbox.ring_here``)."""
        gpu = self._gpu
        return gpu.ring_steps if gpu is not None else 0

    def armed_counts(self) -> tuple[int, int, int]:
        """(steps started by their flag, armed steps released as padding, of which the gate had given up);
        zeros unless armed graphs are on."""
        arming = self._gpu.arming if self._gpu is not None else None
        return (arming.fired, arming.released, arming.gave_up) if arming is not None else (0, 0, 0)

    def _submit(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the compute thread (call on the loop thread); counts it as pending. An armed
        step is released first, and a launch under way on the completion thread finishes first (counted
        before: the completion thread arms or launches only while nothing is pending)."""
        self._submitted += 1
        self.disarm()

        def task() -> Any:
            try:
                return fn(*args)
            finally:
                self._finished += 1
                if self.busy_polling and self.quiet():
                    self.wake_loop()  # the loop may spin for frames again

        return self._compute.submit(task)

    async def _on_compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(fn, *args))

    async def probe_link(self, address: str, sizes: list[int], repeats: int) -> tuple[float, float]:
        from hyperlane_lab.runtime.linkprobe import probe_connection

        conn = await open_connection(address, self._on_frame, self.pool, on_header=self._check_header)
        try:
            return await probe_connection(conn, self._pongs, sizes, repeats)
        finally:
            if conn.transport is not None:
                conn.transport.close()

    # ------------------------------------------------------------------ data plane (loop thread)

    def _on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        h = frame.header
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

    def _gpu_for(self, eng: Any) -> GpuStepper | None:
        """The CUDA step path for ``eng`` (None for other engines), made on first use."""
        if not uses_gpu_path(eng):
            return None
        gpu = self._gpu
        if gpu is not None and gpu.device == eng.device:
            return gpu
        with self._lock:  # the loop and the compute thread both get here
            if self._gpu is None or self._gpu.device != eng.device:
                if self._gpu is not None:
                    self._gpu.close()
                self._gpu = GpuStepper(self, eng.device)
            return self._gpu

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

    # ------------------------------------------------------------------ sending (any thread but the loop)
