"""Asyncio TCP transport for frames (see ``frame.py``), with TCP_NODELAY and pooled receive buffers.

``FrameConnection`` is a ``BufferedProtocol``: the kernel copies each frame's body straight into a
buffer taken from a per-process ``BufferPool`` (grow-only, reused), so steady-state decode never
allocates payload memory. A malformed frame closes only that connection, with a logged reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.frame import (
    HEADER,
    MAX_PAYLOAD,
    FrameHeader,
    FrameKind,
    pack_header,
    unpack_header,
)
from hyperlane_lab.runtime.stripe_conn import StripedConnection
from hyperlane_lab.runtime.stripes import StripeGroup, StripeRegistry

__all__ = [
    "BufferPool",
    "Frame",
    "FrameConnection",
    "PooledBuffer",
    "open_connection",
    "parse_address",
    "start_server",
]

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"bad address {address!r}; expected host:port, e.g. 192.168.1.20:50051")
    return host.strip("[]"), int(port)


class PooledBuffer:
    """A buffer on loan from a BufferPool (a bytearray, or a pinned host array); ``release()``
    returns it."""

    __slots__ = ("_pool", "buf", "size")

    def __init__(self, pool: BufferPool | None, buf: Any, size: int) -> None:
        self._pool, self.buf, self.size = pool, buf, size

    @property
    def view(self) -> memoryview:
        return memoryview(self.buf)[: self.size]  # bytearray and 1-D uint8 arrays are format 'B' alike

    def release(self) -> None:
        if self._pool is not None:
            self._pool._give_back(self.buf)
            self._pool = None


class BufferPool:
    """Free lists of receive buffers; a request takes the smallest free one that fits.

    With ``pinned_alloc`` set (GPU workers), tensor bodies (``acquire(..., pin=True)``) of
    ``pin_from`` bytes or more go into page-locked host memory from that function, sized up to a
    power of two, so a prompt's hidden state is copied to the GPU by DMA, without the driver's
    staging copy (a 4 MB pageable upload held the host ~1.4 ms on an H100 VM). At most
    ``pinned_keep`` bytes of free pinned buffers are kept. If pinning fails, the body gets a plain
    bytearray (logged once)."""

    def __init__(self, max_free: int = 32) -> None:
        self._free: list[Any] = []
        self._free_pinned: list[Any] = []
        self._max_free = max_free
        self.allocations = 0  # buffers created (tests check reuse)
        self.pinned_allocations = 0  # of which in pinned memory
        self.keep_max = 256 << 20  # larger buffers are freed after use, not pooled
        self.pinned_alloc: Callable[[int], Any] | None = None  # n -> a pinned, writable 1-D byte buffer
        self.pin_from = 16 << 10
        self.pinned_keep = 256 << 20  # free pinned bytes kept for reuse (page-locked memory is scarce)

    def acquire(self, size: int, pin: bool = False) -> PooledBuffer:
        """A buffer of at least ``size`` bytes; ``pin``: the body goes to a GPU (a tensor frame)."""
        pinned = pin and self.pinned_alloc is not None and size >= self.pin_from
        free = self._free_pinned if pinned else self._free
        best = None
        for i, b in enumerate(free):
            if len(b) >= size and (best is None or len(b) < len(free[best])):
                best = i
        if best is not None:
            return PooledBuffer(self, free.pop(best), size)
        self.allocations += 1
        if pinned:
            assert self.pinned_alloc is not None
            try:  # a power of two: what the pinned allocator takes anyway, and reusable by more sizes
                buf = self.pinned_alloc(1 << (size - 1).bit_length())
                self.pinned_allocations += 1
                return PooledBuffer(self, buf, size)
            except Exception as e:  # out of page-locked memory, no driver: pageable from now on
                log.warning("cannot pin a %d-byte receive buffer (%s); using pageable memory", size, e)
                self.pinned_alloc = None
        return PooledBuffer(self, bytearray(max(size, 4096)), size)

    def _give_back(self, buf: Any) -> None:
        if isinstance(buf, bytearray):
            if len(self._free) < self._max_free and len(buf) <= self.keep_max:
                self._free.append(buf)
        elif (
            len(self._free_pinned) < self._max_free
            and sum(map(len, self._free_pinned)) + len(buf) <= self.pinned_keep
        ):
            self._free_pinned.append(buf)


@dataclass
class Frame:
    header: FrameHeader
    body: PooledBuffer  # positions (B*S int64) then payload
    received_at: float  # perf_counter when the first header byte arrived
    completed_at: float

    @property
    def positions_view(self) -> memoryview:
        return self.body.view[: self.header.positions_len]

    @property
    def payload_view(self) -> memoryview:
        return self.body.view[self.header.positions_len :]


FrameHandler = Callable[["FrameConnection", Frame], None]
# Called with each header before any body memory is taken: return True to receive the body, False
# to read and discard it (e.g. a late frame of a closed session); raise ProtocolError to close.
HeaderCheck = Callable[["FrameConnection", FrameHeader], bool]
_SCRATCH = 1 << 16
# A body with at least this much still to come is drained from the socket in one callback (reads
# until the socket is empty) instead of one read per event-loop pass: a 4 MB prompt state arrived
# at 61-65% of a bare socket's rate read pass by pass (bench/socket_bulk.py, H100 host)
_DRAIN_FROM = 1 << 16
_DRAIN_BYTES = 16 << 20  # at most this much per callback: other connections' frames get their turn
READ_TIMEOUT_S = 60.0  # a frame that has begun must complete within this (a stalled peer is cut off)


class FrameConnection(StripedConnection, asyncio.BufferedProtocol):
    def __init__(
        self,
        on_frame: FrameHandler,
        pool: BufferPool,
        max_payload: int = MAX_PAYLOAD,
        on_close: Callable[[FrameConnection], None] | None = None,
        name: str = "",
        on_header: HeaderCheck | None = None,
        read_timeout: float = READ_TIMEOUT_S,
        stripes: StripeRegistry | None = None,
    ) -> None:
        self._on_frame, self._pool, self._max_payload, self._on_close = on_frame, pool, max_payload, on_close
        self._on_header = on_header
        self._read_timeout = read_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._skip = 0  # body bytes still to discard
        self._scratch = bytearray(_SCRATCH)
        self.name = name
        self.transport: asyncio.Transport | None = None
        self._hdr = bytearray(HEADER.size)
        self._hdr_got = 0
        self._header: FrameHeader | None = None
        self._body: PooledBuffer | None = None
        self._body_got = 0
        self._t_first = 0.0
        self._into_body = False  # what get_buffer handed out: the body buffer, or the scratch
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = asyncio.Event()
        self.peer = ""
        self.frames_in = 0
        self._fd = -1  # the socket's descriptor, for draining large bodies (-1: not a real socket)
        # striped frames (stripes.py): the registry of a worker's data server; this connection's group
        # when it is a sender's main connection; the frame being assembled (once its part here is in, the
        # connection waits, reading paused, for the others), bytes read past it meanwhile, a HELLO handing
        # the socket on
        self._stripes = stripes
        self._group: StripeGroup | None = None
        self._entry: Any = None
        self._stash = b""
        self._handoff: tuple[StripeGroup, int] | None = None
        self._part_end = 0  # body bytes this connection reads (the whole body unless striped)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(os, "readv"):
                self._fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        with contextlib.suppress(RuntimeError):  # driven by hand, outside an event loop
            self._loop = asyncio.get_running_loop()
        self._watch()

    def _mid_frame(self) -> bool:
        return self._hdr_got > 0 or self._header is not None or self._skip > 0  # (waiting: header set)

    def _watch(self) -> None:
        """Every read_timeout / 4: abort if a frame began more than read_timeout ago and is still
        incomplete (its pooled buffer would otherwise be held for ever). No cost per frame."""
        if self._read_timeout <= 0 or self.transport is None or self.transport.is_closing():
            return
        if self._mid_frame() and time.perf_counter() - self._t_first > self._read_timeout:
            self.abort(f"a frame stayed incomplete for over {self._read_timeout:g} s")
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand, outside an event loop: nothing to watch with
            return
        self._watchdog = loop.call_later(self._read_timeout / 4, self._watch)

    def get_buffer(self, sizehint: int) -> memoryview:
        # a body in progress is read straight into its pooled buffer; otherwise into the scratch
        # buffer, so a header and the small body behind it (a decode step's 8 KB) arrive in one
        # read instead of one event-loop pass each
        self._into_body = self._body is not None
        if self._body is not None:
            return self._body.view[self._body_got : self._part_end]
        if self._skip:
            return memoryview(self._scratch)[: min(self._skip, _SCRATCH)]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_body:
            assert self._header is not None
            self._body_got += nbytes
            if self._fd >= 0 and self._part_end - self._body_got >= _DRAIN_FROM:
                self._drain()
            if self._body is not None and self._body_got >= self._part_end:
                self._body_done()
            return
        self._consume(memoryview(self._scratch)[:nbytes])

    def _drain(self) -> None:
        """Read what the socket already holds of the body in progress, without returning to the
        loop between reads (non-blocking descriptor: stops at the first empty read). End of stream
        is left for the transport's own next read to report; a read error closes the connection."""
        assert self._body is not None and self._header is not None
        view = self._body.view
        want = min(self._part_end, self._body_got + _DRAIN_BYTES)
        while self._body_got < want:  # every pass reads >= 1 byte or returns
            try:
                n = os.readv(self._fd, [view[self._body_got : want]])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # reset: report it (the transport's next read would see EOF)
                self.abort(f"read failed: {e}")
                return
            if n <= 0:
                return
            self._body_got += n

    def _consume(self, data: memoryview) -> None:
        """Parse bytes read into the scratch buffer: skipped bodies, header bytes, body bytes (copied
        into the frame's pooled buffer), possibly several frames. Stops if the connection closed."""
        while data:  # every pass consumes at least one byte
            if self._skip:
                k = min(self._skip, len(data))
                self._skip -= k
                data = data[k:]
            elif self._body is not None:
                k = min(self._part_end - self._body_got, len(data))
                self._body.view[self._body_got : self._body_got + k] = data[:k]
                self._body_got += k
                data = data[k:]
                if self._body_got >= self._part_end and not self._body_done():
                    if self._entry is not None:  # its other parts are still coming: keep what follows
                        self._stash = bytes(data)
                    return
            else:
                if self._hdr_got == 0:
                    self._t_first = time.perf_counter()
                k = min(HEADER.size - self._hdr_got, len(data))
                self._hdr[self._hdr_got : self._hdr_got + k] = data[:k]
                self._hdr_got += k
                data = data[k:]
                if self._hdr_got == HEADER.size and not self._begin_frame():
                    if self._handoff is not None:
                        self._hand_off(bytes(data))
                    return

    def _begin_frame(self) -> bool:
        """A whole header is in: vet it, then take a body buffer (or skip the body). False if the
        connection was closed."""
        try:
            header = unpack_header(self._hdr, self._max_payload)
            if header.kind in (FrameKind.HELLO, FrameKind.STRIPE):
                return self._stripe_hello(header)
            accept = self._on_header(self, header) if self._on_header is not None else True
            if header.stripes and self._group is None:
                raise ProtocolError(
                    "a striped frame on a connection that did not say hello as a main connection"
                )
        except ProtocolError as e:
            self.abort(str(e))
            return False
        self._hdr_got = 0
        if not accept:
            if header.stripes:  # its parts still come on the stripe connections: read past them there too
                refused = self._expect_parts(header, None)
                if refused is None:
                    return False
                self._skip = refused.bounds[0][1]
            else:
                self._skip = header.body_len
            return True
        pin = header.kind == FrameKind.TENSOR  # only tensors go to a GPU
        self._header, self._body, self._body_got = header, self._pool.acquire(header.body_len, pin), 0
        self._part_end = header.body_len
        if header.stripes:  # parts 1.. come on the group's stripe connections, straight into this body
            entry = self._expect_parts(header, self._body)
            if entry is None:
                self._header, self._body = None, None
                return False
            self._entry, self._part_end = entry, entry.bounds[0][1]
        return header.body_len > 0 or self._emit()

    def _emit(self) -> bool:
        """Hand a complete frame to the handler; False if the connection was closed."""
        assert self._header is not None and self._body is not None
        frame = Frame(self._header, self._body, self._t_first, time.perf_counter())
        self._header, self._body = None, None
        self.frames_in += 1
        try:
            self._on_frame(self, frame)
        except ProtocolError as e:
            frame.body.release()
            self.abort(str(e))
        except Exception as e:  # a handler bug must not kill the event loop
            frame.body.release()
            log.exception("frame handler failed on %s", self.peer)
            self.abort(f"internal error: {e}")
        return self.transport is None or not self.transport.is_closing()

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._entry is not None and self._group is not None:  # readers may still write into its body
            self._group.abandon(self._entry)
            self._entry, self._body = None, None
        if self._body is not None:
            self._body.release()
            self._body = None
        if self._group is not None:
            self._group.close(f"its main connection from {self.peer} closed")
        self._can_write.set()
        self.closed.set()
        if self._on_close:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -------------------------------------------------------------- API

    def abort(self, reason: str) -> None:
        log.warning("data plane: closing connection from %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, header: FrameHeader, *parts: bytes | bytearray | memoryview) -> int:
        """Queue one frame (header, then positions and payload parts); returns bytes queued."""
        if not self.is_open:
            raise ConnectionError(f"data connection to {self.peer or self.name} is closed")
        assert self.transport is not None
        hdr = pack_header(header)
        self.transport.writelines([hdr, *parts])
        return len(hdr) + sum(len(p) for p in parts)

    async def drain(self) -> None:
        await self._can_write.wait()


async def start_server(
    host: str, port: int, on_frame: FrameHandler, pool: BufferPool, **kw: object
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FrameConnection(on_frame, pool, **kw), host, port)  # type: ignore[arg-type]


async def open_connection(
    address: str, on_frame: FrameHandler, pool: BufferPool, timeout: float = 10.0, **kw: Any
) -> FrameConnection:
    """Connect to a data port; ``kw`` go to FrameConnection (max_payload, on_close, on_header)."""
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: FrameConnection(on_frame, pool, name=address, **kw), host, port),
            timeout,
        )
    except (OSError, asyncio.TimeoutError) as e:
        raise ConnectionError(f"cannot open a data connection to {address}: {e}") from e
    return proto
