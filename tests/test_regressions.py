"""Regressions found in review: GGUF Qwen2 layout, prompt text leaking into output, per-row
sampling streams, and the data plane vetting headers before it allocates anything."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hyperlane_lab.generation.sampling import Sampler
from hyperlane_lab.generation.text import SequenceState
from hyperlane_lab.runtime.dataplane import BufferPool, FrameConnection
from hyperlane_lab.runtime.frame import FrameHeader, FrameKind, pack_header, unpack_header
from hyperlane_lab.types import SamplingParams
from tests.helpers_models import (
    _GGUF_LAYER_NAMES,
    load_stages,
    make_checkpoint,
    open_all,
    run_stages,
    tiny_config,
)


def test_gguf_qwen2_is_not_unpermuted(tmp_path):
    """llama.cpp permutes q/k rows only for llama; a qwen2 GGUF keeps HF's layout."""
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    make_checkpoint(tmp_path, tiny_config("qwen2"))
    c = json.loads((tmp_path / "config.json").read_text())
    sd = load_file(str(tmp_path / "model.safetensors"))
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c["vocab_size"])
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for k, t in sd.items():
        p = k.split(".")
        name = fixed.get(k) or f"blk.{p[2]}.{_GGUF_LAYER_NAMES['.'.join(p[3:-1])]}.{p[-1]}"
        w.add_tensor(name, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    n = c["num_hidden_layers"]
    out = []
    for src in (tmp_path, tmp_path / "q.gguf"):
        st = load_stages(src, [(0, n)])
        with open_all(st, 1, 16) as sid:
            out.append(run_stages(st, sid, ids, pos, all_logits=True)[0])
    assert (out[0] - out[1]).abs().max().item() < 1e-5


def test_prompt_ending_mid_character_does_not_leak(tokenizer):
    ids = tokenizer("Once upon a time \U0001f600")["input_ids"]
    s = SequenceState(ids[:-2], tokenizer, 10, frozenset({2}))
    streamed = "".join(s.push(t) for t in ids[-2:]) + s.push(2)
    assert s.text == streamed == "\U0001f600"


def test_seeded_rows_are_independent_of_other_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    other = logits.clone()
    other[1] = torch.randn(50)  # row 1 differs; row 0 and 2 must not notice
    ra = [a(logits) for _ in range(6)]
    rb = [b(other) for _ in range(6)]
    assert [int(x[0]) for x in ra] == [int(x[0]) for x in rb]
    assert [int(x[2]) for x in ra] == [int(x[2]) for x in rb]


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, key, default=None):
        return None

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _feed(conn: FrameConnection, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


def test_headers_are_vetted_before_any_allocation():
    pool = BufferPool()
    seen: list[FrameHeader] = []
    frames = []
    conn = FrameConnection(
        lambda c, f: frames.append(f), pool, on_header=lambda c, h: seen.append(h) or False
    )
    conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
    big = FrameHeader(FrameKind.TENSOR, uuid.uuid4().hex, 0, 1, 1, torch.float32, 0, 0, (1, 1, 64), 1 << 30)
    _feed(conn, pack_header(big))
    assert pool.allocations == 0 and len(seen) == 1  # 1 GiB declared, nothing allocated
    _feed(conn, bytes(8 + (1 << 20)))  # the body is read through a small scratch buffer...
    assert pool.allocations == 0 and not frames and not conn.transport.closed
    conn2 = FrameConnection(lambda c, f: frames.append(f), pool, on_header=lambda c, h: True)
    conn2.connection_made(_FakeTransport())  # type: ignore[arg-type]
    ping = FrameHeader(FrameKind.PING, "", 3, 0, 0, torch.uint8, 0, 0, (), 5)
    _feed(conn2, pack_header(ping) + b"hello")
    assert len(frames) == 1 and bytes(frames[0].payload_view) == b"hello"
    assert unpack_header(pack_header(ping)).step == 3


@pytest.mark.parametrize("chunk", [1, 7, 100, 9000, 1 << 20])
def test_frames_split_or_packed_any_way_parse_the_same(chunk):
    """Several frames in one read (a header and the body behind it arrive through the scratch
    buffer), or one byte at a time: the same frames come out, a vetoed frame's body is skipped."""
    pool, frames = BufferPool(), []
    sid = uuid.uuid4().hex
    conn = FrameConnection(lambda c, f: frames.append(f), pool, on_header=lambda c, h: h.step != 2)
    conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
    bodies = {1: bytes(range(256)) * 32, 2: b"x" * 300, 3: b"", 4: b"tail" * 3}
    data = b""
    for step, body in bodies.items():
        h = FrameHeader(FrameKind.PING, sid, step, 0, 0, torch.uint8, 0, 0, (), len(body))
        data += pack_header(h) + body
    view = memoryview(data)
    while view:  # hand the bytes over in pieces of at most `chunk`, as reads would
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(view), chunk)
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]
    assert [f.header.step for f in frames] == [1, 3, 4]
    assert [bytes(f.payload_view) for f in frames] == [bodies[1], bodies[3], bodies[4]]
    assert not conn.transport.closed


def test_large_bodies_go_to_the_pinned_allocator_and_parse_the_same():
    """A GPU worker's pool puts bodies of ``pin_from`` bytes or more into buffers from its pinned
    allocator (numpy arrays here, as on a GPU worker), reuses them, and keeps small bodies in
    bytearrays; frames read into either parse to the same bytes. A failing allocator falls back."""
    import numpy as np

    made: list[int] = []

    def alloc(n: int) -> np.ndarray:
        made.append(n)
        return np.zeros(n, dtype=np.uint8)

    pool, frames = BufferPool(), []
    pool.pinned_alloc, pool.pin_from = alloc, 1000
    conn = FrameConnection(lambda c, f: frames.append(f), pool, on_header=lambda c, h: True)
    conn.connection_made(_FakeTransport())  # type: ignore[arg-type]

    def tensor(i: int, body: bytes) -> bytes:
        return pack_header(
            FrameHeader(FrameKind.TENSOR, "5" * 32, i, 1, 1, torch.uint8, 0, 0, (len(body),), len(body))
        )

    bodies = [bytes(range(256)) * 20, b"small" * 10, bytes(reversed(range(256))) * 11]
    for i, body in enumerate(bodies):
        _feed(conn, tensor(i, body) + bytes(8) + body)  # position 0 (int64), then the payload
    probe = bytes(range(200)) * 30  # a link probe's body is as large, but never goes to a GPU
    _feed(
        conn, pack_header(FrameHeader(FrameKind.PING, "", 9, 0, 0, torch.uint8, 0, 0, (), len(probe))) + probe
    )
    assert [bytes(f.payload_view) for f in frames] == [*bodies, probe]
    assert [isinstance(f.body.buf, np.ndarray) for f in frames] == [True, False, True, False]
    assert made == [8192, 4096]  # powers of two: reusable by somewhat larger bodies
    assert pool.pinned_allocations == 2 and pool.allocations == 4
    for f in frames:
        f.body.release()
    again = pool.acquire(4000, pin=True)  # the smallest free pinned buffer that fits
    assert again.buf is frames[2].body.buf and pool.pinned_allocations == 2
    assert not isinstance(pool.acquire(500, pin=True).buf, np.ndarray)  # under pin_from: a bytearray
    assert pool.acquire(8000, pin=True).buf is frames[0].body.buf  # 5,128 bytes asked, 8,192 made
    pool.pinned_keep = 10_000  # free pinned bytes kept: a buffer beyond the budget is dropped
    a, b = pool.acquire(5000, pin=True), pool.acquire(5000, pin=True)
    a.release(), b.release()
    assert len(pool._free_pinned) == 1

    def broken(n: int) -> np.ndarray:
        raise RuntimeError("no page-locked memory left")

    pool.pinned_alloc = broken
    b = pool.acquire(1 << 20, pin=True)
    assert isinstance(b.buf, bytearray) and pool.pinned_alloc is None  # pageable from now on


def test_large_bodies_drained_from_a_real_socket_arrive_whole_and_in_order(monkeypatch):
    """Bodies of 64 KB or more are read until the socket is empty within one callback (into
    bytearrays, and into numpy arrays as a GPU worker's pinned buffers); frames sent back to back
    around them (small, empty, large again) still arrive whole, in order."""
    import threading

    import hyperlane_lab.runtime.dataplane as dp
    from hyperlane_lab.runtime.dataplane import start_server
    from hyperlane_lab.runtime.sender import SocketSender

    reads = []
    real_readv = dp.os.readv

    def counting_readv(fd, bufs):
        reads.append(fd)
        return real_readv(fd, bufs)

    monkeypatch.setattr(dp.os, "readv", counting_readv)
    rng = np.random.default_rng(5)
    bodies = [rng.bytes(3 << 20), b"tiny", b"", rng.bytes(70_000), rng.bytes(5 << 20), b"end"]
    kinds = [
        FrameKind.TENSOR,
        FrameKind.PING,
        FrameKind.PING,
        FrameKind.PING,
        FrameKind.TENSOR,
        FrameKind.PING,
    ]
    got: list[tuple[int, bytes]] = []

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_frame(conn: FrameConnection, frame) -> None:
            got.append((frame.header.step, bytes(frame.payload_view)))
            frame.body.release()
            if len(got) == len(bodies):
                loop.call_soon(done.set)

        pool = BufferPool()  # large bodies into numpy buffers, as a GPU worker's pinned ones
        pool.pinned_alloc, pool.pin_from = (lambda n: np.zeros(n, dtype=np.uint8)), 1 << 20
        srv = await start_server("127.0.0.1", 0, on_frame, pool)
        port = srv.sockets[0].getsockname()[1]

        def send() -> None:
            snd = SocketSender(f"127.0.0.1:{port}")
            for i, (b, kind) in enumerate(zip(bodies, kinds)):
                t = kind == FrameKind.TENSOR
                shape, sid, rows = ((len(b),), "5" * 32, 1) if t else ((), "", 0)
                pos = (
                    bytes(8) if kind == FrameKind.TENSOR else b""
                )  # a tensor frame's position, then its payload
                snd.send(FrameHeader(kind, sid, i, rows, rows, torch.uint8, 0, 0, shape, len(b)), pos, b)
            snd.close()

        th = threading.Thread(target=send)
        th.start()
        await asyncio.wait_for(done.wait(), 30)
        th.join(10)
        srv.close()

    asyncio.run(main())
    assert [step for step, _ in got] == list(range(len(bodies)))
    assert [b for _, b in got] == bodies
    assert reads  # the large bodies were drained, not read one loop pass at a time


@pytest.mark.multiprocess
def test_unknown_session_frame_keeps_the_connection(cluster3):
    """A late frame of a closed session is skipped; the same connection keeps working."""
    port = cluster3.data_ports[1]
    junk = FrameHeader(FrameKind.TENSOR, uuid.uuid4().hex, 0, 1, 1, torch.float32, 0, 0, (1, 1, 64), 256)
    ping = FrameHeader(FrameKind.PING, "", 42, 0, 0, torch.uint8, 0, 0, (), 4)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(pack_header(junk) + bytes(8 + 256) + pack_header(ping) + b"ping")
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 68 and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    h = unpack_header(got[:64])
    assert h.kind == FrameKind.PONG and h.step == 42 and got[64:68] == b"ping"


def _read_until_closed_or(s: socket.socket, n: int) -> bytes:
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.multiprocess
def test_warm_frames_are_dropped_counted_and_a_bad_one_refused(cluster3):
    """WARM frames (runtime/hop_warm.py) are dropped on arrival: the connection stays (a PING behind them is
    answered) and Health counts them. One that carries positions or bytes is a protocol error: that connection
    closes, the worker stays up and answers on a new one."""
    from hyperlane_lab.runtime import WorkerClient
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb
    from hyperlane_lab.runtime.sender import SocketSender, _warm_header

    port = cluster3.data_ports[1]
    client = WorkerClient(cluster3.addresses[1])
    before = client.call("Health", pb.HealthRequest()).warm_frames_in
    sender = SocketSender(f"127.0.0.1:{port}")
    assert sender.warm() and sender.warm() and sender.warm_out == 2 and sender.frames_out == 0
    ping = pack_header(FrameHeader(FrameKind.PING, "", 7, 0, 0, torch.uint8, 0, 0, (), 4)) + b"ping"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_warm_header() + ping)
        got = _read_until_closed_or(s, 68)
    assert unpack_header(got[:64]).kind == FrameKind.PONG and got[64:68] == b"ping"
    deadline = time.monotonic() + 10  # the sender's two frames may still be on their way
    while (
        client.call("Health", pb.HealthRequest()).warm_frames_in < before + 3 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert client.call("Health", pb.HealthRequest()).warm_frames_in == before + 3
    sender.close()
    for bad in (
        FrameHeader(FrameKind.WARM, "", 0, 0, 0, torch.uint8, 0, 0, (), 4),  # bytes
        FrameHeader(FrameKind.WARM, "", 0, 1, 1, torch.uint8, 0, 0, (), 0),  # a position
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(pack_header(bad) + bytes(8 + 4) + ping)
            assert _read_until_closed_or(s, 68) == b""  # closed: the PING behind it is never answered
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(ping)
        assert unpack_header(_read_until_closed_or(s, 68)[:64]).kind == FrameKind.PONG
    assert client.call("Health", pb.HealthRequest()).warm_frames_in == before + 3
    client.close()


def test_the_client_drops_warm_frames_and_refuses_loaded_ones():
    from hyperlane_lab.errors import ProtocolError
    from hyperlane_lab.runtime.client_dataplane import ClientDataPlane

    warm = FrameHeader(FrameKind.WARM, "", 0, 0, 0, torch.uint8, 0, 0, (), 0)
    assert ClientDataPlane._check_header(None, warm)  # type: ignore[arg-type]
    released = []
    body = SimpleNamespace(release=lambda: released.append(True))
    plane = object.__new__(ClientDataPlane)  # (a WARM frame touches nothing of it)
    plane._on_frame(None, SimpleNamespace(header=warm, body=body))  # type: ignore[arg-type]
    assert released == [True]
    with pytest.raises(ProtocolError, match="exceeds 0"):
        ClientDataPlane._check_header(
            None, FrameHeader(FrameKind.WARM, "", 0, 0, 0, torch.uint8, 0, 0, (), 1)
        )  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="carries nothing"):
        ClientDataPlane._check_header(
            None, FrameHeader(FrameKind.WARM, "", 0, 1, 1, torch.uint8, 0, 0, (), 0)
        )  # type: ignore[arg-type]


@pytest.mark.multiprocess
def test_idle_sessions_are_reaped(tmp_path, bundled_path):
    """A client that dies without CloseSession does not leave its KV cache behind forever."""
    from hyperlane_lab.runtime import LocalCluster, WorkerClient
    from hyperlane_lab.runtime.proto_gen import hyperlane_pb2 as pb

    listener = socket.socket()  # stands in for the client's data port
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    reply_to = f"127.0.0.1:{listener.getsockname()[1]}"
    with listener, LocalCluster(1, cache_dir=tmp_path / "c", extra_args=["--session-ttl", "1"]) as cluster:
        c = WorkerClient(cluster.addresses[0])
        c.call("LoadShard", pb.LoadShardRequest(start=0, end=5, model_path=bundled_path), timeout=60)
        c.call(
            "OpenSession",
            pb.OpenSessionRequest(session_id=uuid.uuid4().hex, batch=1, max_len=16, reply_to=reply_to),
        )
        assert c.info().sessions == 1
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and c.info().sessions:
            time.sleep(0.2)
        assert c.info().sessions == 0
        c.close()


def test_a_stalled_partial_frame_is_cut_off_but_an_idle_connection_is_not():
    """A peer that starts a frame and stops sending loses the connection after the read timeout
    (its pooled buffer is released); a peer that is merely idle between frames keeps it."""
    from hyperlane_lab.runtime.dataplane import start_server

    got: list[int] = []
    pool = BufferPool()
    header = FrameHeader(FrameKind.PING, uuid.uuid4().hex, 1, 0, 0, torch.uint8, 0, 0, (), 1000)

    def on_frame(conn, frame):
        got.append(frame.header.step)
        frame.body.release()

    async def main() -> tuple[bool, bool]:
        server = await start_server("127.0.0.1", 0, on_frame, pool, read_timeout=0.4)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        def client(partial: bool) -> bool:
            """True if the server closed the connection within 2.5 s."""
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(2.5)
            s.sendall(pack_header(header) + bytes(1000))  # one whole frame first
            s.sendall(pack_header(header) + bytes(300 if partial else 1000))
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
            finally:
                s.close()

        stalled = await loop.run_in_executor(None, client, True)
        idle = await loop.run_in_executor(None, client, False)
        server.close()
        return stalled, idle

    stalled, idle = asyncio.run(main())
    assert stalled, "a frame stuck half-way must cost the peer its connection"
    assert not idle, "a connection idle between whole frames must stay open"
    assert got == [1, 1, 1]  # whole frames arrived: 1 before the stall, 2 on the idle connection
