"""Striped frames (runtime/stripes.py): a tensor frame's body split over several TCP connections.

Over loopback with a real asyncio data server in a thread and real sockets: frames of every size arrive
whole, byte for byte and in order, whether or not they were striped; parts that come before their frame's
header still land; a peer that breaks the protocol loses its connections and the server keeps serving;
and worker processes with ``--stripes`` give the in-process pipeline's tokens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from hyperlane_lab.runtime.dataplane import BufferPool, start_server
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind, pack_header
from hyperlane_lab.runtime.sender import SocketSender
from hyperlane_lab.runtime.stripes import (
    MIN_PART,
    STRIPE_FROM,
    StripeRegistry,
    hello_header,
    new_token,
    stripe_bounds,
    stripe_header,
    stripes_for,
)


def test_bounds_cover_the_body_in_order_with_no_empty_part():
    rng = random.Random(0)
    for _ in range(2000):
        k = rng.randint(2, 8)
        body = (
            rng.randint(k * MIN_PART, 1 << 24) if rng.random() < 0.7 else k * MIN_PART + rng.randint(0, 999)
        )
        b = stripe_bounds(body, k)
        assert b[0][0] == 0 and b[-1][1] == body and len(b) == k
        assert all(b[i][1] == b[i + 1][0] for i in range(k - 1))
        assert all(e > s for s, e in b), (body, k, b)
        sizes = [e - s for s, e in b]
        assert all(sz % 64 == 0 for sz in sizes[:-1]) and max(sizes) - min(sizes) <= 64 * k


def test_senders_stripe_only_large_bodies():
    assert stripes_for(10 << 20, 1, 1 << 20) == 0  # one connection: never
    assert stripes_for((1 << 20) - 1, 4, 1 << 20) == 0  # below the threshold
    assert stripes_for(1 << 20, 4, 1 << 20) == 4
    assert stripes_for(3 * MIN_PART, 8, MIN_PART) == 3  # no part below MIN_PART
    assert stripes_for(MIN_PART + 5, 8, MIN_PART) == 0


class _CountingPool(BufferPool):
    """Records the size of every buffer taken (what a frame made the receiver allocate)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[int] = []

    def acquire(self, size: int, pin: bool = False) -> Any:
        self.taken.append(size)
        return super().acquire(size, pin)


class _Server:
    """A data server with a stripe registry on its own event loop thread; frames go to ``got``."""

    def __init__(self, stripes: bool = True, read_timeout: float = 60.0, refuse: str = "") -> None:
        self.got: list[tuple[FrameHeader, bytes]] = []
        self.refuse = refuse  # the header check drops this session's frames (a closed session's late frames)
        self.pool = _CountingPool()
        self.registry = StripeRegistry(read_timeout, 1 << 31) if stripes else None
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready, read_timeout), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event, read_timeout: float) -> None:
        asyncio.set_event_loop(self.loop)

        def on_frame(conn: Any, frame: Any) -> None:
            self.got.append((frame.header, bytes(frame.body.view)))
            frame.body.release()

        async def start() -> None:
            self.server = await start_server(
                "127.0.0.1",
                0,
                on_frame,
                self.pool,
                stripes=self.registry,
                read_timeout=read_timeout,
                on_header=lambda conn, h: h.session != self.refuse,
            )
            self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[FrameHeader, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.got)

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _tensor(nbytes: int, step: int = 0, sid: str | None = None) -> tuple[FrameHeader, bytes]:
    """A TENSOR frame of one position and ``nbytes - 8`` payload bytes (uint8), random contents."""
    payload = os.urandom(nbytes - 8)
    h = FrameHeader(FrameKind.TENSOR, sid or uuid.uuid4().hex, step, 1, 1, torch.uint8, 0, 0, (len(payload),),
                    len(payload))  # fmt: skip
    return h, (step).to_bytes(8, "little") + payload


def test_striped_and_plain_frames_arrive_whole_and_in_order(server):
    sender = SocketSender(server.address, stripes=3, stripe_from=2 * MIN_PART)
    sizes = [
        64,
        2 * MIN_PART - 1,
        2 * MIN_PART,
        3 * MIN_PART + 17,
        100,
        1 << 20,
        5 * MIN_PART + 1,
        9,
        300_001,
    ]
    sent = [_tensor(n, step=i) for i, n in enumerate(sizes)]
    for h, body in sent:
        sender.send(h, body[:8], body[8:])
    got = server.wait_for(len(sent))
    assert [g[0].step for g in got] == list(range(len(sent)))
    assert [g[1] for g in got] == [b for _, b in sent]
    want_k = [stripes_for(n, 3, 2 * MIN_PART) for n in sizes]
    assert [g[0].stripes for g in got] == want_k and sum(k > 0 for k in want_k) == 5
    assert sender.striped_out == 5 and server.registry.frames == 5
    assert server.registry.reader_count == 2  # one thread per stripe connection
    sender.close()
    deadline = time.monotonic() + 10
    while server.registry.reader_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.registry.reader_count == 0  # the sender closed: its readers ended


def test_many_striped_frames_from_two_senders_at_once(server):
    a = SocketSender(server.address, stripes=4, stripe_from=MIN_PART * 2)
    b = SocketSender(server.address, stripes=2, stripe_from=MIN_PART * 2)
    sa, sb = uuid.uuid4().hex, uuid.uuid4().hex
    frames_a = [_tensor(random.Random(i).randint(8, 200_000), i, sa) for i in range(30)]
    frames_b = [_tensor(random.Random(100 + i).randint(8, 200_000), i, sb) for i in range(30)]

    def run(s: SocketSender, frames: list) -> None:
        for h, body in frames:
            s.send(h, body)

    ts = [threading.Thread(target=run, args=(a, frames_a)), threading.Thread(target=run, args=(b, frames_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    got = server.wait_for(60)
    for sid, frames in ((sa, frames_a), (sb, frames_b)):
        mine = [g for g in got if g[0].session == sid]
        assert [g[1] for g in mine] == [body for _, body in frames]  # each sender's frames in its order
    a.close(), b.close()


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_part_that_comes_before_its_frames_header_still_lands(server):
    token = new_token()
    main, stripe = _raw(server.address), _raw(server.address)
    main.sendall(pack_header(hello_header(token, 0, 2)))
    stripe.sendall(pack_header(hello_header(token, 1, 2)))
    h, body = _tensor(3 * MIN_PART + 5)
    h = FrameHeader(**{**h.__dict__, "stripes": 2})
    (s0, e0), (s1, e1) = stripe_bounds(len(body), 2)
    stripe.sendall(pack_header(stripe_header(h, 1, 2, e1 - s1)) + body[s1:e1])  # the part first
    time.sleep(0.2)
    main.sendall(pack_header(h) + body[s0:e0])
    got = server.wait_for(1)
    assert got and got[0][1] == body and got[0][0].stripes == 2
    main.close(), stripe.close()


def _still_serves(server: _Server) -> None:
    n = len(server.got)
    s = SocketSender(server.address)
    h, body = _tensor(1000)
    s.send(h, body)
    assert server.wait_for(n + 1)[-1][1] == body
    s.close()


@pytest.mark.parametrize("bad", ["short_part", "other_session", "stripe_on_main", "striped_without_hello",
                                 "hello_of_nine", "hello_index_out_of_range", "hello_after_a_frame"])  # fmt: skip
def test_a_peer_breaking_the_stripe_protocol_loses_its_connections(server, bad):
    token = new_token()
    main = _raw(server.address)
    h, body = _tensor(3 * MIN_PART)
    hs = FrameHeader(**{**h.__dict__, "stripes": 2})
    (s0, e0), (s1, e1) = stripe_bounds(len(body), 2)
    stripe = None
    if bad in ("short_part", "other_session"):
        stripe = _raw(server.address)
        main.sendall(pack_header(hello_header(token, 0, 2)))
        stripe.sendall(pack_header(hello_header(token, 1, 2)))
        main.sendall(pack_header(hs) + body[s0:e0])
        part = stripe_header(hs, 1, 2, e1 - s1 - (1 if bad == "short_part" else 0))
        if bad == "other_session":
            part = FrameHeader(**{**part.__dict__, "session": uuid.uuid4().hex})
        stripe.sendall(pack_header(part) + body[s1 : e1 - (1 if bad == "short_part" else 0)])
    elif bad == "stripe_on_main":
        main.sendall(pack_header(stripe_header(hs, 1, 2, 10)) + bytes(10))
    elif bad == "striped_without_hello":
        main.sendall(pack_header(hs) + body[s0:e0])
    elif bad == "hello_of_nine":
        hello = bytearray(pack_header(hello_header(token, 0, 2)))
        hello[37] = 9  # the stripes byte: more connections than any group may have
        main.sendall(bytes(hello))
    elif bad == "hello_index_out_of_range":
        main.sendall(pack_header(hello_header(token, 2, 2)))
    else:
        main.sendall(pack_header(h) + body)
        main.sendall(pack_header(hello_header(token, 0, 2)))
    assert _closed_by_peer(main), bad
    if stripe is not None:
        assert _closed_by_peer(stripe), bad
    if bad != "hello_after_a_frame":  # (there the plain frame before the hello was whole and went on)
        assert all(g[1] != body for g in server.got)  # nothing half-assembled was handed on
    _still_serves(server)
    main.close()
    if stripe is not None:
        stripe.close()


def _group_of_two(address: str, token: str) -> tuple[socket.socket, socket.socket]:
    main, stripe = _raw(address), _raw(address)
    main.sendall(pack_header(hello_header(token, 0, 2)))
    stripe.sendall(pack_header(hello_header(token, 1, 2)))
    return main, stripe


def test_a_stripe_connection_sending_garbage_closes_its_group(server):
    main, stripe = _group_of_two(server.address, new_token())
    stripe.sendall(os.urandom(64))
    assert _closed_by_peer(stripe) and _closed_by_peer(main)
    _still_serves(server)
    main.close(), stripe.close()


@pytest.mark.parametrize("bad", ["joined_twice", "group_size_differs"])
def test_a_hello_that_does_not_fit_its_group_is_refused(server, bad):
    token = new_token()
    main, stripe = _group_of_two(server.address, token)
    other = _raw(server.address)
    other.sendall(
        pack_header(hello_header(token, 1, 2) if bad == "joined_twice" else hello_header(token, 1, 3))
    )
    assert _closed_by_peer(other)
    other.close()
    _still_serves(server)
    main.close(), stripe.close()


def test_a_sender_gone_mid_part_frees_the_frame_once_no_reader_writes(server):
    """The sender dies while a reader is mid-part (its main connection is paused, waiting for that part): the
    reader's end of stream closes the group and the main connection, and the body goes back to the pool."""
    token = new_token()
    main, stripe = _group_of_two(server.address, token)
    h, body = _tensor(64 * MIN_PART)
    hs = FrameHeader(**{**h.__dict__, "stripes": 2})
    (s0, e0), (s1, e1) = stripe_bounds(len(body), 2)
    main.sendall(pack_header(hs) + body[s0:e0])
    stripe.sendall(pack_header(stripe_header(hs, 1, 2, e1 - s1)) + body[s1 : s1 + 1000])
    time.sleep(0.2)  # the reader took the part and waits for the rest of it
    stripe.close(), main.close()
    deadline = time.monotonic() + 10
    while (
        server.registry.reader_count or server.registry.counts()["groups"]
    ) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.registry.reader_count == 0 and server.registry.counts()["groups"] == 0 and not server.got
    while not any(len(b) >= len(body) for b in server.pool._free) and time.monotonic() < deadline:
        time.sleep(0.01)  # (the main connection's close runs on the event loop)
    assert any(len(b) >= len(body) for b in server.pool._free)
    _still_serves(server)


def test_a_server_without_stripes_refuses_a_hello():
    s = _Server(stripes=False)
    try:
        main = _raw(s.address)
        main.sendall(pack_header(hello_header(new_token(), 0, 2)))
        assert _closed_by_peer(main)
        main.close()
        _still_serves(s)
    finally:
        s.close()


def test_a_sender_that_stops_mid_part_is_cut_off_and_the_body_freed():
    s = _Server(read_timeout=0.5)
    try:
        token = new_token()
        main, stripe = _raw(s.address), _raw(s.address)
        main.sendall(pack_header(hello_header(token, 0, 2)))
        stripe.sendall(pack_header(hello_header(token, 1, 2)))
        h, body = _tensor(3 * MIN_PART)
        hs = FrameHeader(**{**h.__dict__, "stripes": 2})
        (s0, e0), (s1, e1) = stripe_bounds(len(body), 2)
        main.sendall(pack_header(hs) + body[s0:e0])
        stripe.sendall(pack_header(stripe_header(hs, 1, 2, e1 - s1)) + body[s1 : s1 + 10])  # and no more
        assert _closed_by_peer(main) and _closed_by_peer(stripe)
        deadline = time.monotonic() + 10
        while s.registry.reader_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.registry.reader_count == 0 and not s.got
        assert any(len(b) >= len(body) for b in s.pool._free)  # the frame's buffer went back to the pool
        _still_serves(s)
        main.close(), stripe.close()
    finally:
        s.close()


def test_a_striped_frame_the_header_check_refuses_is_read_past_without_taking_its_size():
    """A late frame of a closed session: dropped without allocating its declared size (a peer could declare
    2 GB), but all its parts are read past, so the next frames (striped or not) still line up."""
    bad = uuid.uuid4().hex
    s = _Server(refuse=bad)
    try:
        sender = SocketSender(s.address, stripes=3, stripe_from=2 * MIN_PART)
        frames = [_tensor(200_000, 0, bad), _tensor(300_000, 1), _tensor(100, 2), _tensor(50_000, 3, bad),
                  _tensor(70_000, 4)]  # fmt: skip
        for h, body in frames:
            sender.send(h, body)
        got = s.wait_for(3)
        assert [g[0].step for g in got] == [1, 2, 4] and [g[1] for g in got] == [
            frames[i][1] for i in (1, 2, 4)
        ]
        assert sender.striped_out == 4 and s.registry.frames == 2  # (the two refused ones are not counted)
        assert s.pool.taken == [frames[i][0].body_len for i in (1, 2, 4)]  # nothing for the refused ones
        sender.close()
    finally:
        s.close()


def test_a_sender_closing_after_its_last_striped_frame_loses_no_frame(server):
    """The stripe connections may end before the main connection's last frames are read: a stripe connection
    closed between frames only retires its index, and the frames after the last striped one still arrive."""
    for _ in range(3):
        n = len(server.got)
        sender = SocketSender(server.address, stripes=3, stripe_from=2 * MIN_PART)
        sid = uuid.uuid4().hex
        frames = [_tensor(50_000 if i % 10 == 0 else 200, i, sid) for i in range(60)]
        for h, body in frames:
            sender.send(h, body)
        sender.close()
        got = [g for g in server.wait_for(n + len(frames)) if g[0].session == sid]
        assert [g[1] for g in got] == [b for _, b in frames]


def test_a_stripe_connection_whose_group_gets_no_main_connection_ends():
    s = _Server(read_timeout=0.5)
    try:
        stripe = _raw(s.address)
        stripe.sendall(pack_header(hello_header(new_token(), 1, 2)))  # and no main connection ever
        assert _closed_by_peer(stripe)
        deadline = time.monotonic() + 10
        while s.registry.reader_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.registry.reader_count == 0 and s.registry.counts()["groups"] == 0
        stripe.close()
        _still_serves(s)
    finally:
        s.close()


def test_closing_a_sender_interrupts_its_striped_send():
    """A peer that stops reading: a striped send blocks, and ``close`` from another thread ends it at once
    (ConnectionError) instead of after the send timeout, with the stripe threads gone."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(8)
    addr = f"127.0.0.1:{lsn.getsockname()[1]}"
    sender = SocketSender(addr, stripes=3, stripe_from=2 * MIN_PART, send_timeout=30)
    peers = [lsn.accept()[0] for _ in range(3)]  # accepted, never read
    h, body = _tensor(64 << 20)
    threading.Timer(0.5, sender.close).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        sender.send(h, body)
    assert time.monotonic() - t0 < 10
    assert not sender.is_open
    assert all(not w.thread.is_alive() for w in sender._writers)
    for p in peers:
        p.close()
    lsn.close()


def test_sender_settings_are_checked():
    with pytest.raises(ValueError, match="stripes must be 1"):
        SocketSender("127.0.0.1:1", stripes=9)
    with pytest.raises(ValueError, match="stripe_from"):
        SocketSender("127.0.0.1:1", stripes=2, stripe_from=100)


@pytest.mark.multiprocess
def test_workers_with_stripes_give_the_inprocess_tokens(tmp_path):
    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.runtime import AutoDistributedModel, LocalCluster
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    prompt = (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her "
        "dog Max. One day, Lily and Max went to the park to find a big red ball."
    )
    local = InProcessPipeline.from_pretrained(None, n_stages=3)
    with (
        LocalCluster(
            3, cache_dir=tmp_path, extra_args=["--stripes", "3"], env={"HYPERLANE_STRIPE_FROM": "8192"}
        ) as cluster,
        AutoDistributedModel.from_pretrained(None, workers=cluster.addresses, progress=False) as m,
    ):
        for p in (prompt, "The dog"):
            assert m.generate(p, max_tokens=24).token_ids == local.generate(p, max_tokens=24).token_ids
        health = [c.call("Health", pb.HealthRequest()) for c in m.clients]
        # the long prompt's hidden states (> 8 KB) went split over 3 connections at both hand-offs
        assert [h.striped_out > 0 for h in health] == [True, True, False], health
        assert [h.striped_in > 0 for h in health] == [False, True, True], health
        assert all(cluster.alive)


def test_worker_stripe_settings_are_checked(monkeypatch):
    from hyperlane_lab.runtime.worker import Worker, WorkerConfig

    with pytest.raises(ValueError, match="stripes"):
        WorkerConfig(stripes=0)
    monkeypatch.setenv("HYPERLANE_STRIPES", "nine")
    with pytest.raises(ValueError, match="HYPERLANE_STRIPES must be an integer from 1 to 8"):
        Worker(WorkerConfig(device="cpu"))
    monkeypatch.setenv("HYPERLANE_STRIPES", "3")
    w = Worker(WorkerConfig(device="cpu"))
    assert w.stripes == 3 and w.stripe_from == STRIPE_FROM == 4 << 20
    with contextlib.suppress(Exception):
        w._compute.shutdown(wait=False)
