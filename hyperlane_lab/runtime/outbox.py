"""A worker's outgoing frames: connections to the next stage, to clients, and (last stage) back to
the first stage for the server-side token loop; error relaying.

Frames are written by the thread that has them (compute or GPU completion thread) through blocking
``SocketSender``s, never by the event loop (see ``sender.py`` for why); error frames, raised on the
loop, are written from its default executor.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hyperlane_lab.runtime.dataplane import Frame, PooledBuffer
from hyperlane_lab.runtime.frame import FLAG_LAST, FrameHeader, FrameKind
from hyperlane_lab.runtime.sender import SocketSender

if TYPE_CHECKING:
    from hyperlane_lab.runtime.gpu_steps import GpuStepper
    from hyperlane_lab.runtime.trace_recorder import TraceRecorder
    from hyperlane_lab.runtime.worker import _Session

__all__ = ["WorkerOutbox"]

log = logging.getLogger("hyperlane_lab.runtime.worker")


@dataclass
class _Outgoing:
    codec: str = "raw"
    group_size: int = 0
    address: str = ""
    conn: SocketSender | None = None  # to the next stage
    extra: dict[str, SocketSender] = field(default_factory=dict)  # to clients (the last stage's tokens)


_I64 = struct.Struct("=q")  # one native int64, as numpy's int64 bytes


def ring_frame(batch: int, pos_bytes: bytes, ids: np.ndarray, eos: Any) -> tuple[int, bytes, bytes] | None:
    """The token loop's next step from a step's positions (``batch`` rows of int64) and sampled ``ids``
    [batch]: (largest next position, positions bytes, ids bytes), or None when every row is done (it
    sampled an EOS id in ``eos``, or was padding). One row (batch-1 decode, the latency case) is done with
    Python ints: numpy's per-call cost is most of the work at that size (``ring_frame_rows`` is the same
    rule for any batch)."""
    if batch != 1:
        return ring_frame_rows(batch, pos_bytes, ids, eos)
    last = max(memoryview(pos_bytes).cast("q"))
    tok = int(ids[0])
    if last < 0 or (eos and tok in eos):
        return None
    return last + 1, _I64.pack(last + 1), _I64.pack(tok)


def ring_frame_rows(
    batch: int, pos_bytes: bytes, ids: np.ndarray, eos: Any
) -> tuple[int, bytes, bytes] | None:
    """``ring_frame`` for any batch, with numpy."""
    last = np.frombuffer(pos_bytes, dtype=np.int64).reshape(batch, -1).max(axis=1)
    nxt = np.where(last >= 0, last + 1, -1)
    if eos:
        for b, t in enumerate(ids.tolist()):  # a set lookup per row: np.isin costs ~15 µs
            if t in eos:
                nxt[b] = -1
    if (nxt < 0).all():
        return None
    return int(nxt.max()), nxt.tobytes(), ids.astype(np.int64).tobytes()


class WorkerOutbox:
    """Mixed into ``Worker``: everything that leaves the worker on the data plane."""

    out: _Outgoing
    sessions: dict[str, _Session]
    trace: TraceRecorder
    engine: Any
    stage_index: int
    stripes: int
    stripe_from: int
    _loop: asyncio.AbstractEventLoop | None
    _gpu: GpuStepper | None

    async def connect_next(self, address: str, codec: str, group_size: int) -> float:
        t0 = time.perf_counter()
        if codec not in ("raw", "none"):
            from hyperlane_lab import codecs

            codecs.get(codec, group_size=group_size or 64)  # ValueError listing valid codecs
        self.out.codec, self.out.group_size = codec or "raw", group_size
        if address:
            if self.out.conn is not None and self.out.address == address and self.out.conn.is_open:
                return 0.0
            conn = await asyncio.to_thread(
                SocketSender, address, stripes=self.stripes, stripe_from=self.stripe_from
            )
            old, self.out.conn = self.out.conn, conn
            self.out.address = address
            if old is not None:
                old.close()
        return time.perf_counter() - t0

    def _prune_senders(self) -> None:
        """Close connections to clients / first stages that no open session uses and whose peer
        has gone (a client that exited), so they do not pile up."""
        in_use = {s.reply_to for s in self.sessions.values()}
        in_use |= {s.ring[0] for s in self.sessions.values() if s.ring is not None}
        for address, conn in list(self.out.extra.items()):
            if address not in in_use and not conn.is_open:
                del self.out.extra[address]
                conn.close()

    async def _connection_to(self, address: str) -> SocketSender:
        conn = self.out.extra.get(address)
        if conn is None or not conn.is_open:
            conn = await asyncio.to_thread(SocketSender, address)
            self.out.extra[address] = conn
        return conn

    def _call_soon(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _send(self, reply_to: str, header: FrameHeader, parts: list[Any], sid: str, step: int) -> str:
        """Write a step's frame to the next stage (or, with ``reply_to``, to that address). Blocks
        until the kernel has taken it: call from the compute or completion thread, never the loop.
        Returns "" when sent, else why not (already logged)."""
        conn = self.out.extra.get(reply_to) if reply_to else self.out.conn
        t0 = time.perf_counter()
        try:
            if conn is None:
                raise ConnectionError(
                    f"no data connection to {reply_to}"
                    if reply_to
                    else "this stage is not connected to a next stage (call Connect)"
                )
            n = conn.send(header, *parts)
        except ConnectionError as e:
            log.error("stage %d: cannot send step %d of %s: %s", self.stage_index, step, sid, e)
            return str(e)
        self.trace.add("send", t0, time.perf_counter(), sid, step, nbytes=n)
        return ""

    def ring_next(
        self, sess: _Session, sid: str, step: int, ids: torch.Tensor | np.ndarray, pos_bytes: bytes
    ) -> bool:
        """Server-side token loop: feed step ``step``'s sampled ``ids`` [B] (int64, host) to the first stage as
        step ``step + 1`` (call before the step's TOKENS frame goes to the client: the next step is on the
        critical path, the client only reads). Each row's next position
        is its last position + 1; a row that sampled an EOS id, or was padding, becomes padding
        (-1). Stops after the session's token budget or when every row is padding. Returns False when
        the loop ended here (no next step will come from it), True otherwise (or without a loop)."""
        if sess.ring is None:
            return True
        address, budget, eos = sess.ring
        if step + 1 >= budget:
            return False
        batch = sess.batch
        ids_np = ids if isinstance(ids, np.ndarray) else ids.numpy()
        nxt = ring_frame(batch, pos_bytes, ids_np.reshape(batch), eos)
        if nxt is None:  # every row sampled EOS (or was padding): the client knows it is done
            return False
        top, pos_out, ids_out = nxt
        fail = ""
        if top >= sess.max_len:  # the budget should have stopped first: tell the client
            fail = f"position {top} is beyond the session's max length {sess.max_len}"
        else:
            # the budget's last step: no step follows it, so no stage arms one
            last = FLAG_LAST if sess.flag_last and step + 2 >= budget else 0
            header = FrameHeader(
                FrameKind.TENSOR, sid, step + 1, batch, 1, torch.int64, 0, 0, (batch, 1), 8 * batch, last
            )
            if sess.ring_here:
                self.ring_here(header, pos_out + ids_out)
                err = ""
            else:
                err = self._send(address, header, [pos_out, ids_out], sid, step)
            if err:
                fail = f"the token loop cannot reach the first stage at {address}: {err}"
        if fail:  # the client waits for the next step: an error frame instead, never silence
            log.error("stage %d: session %s step %d: %s", self.stage_index, sid[:8], step, fail)
            self._call_soon(self._forward_error, sid, step + 1, f"stage {self.stage_index}: {fail}")
            return False
        return True

    def ring_here(self, header: FrameHeader, body: bytes) -> None:
        """(Compute or GPU completion thread.) The next step of a token loop whose first stage is this worker
        (it holds every layer): the frame goes to the step path in memory, not through the worker's own socket.
        Through the socket it waited 240-400 µs a token on an H200 host: the loop thread sleeps in epoll while
        the step that sent it completes, then waits for the GIL (bench/gpu_notes.md, twenty-fifth session).
        The GPU completion thread enqueues it at once wherever the loop thread would on arrival
        (``GpuStepper.run_ring``); otherwise the loop thread takes it as if it had come in."""
        now = time.perf_counter()
        frame = Frame(header, PooledBuffer(None, bytearray(body), len(body)), now, now)
        gpu = self._gpu
        try:
            if gpu is not None and gpu.run_ring(frame):
                return
        except Exception as e:  # the loop thread's path takes the frame (and reports a failure for this step)
            log.warning("stage %d: the token loop's step %d goes through the event loop: %s", self.stage_index,
                        header.step, e)  # fmt: skip
        self._call_soon(self._accept_ring, frame)

    def _accept_ring(self, frame: Frame) -> None:
        """(Loop thread.) ``ring_here``'s frame, taken as an arrived one; a failure fails its session (the
        client waits for that step: an error frame, never silence)."""
        h = frame.header
        try:
            self._accept_tensor(frame)
        except Exception as e:
            frame.body.release()
            log.exception(
                "stage %d: the token loop's step %d of %s failed", self.stage_index, h.step, h.session
            )
            self.step_failed(
                self.sessions.get(h.session), h.session, h.step, f"stage {self.stage_index}: {e}"
            )

    def _accept_tensor(self, frame: Frame) -> None:  # WorkerInbox's (inbox.py)
        raise NotImplementedError

    def step_failed(self, sess: _Session | None, sid: str, step: int, message: str) -> None:  # WorkerInbox's
        raise NotImplementedError

    def _forward_error(self, sid: str, step: int, message: str) -> None:
        sess = self.sessions.get(sid)
        if sess is None:  # errors are only relayed for sessions this worker knows
            return
        sess.error = message
        if self._gpu is not None:  # no frame of it will run: its armed step must not hold the stream
            self._gpu.release_session(sid)
        if self.engine is not None and self.engine.is_last:
            conn = self.out.extra.get(sess.reply_to)
        else:
            conn = self.out.conn
        if conn is None or not conn.is_open:
            return
        data = message.encode()[:65536]
        header = FrameHeader(FrameKind.ERROR, sid, step, 0, 0, torch.uint8, 0, 0, (len(data),), len(data))

        def send() -> None:
            try:
                conn.send(header, data)
            except ConnectionError as e:
                log.error("stage %d: cannot relay the error of %s: %s", self.stage_index, sid, e)

        # a blocking send must not stall the loop (another thread may hold the socket mid-frame)
        assert self._loop is not None
        self._loop.run_in_executor(None, send)
