"""The event-loop side of striped frames (``stripes.py``), mixed into ``FrameConnection``: a HELLO that
binds a connection into a stripe group (the main connection stays on the loop; a stripe connection's
socket goes to a reader thread), and a striped frame whose own part is in but whose other parts are
still coming (reading pauses, so frames stay in order, until the last reader says it is done)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
from hyperlane_lab.runtime.stripes import _Entry

if TYPE_CHECKING:
    from hyperlane_lab.runtime.dataplane import PooledBuffer
    from hyperlane_lab.runtime.stripes import StripeGroup, StripeRegistry

__all__ = ["StripedConnection"]

log = logging.getLogger("hyperlane_lab.runtime.dataplane")


def _ignore(entry: _Entry) -> None:  # a refused frame's parts are in: nothing to hand on
    pass


class StripedConnection:
    """Mixed into ``FrameConnection`` (which sets these attributes and calls these methods)."""

    transport: asyncio.Transport | None
    peer: str
    frames_in: int
    _hdr_got: int
    _stripes: StripeRegistry | None
    _group: StripeGroup | None
    _entry: Any
    _stash: bytes
    _handoff: tuple[StripeGroup, int] | None
    _loop: asyncio.AbstractEventLoop | None

    def _emit(self) -> bool:  # FrameConnection's
        raise NotImplementedError

    def _consume(self, data: memoryview) -> None:  # FrameConnection's
        raise NotImplementedError

    def abort(self, reason: str) -> None:  # FrameConnection's
        raise NotImplementedError

    @property
    def is_open(self) -> bool:  # FrameConnection's
        raise NotImplementedError

    def _stripe_hello(self, h: FrameHeader) -> bool:
        """A HELLO binds this connection into a stripe group: index 0 stays here as the main connection,
        any other index hands the socket to a reader thread (False: stop reading here). A STRIPE frame
        never belongs on an event-loop connection."""
        if self._stripes is None:
            raise ProtocolError("this peer takes no stripe connections")
        if h.kind == FrameKind.STRIPE or h.body_len or self._group is not None or self.frames_in:
            raise ProtocolError("stripe frames come after a hello on their own connections, hellos first")
        g = self._stripes.group(h.session, h.stripes, h.step)
        self._hdr_got = 0
        if h.step == 0:
            self._group = g
            g.main_abort = self._abort_from_thread
            return True
        self._handoff = (g, h.step)
        return False

    def _hand_off(self, leftover: bytes) -> None:
        """Give this socket (and the bytes read past the hello) to a stripe reader thread; the event loop
        lets go of it (the duplicate descriptor keeps the connection)."""
        assert self._handoff is not None and self._stripes is not None and self.transport is not None
        g, index = self._handoff
        self._handoff = None
        sock = self.transport.get_extra_info("socket")
        try:
            fd = os.dup(sock.fileno())
        except (OSError, AttributeError) as e:
            self.abort(f"cannot take the stripe connection: {e}")
            return
        self.transport.pause_reading()
        self.transport.abort()
        s = socket.socket(fileno=fd)
        s.setblocking(True)
        try:
            self._stripes.start_reader(g, index, s, leftover)
        except (ProtocolError, OSError) as e:
            log.warning("data plane: refusing a stripe connection from %s: %s", self.peer, e)
            s.close()
            g.close(str(e))

    def _expect_parts(self, header: FrameHeader, body: PooledBuffer | None) -> _Entry | None:
        """Tell the group a striped frame's header came: its parts may be written into ``body`` (None: the
        header check refused the frame; its parts are read past, nothing of its size is taken). None (the
        body released, the connection closed) if the group cannot take it."""
        assert self._group is not None
        entry = _Entry(header, body, self._stripe_ready_from_thread if body is not None else _ignore)
        entry.main_done = body is None  # a refused frame's part here is skipped, not waited for
        try:
            self._group.expect(entry)
        except ProtocolError as e:
            if body is not None:
                body.release()
            self.abort(str(e))
            return None
        return entry

    def _body_done(self) -> bool:
        """This connection's part of the body is in: hand the frame on, or (striped, other parts still
        coming) pause reading until they are. False if closed or waiting."""
        if self._entry is None:
            return self._emit()
        assert self._group is not None
        if not self._group.main_part_done(self._entry):  # waiting for its other parts (_entry stays set)
            if self.transport is not None:
                self.transport.pause_reading()
            return False
        return self._finish_striped()

    def _finish_striped(self) -> bool:
        self._entry = None
        if self._stripes is not None:
            self._stripes.frames += 1
        ok = self._emit()
        if ok and self.transport is not None:
            self.transport.resume_reading()
        return ok

    def _stripe_ready_from_thread(self, entry: Any) -> None:
        """(A stripe reader's thread.) The last part is in while this connection waits for it."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._stripes_ready, entry)
        else:
            self._stripes_ready(entry)

    def _stripes_ready(self, entry: Any) -> None:
        if entry is not self._entry:  # (the connection closed meanwhile)
            return
        if self._finish_striped() and self._stash:
            stash, self._stash = self._stash, b""
            self._consume(memoryview(stash))

    def _abort_from_thread(self, reason: str, quiet: bool = False) -> None:
        """(Any thread.) The group failed (or the server is closing, ``quiet``): close this main connection
        on its event loop."""

        def close() -> None:
            if not self.is_open or self.transport is None:
                return
            if quiet:
                self.transport.close()
            else:
                self.abort(reason)

        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(close)
        else:
            close()
