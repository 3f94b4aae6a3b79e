"""Striped frames: one large TENSOR frame's body sent over n TCP connections at once.

Why: one TCP stream moves a prompt's hidden state (2-4 MB) at the speed of one thread's copies on each
side; on loopback and fast links that is the hand-off's cost (``bench/socket_bulk.py``: 4 MB in 0.70 ms
on one connection of an H200 host, 0.35 ms over three, with a sending and a receiving thread each).
Opt-in: ``hyperlane worker --stripes N`` (or ``HYPERLANE_STRIPES``).

Protocol (``frame.py`` has the header):

- A sender with n stripes opens its main connection and n - 1 more to the same data port and sends a
  HELLO on each: the session field is a random group token, ``step`` the connection's index (0 = main),
  ``stripes`` = n. The receiver binds them into a group; a stripe connection is then read by its own
  thread (``StripeReader``), outside the event loop.
- A TENSOR frame whose body has at least ``stripe_from`` bytes (and at least ``MIN_PART`` per part) goes
  out with ``stripes`` = k (2 <= k <= n) in its header: the body is cut by ``stripe_bounds(body_len, k)``;
  part 0 follows the header on the main connection, part j travels on stripe connection j as a STRIPE
  frame (the TENSOR frame's session and step, shape ``(j,)``, the part's bytes as its payload).
- Each stripe connection carries parts in the order of the frames on the main connection, so a part
  belongs to the oldest frame still waiting for that index. The receiver writes every part straight
  into the frame's one body buffer and hands the frame on when all k parts are in; the main connection
  reads nothing more until then (frames stay in order).
- Anything else (a part of the wrong length or session, a STRIPE frame on a main connection, a group
  index or size out of range, a peer that stops mid-part for ``READ_TIMEOUT_S``) closes the group's
  connections, with the reason logged. Nothing is unpickled; lengths are checked before any write.
- A frame refused by the receiver's header check (a closed session's late frame) takes no buffer: its
  parts are read past. A stripe connection closed between frames only retires its index; a group whose
  main connection never joins ends after ``READ_TIMEOUT_S``. A main connection paused for a frame's parts
  learns of its peer's close from its readers (their end of stream) or, at the latest, its read timeout.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.frame import HEADER, MAX_STRIPES, FrameHeader, FrameKind, unpack_header

if TYPE_CHECKING:
    from hyperlane_lab.runtime.dataplane import PooledBuffer

__all__ = [
    "MIN_PART",
    "STRIPE_FROM",
    "StripeGroup",
    "StripeRegistry",
    "hello_header",
    "kernel_timeout",
    "new_token",
    "stripe_bounds",
    "stripe_header",
    "stripes_for",
]

log = logging.getLogger(__name__)

MIN_PART = 4096  # bytes: a frame is cut in at most body_len // MIN_PART parts
# default: striped senders split tensor frames of at least 4 MB (2 MB ran slower striped)
STRIPE_FROM = 4 << 20
MAX_READERS = 64  # stripe connections (threads) one worker serves at a time


def stripe_bounds(body_len: int, k: int) -> list[tuple[int, int]]:
    """The k parts ``[start, end)`` of a body: equal sizes rounded up to 64 bytes, the last one shorter."""
    q = -(-body_len // k)
    q = -(-q // 64) * 64
    return [(min(i * q, body_len), min((i + 1) * q, body_len)) for i in range(k)]


def stripes_for(body_len: int, n: int, stripe_from: int) -> int:
    """How many parts a sender with n connections cuts a body into: 0 (not striped) below ``stripe_from``."""
    if n < 2 or body_len < stripe_from:
        return 0
    k = min(n, body_len // MIN_PART)
    return k if k >= 2 else 0


def kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Limit a blocking socket's sends or receives (``SO_SNDTIMEO`` / ``SO_RCVTIMEO``) in the kernel: a Python
    socket with ``settimeout`` polls before every call instead (a second system call and GIL round trip)."""
    sec = max(seconds, 1e-3)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(sec), int(sec % 1 * 1e6)))


def new_token() -> str:
    return secrets.token_hex(16)


def hello_header(token: str, index: int, n: int) -> FrameHeader:
    return FrameHeader(FrameKind.HELLO, token, index, 0, 0, torch.uint8, 0, 0, (), 0, 0, n)


def stripe_header(h: FrameHeader, index: int, k: int, nbytes: int) -> FrameHeader:
    return FrameHeader(FrameKind.STRIPE, h.session, h.step, 0, 0, torch.uint8, 0, 0, (index,), nbytes, 0, k)


class _Entry:
    """A striped frame being assembled: its body buffer, the parts not yet taken by a reader, writers busy."""

    __slots__ = ("abandoned", "body", "bounds", "header", "left", "main_done", "on_ready", "writers")

    def __init__(
        self, header: FrameHeader, body: PooledBuffer | None, on_ready: Callable[[_Entry], None]
    ) -> None:
        """``body`` None: a frame the header check refused; its parts are read and dropped, so the stripe
        connections stay in step, but no memory of its declared size is taken."""
        self.header, self.body, self.on_ready = header, body, on_ready
        self.bounds = stripe_bounds(header.body_len, header.stripes)
        self.left = set(range(1, header.stripes))
        self.writers = 0
        self.main_done = False
        self.abandoned = False


def _free_if_unwritten(entry: _Entry) -> None:
    """(Group's cond held.) An abandoned frame's body goes back to its pool once no reader writes into it."""
    if entry.writers == 0 and entry.body is not None:
        entry.body.release()


class StripeGroup:
    """One sender's connections: the main one (read on the event loop) and its stripe readers (threads).
    Everything shared is guarded by ``cond``."""

    def __init__(self, registry: StripeRegistry, token: str, n: int) -> None:
        self.registry, self.token, self.n = registry, token, n
        self.cond = threading.Condition()
        self.pending: deque[_Entry] = deque()
        self.readers: dict[int, StripeReader] = {}
        self.retired: set[int] = set()  # stripe connections the sender closed between frames
        self.has_main = False
        # closes the main connection from any thread: (reason, quietly: the server is closing)
        self.main_abort: Callable[[str, bool], None] | None = None
        self.broken = ""

    # ------------------------------------------------------------- main connection (event loop)

    def expect(self, entry: _Entry) -> None:
        """A striped frame's header came on the main connection: its parts may now be written."""
        if entry.header.stripes > self.n:
            raise ProtocolError(
                f"a frame split in {entry.header.stripes} parts on a group of {self.n} connections"
            )
        if any(e <= s for s, e in entry.bounds):
            raise ProtocolError(f"a striped frame of {entry.header.body_len} bytes leaves a part empty")
        with self.cond:
            if self.broken:
                raise ProtocolError(f"its stripe connections failed: {self.broken}")
            gone = sorted(entry.left & self.retired)
            if gone:
                raise ProtocolError(
                    f"a striped frame needs stripe connection {gone[0]}, which its sender closed"
                )
            self.pending.append(entry)
            self.cond.notify_all()

    def main_part_done(self, entry: _Entry) -> bool:
        """The main connection has part 0: True if every part is in (hand the frame on now); else a
        reader's ``on_ready`` does it later."""
        with self.cond:
            entry.main_done = True
            return self._ready(entry)

    def _ready(self, entry: _Entry) -> bool:  # (cond held)
        if entry.left or entry.writers or not entry.main_done:
            return False
        with contextlib.suppress(ValueError):
            self.pending.remove(entry)
        return True

    def abandon(self, entry: _Entry) -> None:
        """The main connection is gone mid-frame: release the body once no reader writes into it."""
        with self.cond:
            entry.abandoned = True
            with contextlib.suppress(ValueError):
                self.pending.remove(entry)
            _free_if_unwritten(entry)

    def retire(self, index: int) -> None:
        """(A reader's thread.) The sender closed stripe connection ``index`` between frames (it is closing,
        or re-wiring): the main connection's frames still arrive; only a frame that needs the index fails."""
        with self.cond:
            self.readers.pop(index, None)
            self.retired.add(index)
            needed = any(index in e.left for e in self.pending)
        if needed:
            self.close(f"stripe connection {index} closed with a part still to come")

    def close(self, reason: str, quiet: bool = False) -> None:
        """Mark the group failed and shut its stripe connections (their threads end) and its main one
        (``quiet``: the server is closing, nothing to warn about)."""
        with self.cond:
            if not self.broken:
                self.broken = reason
            readers = list(self.readers.values())
            self.cond.notify_all()
        for r in readers:
            r.shutdown()
        if self.main_abort is not None:
            self.main_abort(f"its stripe connections failed: {reason}", quiet)
        self.registry._forget(self)

    # ------------------------------------------------------------- stripe readers (their threads)

    def take(self, index: int, h: FrameHeader, timeout: float) -> tuple[_Entry, int, int]:
        """The oldest frame still waiting for part ``index``, checked against its STRIPE header; the
        caller then writes ``body[start:end]`` and calls ``put``."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.broken or any(index in e.left for e in self.pending), timeout=timeout
            )
            if self.broken:
                raise ConnectionError(self.broken)
            if not ok:
                raise ProtocolError(f"part {index} came but no frame on the main connection waited for it")
            entry = next(e for e in self.pending if index in e.left)
            eh = entry.header
            start, end = entry.bounds[index]
            same = (h.session, h.step, h.stripes) == (eh.session, eh.step, eh.stripes)
            if not same or h.payload_len != end - start:
                raise ProtocolError(
                    f"part {index} ({h.payload_len} bytes, step {h.step}, {h.stripes} parts) does not match the "
                    f"frame it belongs to ({end - start} bytes, step {eh.step}, {eh.stripes} parts)"
                )
            entry.left.discard(index)
            entry.writers += 1
            return entry, start, end

    def wait_for_main(self, timeout: float) -> bool:
        """(A reader's thread, first.) False if no main connection joined the group within ``timeout``."""
        with self.cond:
            return (
                bool(self.cond.wait_for(lambda: self.has_main or self.broken, timeout=timeout))
                and not self.broken
            )

    def put(self, entry: _Entry, ok: bool) -> None:
        """A reader finished writing its part (``ok``) or failed mid-part."""
        with self.cond:
            entry.writers -= 1
            if entry.abandoned:
                _free_if_unwritten(entry)
                return
            ready = ok and self._ready(entry)
        if ready:
            entry.on_ready(entry)


class StripeReader:
    """Reads one stripe connection in its own thread: STRIPE frames, each part straight into its frame's body."""

    def __init__(self, group: StripeGroup, index: int, sock: socket.socket, leftover: bytes,
                 read_timeout: float, max_payload: int) -> None:  # fmt: skip
        self.group, self.index, self.sock = group, index, sock
        sock.settimeout(None)  # blocking, the kernel's limit instead (kernel_timeout)
        if read_timeout > 0:  # (<= 0: no limit, as on the data server's connections)
            kernel_timeout(sock, socket.SO_RCVTIMEO, read_timeout)
        self._left = memoryview(bytes(leftover))
        self.read_timeout, self.max_payload = read_timeout, max_payload
        self.parts = 0
        self.thread = threading.Thread(target=self._run, name=f"hyperlane-stripe-{index}", daemon=True)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _read_into(self, view: memoryview, limited: bool) -> bool:
        """Fill ``view`` (leftover bytes first); False at end of stream before any byte. ``limited``: within
        the read timeout (a part, or a header begun); otherwise the wait for a first byte has no limit."""
        got = 0
        if self._left.nbytes:
            k = min(self._left.nbytes, view.nbytes)
            view[:k] = self._left[:k]
            self._left, got = self._left[k:], k
        while got < view.nbytes:
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:  # EAGAIN after SO_RCVTIMEO: nothing came for the read timeout
                if not limited and got == 0:
                    continue  # idle between frames
                raise TimeoutError(f"no data for {self.read_timeout:g} s mid-frame") from None
            if n == 0:
                if got == 0:
                    return False
                raise ConnectionError(f"stripe connection {self.index} closed mid-frame")
            got += n
        return True

    def _drain(self, nbytes: int) -> bool:
        """Read and drop ``nbytes`` (a refused frame's part), 64 KB at a time."""
        scratch = memoryview(bytearray(min(nbytes, 1 << 16)))
        while nbytes:
            k = min(nbytes, scratch.nbytes)
            if not self._read_into(scratch[:k], True):
                return False
            nbytes -= k
        return True

    def _run(self) -> None:
        g, reason, clean = self.group, "", False
        hdr = bytearray(HEADER.size)
        try:
            if not g.wait_for_main(self.read_timeout):  # a group nobody sends on must not hold a thread
                raise ProtocolError(f"no main connection joined its group within {self.read_timeout:g} s")
            while True:
                if not self._read_into(memoryview(hdr), False):  # idle between frames: no limit
                    clean = True  # the sender closed between frames
                    return
                h = unpack_header(hdr, self.max_payload)
                if h.kind != FrameKind.STRIPE or h.shape != (self.index,):
                    raise ProtocolError(
                        f"stripe connection {self.index} got a frame of kind {h.kind}, shape {h.shape}"
                    )
                entry, start, end = g.take(self.index, h, self.read_timeout)
                ok = False
                try:
                    if entry.body is None:  # refused by the header check: read past it
                        ok = self._drain(end - start)
                    else:
                        ok = self._read_into(entry.body.view[start:end], True)
                    if not ok:
                        raise ConnectionError(f"stripe connection {self.index} closed mid-frame")
                    self.parts += 1
                finally:
                    g.put(entry, ok)
        except (ProtocolError, ConnectionError, OSError) as e:  # TimeoutError is an OSError
            reason = f"stripe connection {self.index}: {e}"
        except Exception as e:  # a bug must not leave the group waiting
            log.exception("stripe reader %d failed", self.index)
            reason = f"stripe connection {self.index}: internal error: {e}"
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            if clean:
                g.retire(self.index)
            else:
                if not g.broken:
                    log.warning("data plane: %s; closing its group", reason)
                g.close(reason)
            g.registry._reader_done(self)


class StripeRegistry:
    """A data server's stripe groups by token (one per sender), with bounds on groups and reader threads
    (``MAX_READERS`` each; a group whose main connection does not join within ``read_timeout`` ends)."""

    def __init__(self, read_timeout: float, max_payload: int) -> None:
        self.read_timeout, self.max_payload = read_timeout, max_payload
        self._lock = threading.Lock()
        self._groups: dict[str, StripeGroup] = {}
        self._readers: set[StripeReader] = set()
        self.frames = 0  # striped frames received whole

    def group(self, token: str, n: int, index: int) -> StripeGroup:
        """The group a HELLO joins (made by whichever of its connections comes first)."""
        if not 2 <= n <= MAX_STRIPES or not 0 <= index < n:
            raise ProtocolError(f"a hello for connection {index} of {n} (2 to {MAX_STRIPES} connections)")
        with self._lock:
            g = self._groups.get(token)
            if g is None:
                if len(self._groups) >= MAX_READERS:
                    raise ProtocolError(f"too many stripe groups (at most {MAX_READERS})")
                g = self._groups[token] = StripeGroup(self, token, n)
            if g.n != n:
                raise ProtocolError(f"a hello for a group of {n} connections; the group has {g.n}")
            if index == 0 and g.has_main:
                raise ProtocolError(f"connection {index} of stripe group {token[:8]} joined twice")
            if index == 0:
                with g.cond:
                    g.has_main = True
                    g.cond.notify_all()  # readers waiting for a main connection
            return g

    def start_reader(self, g: StripeGroup, index: int, sock: socket.socket, leftover: bytes) -> StripeReader:
        r = StripeReader(g, index, sock, leftover, self.read_timeout, self.max_payload)
        with self._lock:  # (then the group's cond: the one order these two locks are ever nested in)
            if len(self._readers) >= MAX_READERS:
                raise ProtocolError(f"too many stripe connections (at most {MAX_READERS})")
            with g.cond:
                if g.broken:
                    raise ProtocolError(f"its stripe group already failed: {g.broken}")
                if index in g.readers or index in g.retired:
                    raise ProtocolError(f"connection {index} of stripe group {g.token[:8]} joined twice")
                g.readers[index] = r
            self._readers.add(r)
        try:
            r.thread.start()
        except RuntimeError as e:  # no thread to be had: refuse this connection only
            with self._lock:
                self._readers.discard(r)
            with g.cond:
                g.readers.pop(index, None)
            raise ProtocolError(f"cannot start a stripe reader: {e}") from e
        return r

    def close(self) -> None:
        with self._lock:
            groups = list(self._groups.values())
        for g in groups:
            g.close("the server closed", quiet=True)

    def _forget(self, g: StripeGroup) -> None:
        with self._lock:
            if self._groups.get(g.token) is g:
                del self._groups[g.token]

    def _reader_done(self, r: StripeReader) -> None:
        with self._lock:
            self._readers.discard(r)

    @property
    def reader_count(self) -> int:
        with self._lock:
            return len(self._readers)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"groups": len(self._groups), "readers": len(self._readers), "frames": self.frames}
