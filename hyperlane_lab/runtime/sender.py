"""A thread-safe, blocking frame sender on a plain TCP socket (TCP_NODELAY).

Why not the asyncio transport: a step's result is ready on a worker's completion thread (or a
user's thread on the client), and handing it to the event loop to write costs a thread wake-up
(``call_soon_threadsafe``) per frame, tens to hundreds of microseconds on a busy host, on every
hop of every token. Here the thread that has the frame writes it with one ``sendmsg`` (the GIL
is released in the system call). A lock keeps frames whole when several threads send. A send that
cannot complete within ``send_timeout`` (the peer stopped reading) closes the socket, so no thread
hangs for ever; the sender then reports itself closed.

The socket stays in blocking mode with the kernel's ``SO_SNDTIMEO`` as the limit. A Python socket
with ``settimeout`` polls before every ``sendmsg`` (a second system call, and a second release and
re-acquisition of the GIL, per frame on the critical path of every hop).

Receiving stays on asyncio (``dataplane.py``); nothing is ever read from this socket. With
``stripes`` > 1 a large tensor frame's body is split over that many connections, each written by its
own thread (``stripes.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import queue
import select
import socket
import threading
from typing import Any

import torch

from hyperlane_lab.runtime.dataplane import parse_address
from hyperlane_lab.runtime.frame import HEADER, MAX_STRIPES, FrameHeader, FrameKind, pack_header
from hyperlane_lab.runtime.stripes import (
    MIN_PART,
    STRIPE_FROM,
    hello_header,
    kernel_timeout,
    new_token,
    stripe_bounds,
    stripe_header,
    stripes_for,
)

__all__ = ["SocketSender"]

log = logging.getLogger(__name__)


def _connect(address: str, connect_timeout: float, send_timeout: float) -> socket.socket:
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as e:
        raise ConnectionError(f"cannot open a data connection to {address}: {e}") from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # blocking: one system call per send (see the module's docstring)
    kernel_timeout(sock, socket.SO_SNDTIMEO, send_timeout)
    return sock


@functools.cache
def _warm_header() -> bytes:
    """The WARM frame's bytes (made once)."""
    return pack_header(FrameHeader(FrameKind.WARM, "0" * 32, 0, 0, 0, torch.uint8, 0, 0, (), 0))


def _send_all(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Write every buffer whole (``sendmsg`` may take part of them)."""
    while bufs:
        sent = sock.sendmsg(bufs)
        while bufs and sent >= bufs[0].nbytes:  # drop what went out, keep the rest
            sent -= bufs[0].nbytes
            bufs.pop(0)
        if bufs and sent:
            bufs[0] = bufs[0][sent:]


def _cut(bufs: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Bytes ``[start, end)`` of the concatenation of ``bufs``, as views."""
    out, pos = [], 0
    for b in bufs:
        lo, hi = max(start - pos, 0), min(end - pos, b.nbytes)
        if lo < hi:
            out.append(b[lo:hi])
        pos += b.nbytes
        if pos >= end:
            break
    return out


class _StripeWriter:
    """One stripe connection's sending thread: writes the parts it is given, one frame at a time."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock, self.index = sock, index
        self._jobs: queue.SimpleQueue[list[memoryview] | None] = queue.SimpleQueue()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"hyperlane-stripe-send-{index}", daemon=True)
        self.thread.start()

    def submit(self, bufs: list[memoryview]) -> None:
        self.error = None
        self.done.clear()
        self._jobs.put(bufs)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            bufs = self._jobs.get()
            if bufs is None:
                return
            try:
                _send_all(self.sock, bufs)
            except BaseException as e:  # reported by the frame's send
                self.error = e
            finally:
                self.done.set()


class SocketSender:
    def __init__(
        self,
        address: str,
        connect_timeout: float = 10.0,
        send_timeout: float = 60.0,
        stripes: int = 1,
        stripe_from: int = STRIPE_FROM,
    ) -> None:
        """Connect to a data port (``host:port``); raises ConnectionError naming the address. With
        ``stripes`` = n > 1, n - 1 more connections carry parts of frames of ``stripe_from`` bytes or more
        (``stripes.py``): the peer must be a worker's data port."""
        self.address = address
        if not 0 < send_timeout <= 1e6:
            raise ValueError(f"send_timeout must be > 0 and at most 1e6 s, got {send_timeout}")
        if not 1 <= stripes <= MAX_STRIPES:
            raise ValueError(f"stripes must be 1 (off) to {MAX_STRIPES}, got {stripes}")
        if stripe_from < MIN_PART:
            raise ValueError(f"stripe_from must be at least {MIN_PART} bytes, got {stripe_from}")
        sock = _connect(address, connect_timeout, send_timeout)
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self.send_timeout = send_timeout
        self.frames_out = 0
        self.warm_out = 0  # WARM frames (``warm``), not counted in frames_out
        self.striped_out = 0
        self.stripes, self.stripe_from = stripes, stripe_from
        self._writers: list[_StripeWriter] = []
        if stripes > 1:
            token = new_token()
            try:
                _send_all(sock, [memoryview(pack_header(hello_header(token, 0, stripes)))])
                for j in range(1, stripes):
                    s = _connect(address, connect_timeout, send_timeout)
                    _send_all(s, [memoryview(pack_header(hello_header(token, j, stripes)))])
                    self._writers.append(_StripeWriter(s, j))
            except (OSError, ConnectionError) as e:
                self.close()
                raise ConnectionError(f"cannot open the stripe connections to {address}: {e}") from e

    def warm(self) -> bool:
        """Write a WARM frame (a header, nothing else; the peer drops it): a hop's warm-up shortly before a step's
        frame (``hop_warm.py``). Never waits: False when another thread holds the connection, when the socket
        cannot take the header at once (the peer is behind: no warm-up is needed then), or when it is closed or
        breaks (then it is closed here, with the reason logged, and the step's own send reports it)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            sock = self._sock
            if sock is None:
                return False
            head = memoryview(_warm_header())
            try:
                sent = sock.send(head, socket.MSG_DONTWAIT)
            except BlockingIOError:  # nothing taken: the stream is as it was
                return False
            except OSError as e:
                return self._warm_failed(e)
            # a nearly full buffer may take part of it: the rest must follow, or the stream is cut
            if sent < head.nbytes:
                try:
                    _send_all(sock, [head[sent:]])
                except OSError as e:  # (a timeout included: half a header is in the stream)
                    return self._warm_failed(e)
            self.warm_out += 1
            return True
        finally:
            self._lock.release()

    def _warm_failed(self, e: OSError) -> bool:
        """(Lock held.) A warm-up's send failed: close, say why (the step's own send then reports a closed
        connection)."""
        log.warning("data connection to %s closed during a warm-up: %s", self.address, e)
        self._close_locked()
        return False

    @property
    def is_open(self) -> bool:
        """False once closed here or by the peer (nothing is ever read from this socket, so a
        peek tells: end-of-stream or an error means the other side is gone)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            poller = select.poll()  # first: recv on this blocking socket would wait
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            if not poller.poll(0):
                return True  # open, nothing to read
            return sock.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):  # reset, or closed meanwhile
            return False

    def send(self, header: FrameHeader, *parts: Any) -> int:
        """Write one frame (header, then each bytes-like part) whole; returns the bytes written.

        Blocks until the kernel has taken every byte (natural flow control). Raises ConnectionError
        if the connection is closed or breaks (and closes it)."""
        body = [memoryview(p).cast("B") for p in parts if len(p)]
        body_len = sum(b.nbytes for b in body)
        striped = self.stripes > 1 and header.kind == FrameKind.TENSOR
        k = stripes_for(body_len, self.stripes, self.stripe_from) if striped else 0
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ConnectionError(f"data connection to {self.address} is closed")
            try:
                if header.stripes != k:  # (a header passed on from a striped frame says its own split)
                    header = dataclasses.replace(header, stripes=k)
                if k:
                    self._send_striped(sock, header, body, body_len, k)
                else:
                    _send_all(sock, [memoryview(pack_header(header)), *body])
            except BlockingIOError as e:  # EAGAIN after SO_SNDTIMEO: the peer stopped reading
                self._close_locked()
                raise ConnectionError(
                    f"data connection to {self.address} closed: the peer took no data for "
                    f"{self.send_timeout:g} s (it stopped reading)"
                ) from e
            except OSError as e:
                self._close_locked()
                raise ConnectionError(f"data connection to {self.address} broke: {e}") from e
            self.frames_out += 1
        return HEADER.size + body_len

    def _send_striped(
        self, sock: socket.socket, header: FrameHeader, body: list[memoryview], body_len: int, k: int
    ) -> None:
        """(Lock held.) Parts 1..k-1 to the stripe threads, part 0 here, then wait for all of them."""
        bounds = stripe_bounds(body_len, k)
        for j in range(1, k):
            s, e = bounds[j]
            hdr = memoryview(pack_header(stripe_header(header, j, k, e - s)))
            self._writers[j - 1].submit([hdr, *_cut(body, s, e)])
        _send_all(sock, [memoryview(pack_header(header)), *_cut(body, *bounds[0])])
        for w in self._writers[: k - 1]:
            if not w.done.wait(self.send_timeout):
                raise BlockingIOError(f"stripe {w.index} took no data for {self.send_timeout:g} s")
            if w.error is not None:
                raise OSError(f"stripe {w.index}: {w.error}")
        self.striped_out += 1

    def close(self) -> None:
        """Close. A send in progress fails at once (every socket, the stripe connections' too, is shut down
        first, so no thread stays blocked in ``sendmsg``) and finishes the close itself; should it have
        completed anyway, the close is finished here once it lets go of the lock."""
        sock = self._sock
        if sock is None:
            return
        for s in [sock, *(w.sock for w in self._writers)]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(timeout=2.0):
            try:
                self._close_locked()
            finally:
                self._lock.release()

    def _close_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        for w in self._writers:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)  # a writer blocked in sendmsg returns
            with contextlib.suppress(OSError):
                w.sock.close()
            w.stop()
        self._writers = []
