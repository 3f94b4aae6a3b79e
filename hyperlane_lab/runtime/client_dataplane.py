"""The client's data plane: sends token ids to the first stage and receives sampled ids from the
last, on an asyncio loop in a background thread so any number of user threads can wait at once.

Steps are written by the user's thread itself (``SocketSender``: no wake-up of the I/O thread
per token); a second, asyncio connection to the first stage carries link probes and tells the
client at once when that worker goes away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.dataplane import (
    BufferPool,
    Frame,
    FrameConnection,
    open_connection,
    parse_address,
    start_server,
)
from hyperlane_lab.runtime.frame import FLAG_MORE, FrameHeader, FrameKind
from hyperlane_lab.runtime.sender import SocketSender
from hyperlane_lab.runtime.wire import decode_payload, tensor_bytes

__all__ = ["ClientDataPlane", "local_address_towards"]


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (what a worker there can reach us at)."""
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent
            return str(s.getsockname()[0])
    except OSError:
        return "0.0.0.0"


class ClientDataPlane:
    def __init__(self, first_stage: str, listen_host: str) -> None:
        self.first_stage = first_stage
        self.listen_host = listen_host
        self.pool = BufferPool()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hyperlane-client-io", daemon=True
        )
        self._pending: dict[tuple[str, int], concurrent.futures.Future[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._conn: FrameConnection | None = None  # probes + liveness of the first stage
        self._sender: SocketSender | None = None  # steps to the first stage
        self._server: asyncio.Server | None = None
        self.reply_address = ""
        self.pongs: dict[int, asyncio.Future[float]] = {}
        self._token_conns: set[FrameConnection] = set()  # inbound connections that carry our tokens
        # server-side token loops: their steps' tokens arrive unasked; kept until ``expect`` takes them
        self._ring_sessions: set[str] = set()
        self._arrived: dict[tuple[str, int], torch.Tensor] = {}
        self._failed: dict[str, Exception] = {}  # ring sessions' errors, for steps not yet awaited

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())
        self._sender = SocketSender(self.first_stage)

    async def _start(self) -> None:
        self._server = await start_server(
            self.listen_host,
            0,
            self._on_frame,
            self.pool,
            on_header=self._check_header,
            on_close=self._closed,
        )
        port = self._server.sockets[0].getsockname()[1]
        host = self.listen_host
        if host in ("0.0.0.0", ""):
            host = local_address_towards(parse_address(self.first_stage)[0])
        self.reply_address = f"{host}:{port}"
        self._conn = await open_connection(
            self.first_stage, self._on_frame, self.pool, on_header=self._check_header, on_close=self._closed
        )

    def run(self, coro: Any, timeout: float | None = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def _stop() -> None:
            if self._conn is not None and self._conn.transport is not None:
                self._conn.transport.close()
            if self._server is not None:
                self._server.close()

        if self._sender is not None:
            self._sender.close()
        try:
            self.run(_stop(), timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        with self._lock:
            for fut in self._pending.values():
                fut.set_exception(ConnectionError("the client was closed"))
            self._pending.clear()

    # ------------------------------------------------------------------ steps

    def submit(
        self,
        sid: str,
        step: int,
        ids: torch.Tensor,
        positions: torch.Tensor,
        chunks: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> concurrent.futures.Future[torch.Tensor]:
        """Send step ``step`` (``chunks``: its leading prompt chunks, sent first by ``send_chunk``;
        ``ids``/``positions`` are its last chunk). The future is registered before anything goes
        out, so an error frame for an early chunk fails it even while later chunks are being sent."""
        fut: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        with self._lock:
            self._pending[(sid, step)] = fut
        try:
            for chunk_ids, chunk_positions in chunks:
                self.send_chunk(sid, step, chunk_ids, chunk_positions)
            self._send_tensor(sid, step, ids, positions, 0)
        except ConnectionError as e:
            self._fail(sid, step, e)
        return fut

    def send_chunk(self, sid: str, step: int, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """A prompt chunk that more chunks of ``step`` follow (``FLAG_MORE``): the stages fill
        their caches and the last stage answers nothing (``submit`` sends a step's chunks)."""
        self._send_tensor(sid, step, ids, positions, FLAG_MORE)

    def _send_tensor(
        self, sid: str, step: int, ids: torch.Tensor, positions: torch.Tensor, flags: int
    ) -> None:
        ids = ids.to(torch.int64).contiguous()
        pos = positions.to(torch.int64).contiguous()
        payload = tensor_bytes(ids)
        header = FrameHeader(
            FrameKind.TENSOR,
            sid,
            step,
            ids.shape[0],
            ids.shape[1],
            torch.int64,
            0,
            0,
            tuple(ids.shape),
            payload.nbytes,
            flags,
        )
        if self._sender is None or self._conn is None or not self._conn.is_open:
            raise ConnectionError(f"the data connection to the first stage {self.first_stage} is closed")
        self._sender.send(header, tensor_bytes(pos), payload)

    def open_ring(self, sid: str) -> None:
        """Accept tokens of ``sid`` that no ``submit`` asked for (the workers run its token loop)."""
        with self._lock:
            self._ring_sessions.add(sid)

    def expect(self, sid: str, step: int, timeout: float) -> torch.Tensor:
        """The ids of step ``step`` of a server-side loop session (waits for them)."""
        fut: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        with self._lock:
            ids = self._arrived.pop((sid, step), None)
            err = self._failed.get(sid) if ids is None else None
            if ids is None and err is None:
                self._pending[(sid, step)] = fut
        if ids is not None:
            return ids
        if err is not None:  # the session failed while nobody was waiting
            raise err
        return self._wait(fut, sid, step, timeout)

    def step(
        self,
        sid: str,
        step: int,
        ids: torch.Tensor,
        positions: torch.Tensor,
        timeout: float,
        chunks: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> torch.Tensor:
        return self._wait(self.submit(sid, step, ids, positions, chunks), sid, step, timeout)

    def _wait(
        self, fut: concurrent.futures.Future[torch.Tensor], sid: str, step: int, timeout: float
    ) -> torch.Tensor:
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._pending.pop((sid, step), None)
            raise TimeoutError(
                f"no token for session {sid[:8]} step {step} within {timeout:.0f}s; a worker may have died "
                "(check the workers' logs)"
            ) from None

    def _fail(self, sid: str, step: int, exc: Exception) -> None:
        with self._lock:
            fut = self._pending.pop((sid, step), None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def fail_session(self, sid: str, exc: Exception) -> None:
        """Fail ``sid``'s waiting steps with ``exc``; a server-side loop session also remembers it,
        so that a later ``expect`` raises it instead of waiting for tokens that will never come."""
        with self._lock:
            if sid in self._ring_sessions:
                self._failed.setdefault(sid, exc)
            keys = [k for k in self._pending if k[0] == sid]
            futs = [self._pending.pop(k) for k in keys]
        for f in futs:
            if not f.done():
                f.set_exception(exc)

    def end_session(self, sid: str) -> None:
        """The session is closed: fail anything still waiting and forget its state."""
        exc = RuntimeError("session closed")
        with self._lock:
            self._ring_sessions.discard(sid)
            self._failed.pop(sid, None)
            for k in [k for k in self._arrived if k[0] == sid]:
                del self._arrived[k]
            keys = [k for k in self._pending if k[0] == sid]
            futs = [self._pending.pop(k) for k in keys]
        for f in futs:
            if not f.done():
                f.set_exception(exc)

    # the frame kinds a client takes, and their largest payloads
    _LIMITS: ClassVar[Mapping[int, int]] = {
        FrameKind.TOKENS: 1 << 20,
        FrameKind.ERROR: 64 << 10,
        FrameKind.PONG: 64 << 20,
        FrameKind.WARM: 0,
    }

    @staticmethod
    def _check_header(conn: FrameConnection, h: FrameHeader) -> bool:
        limit = ClientDataPlane._LIMITS.get(h.kind)
        if limit is None:
            raise ProtocolError(f"the client does not accept frames of kind {h.kind}")
        if h.kind == FrameKind.WARM and h.batch * h.seq:
            raise ProtocolError(f"a warm-up frame carries nothing, got {h.batch}x{h.seq} positions")
        if h.payload_len > limit:
            raise ProtocolError(f"frame of kind {h.kind} with {h.payload_len} bytes exceeds {limit}")
        return True

    def _closed(self, conn: FrameConnection) -> None:
        """The pipeline lost a data connection: pending steps will never be answered."""
        if conn is self._conn or conn in self._token_conns:
            self._token_conns.discard(conn)
            err = ConnectionError(f"a data connection of the pipeline closed ({conn.peer or conn.name})")
            with self._lock:
                futs = list(self._pending.values())
                self._pending.clear()
                for sid in self._ring_sessions:  # their next ``expect`` raises instead of waiting
                    self._failed.setdefault(sid, err)
            for f in futs:
                if not f.done():
                    f.set_exception(err)

    def _on_frame(self, conn: FrameConnection, frame: Frame) -> None:
        h = frame.header
        try:
            if h.kind == FrameKind.TOKENS:
                self._token_conns.add(conn)
                ids = decode_payload(h, frame.payload_view).clone()
                with self._lock:
                    fut = self._pending.pop((h.session, h.step), None)
                    if fut is None and h.session in self._ring_sessions:
                        self._arrived[(h.session, h.step)] = ids  # before its ``expect``
                if fut is not None and not fut.done():
                    fut.set_result(ids)
            elif h.kind == FrameKind.ERROR:
                msg = bytes(frame.payload_view).decode("utf-8", "replace")
                self.fail_session(h.session, RuntimeError(f"pipeline error: {msg}"))
            elif h.kind == FrameKind.WARM:  # a last stage's warm-up before its tokens (hop_warm.py): dropped
                pass
            elif h.kind == FrameKind.PONG:
                fut2 = self.pongs.pop(h.step, None)
                if fut2 is not None and not fut2.done():
                    fut2.set_result(time.perf_counter())
        finally:
            frame.body.release()

    def probe_first_stage(self, sizes: list[int], repeats: int = 3) -> tuple[float, float]:
        from hyperlane_lab.runtime.linkprobe import probe_connection

        async def _probe() -> tuple[float, float]:
            assert self._conn is not None
            return await probe_connection(self._conn, self.pongs, sizes, repeats)

        return self.run(_probe())  # type: ignore[no-any-return]
