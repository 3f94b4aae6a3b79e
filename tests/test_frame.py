"""Frame header packing and validation (pure, no sockets)."""

from __future__ import annotations

import dataclasses
import struct
import uuid

import pytest
import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.dataplane import BufferPool, parse_address
from hyperlane_lab.runtime.frame import HEADER, MAGIC, FrameHeader, FrameKind, pack_header, unpack_header
from hyperlane_lab.runtime.wire import check_payload, decode_payload, encode_tensor


def _header(**kw):
    base = dict(
        kind=FrameKind.TENSOR,
        session=uuid.uuid4().hex,
        step=7,
        batch=2,
        seq=3,
        dtype=torch.float16,
        codec=0,
        group_size=0,
        shape=(2, 3, 64),
        payload_len=2 * 3 * 64 * 2,
    )
    base.update(kw)
    return FrameHeader(**base)


def test_roundtrip():
    h = _header()
    raw = pack_header(h)
    assert len(raw) == HEADER.size == 64
    assert unpack_header(raw) == h


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:5] + bytes([77]) + b[6:], "unknown frame kind"),
        (lambda b: b[:6] + struct.pack("<H", 8) + b[8:], "unknown frame flags"),
        (lambda b: b[:32] + bytes([99]) + b[33:], "dtype"),
        (lambda b: b[:56] + struct.pack("<Q", 1 << 40) + b[64:], "exceeds the limit"),
        (lambda b: b[:40], "truncated"),
    ],
)
def test_bad_headers(mutate, message):
    raw = pack_header(_header())
    with pytest.raises(ProtocolError, match=message):
        unpack_header(mutate(raw))


def test_payload_length_checked():
    t = torch.randn(2, 3, 8)
    enc = encode_tensor(t)
    h = _header(dtype=torch.float32, shape=(2, 3, 8), payload_len=enc.nbytes)
    data = bytes(enc.parts[0])
    assert torch.equal(decode_payload(h, memoryview(data)), t)
    with pytest.raises(ProtocolError, match="needs"):
        decode_payload(h, memoryview(data[:-4]))
    check_payload(h, memoryview(data))
    with pytest.raises(ProtocolError, match="needs"):
        check_payload(h, memoryview(data[:-4]))


def test_codec_payload_checked_on_the_host_then_decoded_trusted():
    """A GPU worker's split of ``decode_payload``: ``check_payload`` on the host bytes (ProtocolError
    with the codec's reason), then a trusted decode of a copy of them gives the same tensor."""
    t = torch.randn(2, 3, 64)
    enc = encode_tensor(t, "int4_outlier", 32)
    h = _header(dtype=torch.float32, codec=enc.codec, group_size=enc.group_size, payload_len=enc.nbytes)
    data = bytes(enc.parts[0])
    check_payload(h, memoryview(data))
    copy = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert torch.equal(decode_payload(h, copy, trusted=True), decode_payload(h, memoryview(data)))
    with pytest.raises(ProtocolError, match="expected"):
        check_payload(h, memoryview(data[:-1]))
    bad = bytearray(data)
    at = 2 * 2 * 3 * 2  # after the fp16 scales of 6 rows x 2 groups: the first outlier's column
    bad[at : at + 2] = struct.pack("<H", 64)
    with pytest.raises(ProtocolError, match="outlier column 64"):
        check_payload(h, memoryview(bytes(bad)))


def test_magic_constant():
    assert MAGIC == b"HLF1"


def test_buffer_pool_reuses():
    pool = BufferPool()
    a = pool.acquire(1000)
    a.release()
    b = pool.acquire(800)
    assert b.buf is a.buf and pool.allocations == 1
    c = pool.acquire(10_000)  # larger: a new buffer
    assert pool.allocations == 2
    b.release(), c.release()


@pytest.mark.parametrize("bad", ["nohost", "host:", ":80", "host:abc"])
def test_bad_address(bad):
    with pytest.raises(ValueError, match="host:port"):
        parse_address(bad)


def test_the_more_flag_round_trips():
    from hyperlane_lab.runtime.frame import FLAG_MORE

    h = dataclasses.replace(_header(), flags=FLAG_MORE)
    assert unpack_header(pack_header(h)).flags == FLAG_MORE


def test_session_ids_pack_as_the_uuid_module_reads_them():
    """The header's 16 session bytes equal ``uuid.UUID``'s for every form it accepts (32 hex digits of either
    case, hyphens, braces, and 32 characters that are not all hex digits, which fall back to ``uuid``), the
    empty id packs as zeros, and ids that are not UUIDs are refused; the receiver reads back
    ``UUID(bytes=...).hex``."""
    import uuid

    u = uuid.uuid4()
    for form in (u.hex, u.hex.upper(), str(u), "{" + str(u) + "}", " " + u.hex[1:]):
        h = FrameHeader(FrameKind.PING, form, 1, 0, 0, torch.uint8, 0, 0, (), 0)
        packed = pack_header(h)
        assert packed[8:24] == uuid.UUID(hex=form).bytes
        assert unpack_header(packed).session == uuid.UUID(hex=form).hex
    zero = unpack_header(pack_header(FrameHeader(FrameKind.PING, "", 1, 0, 0, torch.uint8, 0, 0, (), 0)))
    assert zero.session == uuid.UUID(bytes=bytes(16)).hex
    # 32 characters with inner whitespace: fromhex reads 15 bytes, which must not be zero-padded to 16
    for bad in ("abc", "g" * 32, str(u)[:-1], "ab " + u.hex[:28] + " "):
        with pytest.raises(ValueError):
            pack_header(FrameHeader(FrameKind.PING, bad, 1, 0, 0, torch.uint8, 0, 0, (), 0))
