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

Receiving stays on asyncio (``dataplane.py``); nothing is ever read from this socket.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
from typing import Any

from hyperlane_lab.runtime.dataplane import parse_address
from hyperlane_lab.runtime.frame import FrameHeader, pack_header

__all__ = ["SocketSender"]

log = logging.getLogger(__name__)


class SocketSender:
    def __init__(self, address: str, connect_timeout: float = 10.0, send_timeout: float = 60.0) -> None:
        """Connect to a data port (``host:port``); raises ConnectionError naming the address."""
        self.address = address
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise ConnectionError(f"cannot open a data connection to {address}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # blocking: one system call per send (see the module's docstring)
        if not 0 < send_timeout <= 1e6:
            raise ValueError(f"send_timeout must be > 0 and at most 1e6 s, got {send_timeout}")
        sec = max(send_timeout, 1e-3)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(sec), int(sec % 1 * 1e6))
        )
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self.send_timeout = send_timeout
        self.frames_out = 0

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
        bufs = [memoryview(pack_header(header))]
        bufs += [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(b.nbytes for b in bufs)
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ConnectionError(f"data connection to {self.address} is closed")
            try:
                while bufs:
                    sent = sock.sendmsg(bufs)
                    while bufs and sent >= bufs[0].nbytes:  # drop what went out, keep the rest
                        sent -= bufs[0].nbytes
                        bufs.pop(0)
                    if bufs and sent:
                        bufs[0] = bufs[0][sent:]
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
        return total

    def close(self) -> None:
        """Close without waiting for a send in progress (that send fails and finishes the close)."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(blocking=False):
            try:
                self._close_locked()
            finally:
                self._lock.release()

    def _close_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
