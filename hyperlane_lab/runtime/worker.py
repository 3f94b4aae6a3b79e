"""The worker: one stage engine, its sessions, and the data-plane handling around it.

Threads: the asyncio loop owns the listening sockets and gRPC and receives frames; one compute
thread runs ``forward`` (FIFO, so a session's steps stay in order) plus codec work and sampling.
Frames for stage i+1 leave as soon as stage i's compute ends, so with several sessions in flight
every stage can be busy. Outgoing frames are written by the thread that has them (compute or GPU
completion thread) through a blocking ``SocketSender``: no hand-off to the loop per frame
(``outbox.py``: connections, the server-side token loop, error relaying; ``worker_config.py``:
configuration and device facts; ``inbox.py``: incoming frames, their checks and routing, and the step on
the CPU).

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

from hyperlane_lab.generation.sampling import Sampler
from hyperlane_lab.host_stamps import host_stamps
from hyperlane_lab.models.decode_linear import env_flag
from hyperlane_lab.runtime.blobs import BlobStore
from hyperlane_lab.runtime.dataplane import (
    READ_TIMEOUT_S,
    BufferPool,
    open_connection,
    start_server,
)
from hyperlane_lab.runtime.frame import (
    MAX_PAYLOAD,
    MAX_STRIPES,
)
from hyperlane_lab.runtime.gpu_steps import GpuStepper, uses_gpu_path
from hyperlane_lab.runtime.hot_thread import HotThread
from hyperlane_lab.runtime.inbox import WorkerInbox
from hyperlane_lab.runtime.outbox import _Outgoing
from hyperlane_lab.runtime.stripes import MIN_PART, STRIPE_FROM, StripeRegistry
from hyperlane_lab.runtime.trace_recorder import TraceRecorder
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


def _switch(setting: bool | None, env: str, default: bool = False) -> bool:
    """A worker switch: the config's value, or the environment's when unset, else ``default``."""
    return env_flag(env, default) if setting is None else setting


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


class Worker(WorkerInbox):
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
        self.warm_frames_in = 0  # WARM frames dropped on arrival (runtime/hop_warm.py)
        # prompt steps whose graph is captured enqueued on the loop thread too, saving the hand-off to the
        # compute thread (~0.27 ms a chunk on 4 x H100, bench/gpu_notes.md); experimental, off by default.
        # Bodies up to PROMPT_ON_LOOP_MAX_BYTES only: the step waits for its upload before the body goes
        # back to the pool, and a larger body's copy would hold the loop (other sessions' frames) longer
        self.prompt_on_loop = _switch(config.prompt_on_loop, "HYPERLANE_PROMPT_ON_LOOP")
        self.fast_prompts = 0  # prompt steps enqueued on the loop thread
        # uploads into kept device buffers (GpuStepper, runtime/staging.py)
        self.staging_pool = _switch(config.staging_pool, "HYPERLANE_STAGING_POOL")
        # prompt chunks uploaded straight into their prompt graph's input (GpuStepper, models/prompt_graphs.py)
        self.direct_prompt_upload = _switch(config.direct_prompt_upload, "HYPERLANE_DIRECT_PROMPT_UPLOAD")
        # a lone session's next decode step enqueued before its frame arrives (GpuStepper, models/decode_armed.py)
        self.armed_graphs = _switch(config.armed_graphs, "HYPERLANE_ARMED_GRAPHS")
        # a one-stage pipeline's token loop hands its next step over in memory (outbox.ring_here)
        self.local_ring = _switch(config.local_ring, "HYPERLANE_LOCAL_RING", default=True)
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
        gpu = self._gpu
        # a greedy token loop in memory: its steps will be chained (gpu_chain.py); the link is warmed here, where
        # no capture runs beside it
        eos = ring[2] if ring is not None else None
        if here and params.greedy and gpu is not None and eos is not None and not gpu.chain_ready(batch, eos):
            await self._on_compute(gpu.warm_chain, batch, eos)
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

    def ring_chained_steps(self) -> int:
        """Greedy token loop steps enqueued behind the step before them, their inputs made on the GPU
        (``gpu_chain.py``)."""
        gpu = self._gpu
        return gpu.chained_steps if gpu is not None else 0

    def hop_warmups(self) -> tuple[int, int, float]:
        """(WARM frames this worker's GPU completion thread sent before a decode step's frame, warm-ups it skipped
        because its wait ended after the step's end, the most its recent waits ended late in µs) (``hop_warm.py``)."""
        gpu = self._gpu
        return (gpu.hop_warmups, gpu.hop_late, gpu.hop_wake_us) if gpu is not None else (0, 0, 0.0)

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
