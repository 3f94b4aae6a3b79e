"""The data-plane frame: a fixed little-endian header, positions, then the payload.

    offset size field
    0      4    magic            b"HLF1"
    4      1    version          1
    5      1    kind             1 TENSOR, 2 TOKENS, 3 HELLO, 4 PING, 5 PONG, 6 ERROR, 7 STRIPE, 8 WARM
    6      2    flags            bit 0: all_logits (reserved); bit 1: MORE (a prompt chunk: more
                                 chunks of this step follow; stages fill their caches, the last
                                 stage samples nothing); bit 2: LAST (the token loop's last step
                                 of the session's budget: no frame follows it, so no stage arms
                                 a next step)
    8      16   session          uuid bytes
    24     4    step             0 = prefill, k = k-th decode step
    28     2    batch  B
    30     2    seq    S         positions are [B, S]
    32     1    dtype            0 int64, 1 fp32, 2 fp16, 3 bf16, 4 uint8, 5 int32
    33     1    codec            codec id (0 = raw: the tensor as is, in `dtype`)
    34     2    group_size       codec group size (0 when unused)
    36     1    ndim             of the (decoded) tensor, <= 4
    37     1    stripes          0, or n in 2..8: the body is split in n parts (``stripes.py``)
    38     2    reserved         zero
    40     16   shape            4 x u32, unused dims 0
    56     8    payload_len      bytes after the positions
    64     -    positions        B*S int64
    ...    -    payload          payload_len bytes (codec-encoded tensor, or raw bytes)

TENSOR frames carry token ids (first stage) or hidden states; TOKENS frames carry the sampled
ids [B] int64 back to the client; PING/PONG carry opaque bytes for link probes. A sender may split a
large TENSOR frame's body over n connections (``stripes.py``): HELLO frames bind the connections into
a group, the frame's header says n, and parts 1..n-1 travel as STRIPE frames. A WARM frame (no positions, no
payload) goes shortly before a decode step's frame on the same connection and is dropped on arrival: it runs
the path once while nothing waits for it, so the step's frame finds it warm (``runtime/hop_warm.py``). Nothing here is
ever unpickled: tensors are rebuilt with ``torch.frombuffer`` from validated sizes only.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from dataclasses import dataclass

import torch

from hyperlane_lab.errors import ProtocolError

__all__ = [
    "DTYPE_CODES",
    "FLAG_ALL_LOGITS",
    "FLAG_LAST",
    "FLAG_MORE",
    "HEADER",
    "KNOWN_FLAGS",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_STRIPES",
    "VERSION",
    "FrameHeader",
    "FrameKind",
    "pack_header",
    "unpack_header",
]

MAGIC = b"HLF1"
VERSION = 1
HEADER = struct.Struct("<4sBBH16sIHHBBHBB2x4IQ")
assert HEADER.size == 64
MAX_PAYLOAD = 1 << 31  # 2 GiB: larger frames are rejected before any allocation
MAX_TOKENS = 1 << 20  # B*S bound
MAX_STRIPES = 8  # connections one frame's body may be split over


class FrameKind:
    TENSOR = 1
    TOKENS = 2
    HELLO = 3
    PING = 4
    PONG = 5
    ERROR = 6
    STRIPE = 7
    WARM = 8
    ALL = (1, 2, 3, 4, 5, 6, 7, 8)


DTYPE_CODES: dict[torch.dtype, int] = {
    torch.int64: 0,
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.uint8: 4,
    torch.int32: 5,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class FrameHeader:
    kind: int
    session: str  # 32 hex chars
    step: int
    batch: int
    seq: int
    dtype: torch.dtype
    codec: int
    group_size: int
    shape: tuple[int, ...]
    payload_len: int
    flags: int = 0
    stripes: int = 0  # TENSOR: body split over this many connections; HELLO / STRIPE: the group's size

    @property
    def positions_len(self) -> int:
        return self.batch * self.seq * 8

    @property
    def body_len(self) -> int:
        return self.positions_len + self.payload_len


FLAG_ALL_LOGITS = 1  # reserved
FLAG_MORE = 2  # chunked prefill: not the step's last chunk
FLAG_LAST = 4  # the server-side token loop's last step (its budget): stages arm nothing after it
KNOWN_FLAGS = FLAG_ALL_LOGITS | FLAG_MORE | FLAG_LAST


def _session_bytes(session: str) -> bytes:
    """A session id's 16 bytes: 32 hex digits (``uuid4().hex``, the common case, parsed in C on every
    frame's critical path), else any form ``uuid.UUID`` reads (ValueError if none)."""
    if not session:
        return bytes(16)
    if len(session) == 32:
        with contextlib.suppress(ValueError):
            b = bytes.fromhex(session)
            if len(b) == 16:  # fromhex skips whitespace: fewer bytes means it was not 32 digits
                return b
    return uuid.UUID(hex=session).bytes


def pack_header(h: FrameHeader) -> bytes:
    if len(h.shape) > 4:
        raise ValueError(f"frames carry tensors of at most 4 dims, got shape {h.shape}")
    shape = (*h.shape, *([0] * (4 - len(h.shape))))
    return HEADER.pack(
        MAGIC,
        VERSION,
        h.kind,
        h.flags,
        _session_bytes(h.session),
        h.step,
        h.batch,
        h.seq,
        DTYPE_CODES[h.dtype],
        h.codec,
        h.group_size,
        len(h.shape),
        h.stripes,
        *shape,
        h.payload_len,
    )


def unpack_header(buf: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> FrameHeader:
    """Parse and validate a 64-byte header; ProtocolError says what is wrong."""
    if len(buf) < HEADER.size:
        raise ProtocolError(f"truncated header: {len(buf)} of {HEADER.size} bytes")
    (
        magic,
        version,
        kind,
        flags,
        sess,
        step,
        batch,
        seq,
        dcode,
        codec,
        group,
        ndim,
        stripes,
        d0,
        d1,
        d2,
        d3,
        payload_len,
    ) = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a hyperlane data-plane peer"
        )
    if version != VERSION:
        raise ProtocolError(f"frame version {version} is not supported (this worker speaks {VERSION})")
    if kind not in FrameKind.ALL:
        raise ProtocolError(f"unknown frame kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags {flags:#x} (this worker knows {KNOWN_FLAGS:#x})")
    if dcode not in CODE_DTYPES:
        raise ProtocolError(f"unknown dtype code {dcode}")
    if ndim > 4:
        raise ProtocolError(f"ndim {ndim} > 4")
    if stripes and not (
        2 <= stripes <= MAX_STRIPES and kind in (FrameKind.TENSOR, FrameKind.HELLO, FrameKind.STRIPE)
    ):
        raise ProtocolError(
            f"a {kind} frame split over {stripes} connections (tensor, hello and stripe frames only; 2 to {MAX_STRIPES})"
        )
    if payload_len > max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds the limit of {max_payload}")
    if batch * seq > MAX_TOKENS:
        raise ProtocolError(f"{batch}x{seq} positions exceed the limit of {MAX_TOKENS}")
    shape = (d0, d1, d2, d3)[:ndim]
    if any(d == 0 for d in shape) and kind in (FrameKind.TENSOR, FrameKind.TOKENS):
        raise ProtocolError(f"tensor shape {shape} has a zero dimension")
    return FrameHeader(
        kind,
        bytes(sess).hex(),  # = uuid.UUID(bytes=...).hex, without its Python-level parsing
        step,
        batch,
        seq,
        CODE_DTYPES[dcode],
        codec,
        group,
        shape,
        payload_len,
        flags,
        stripes,
    )


def raw_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize
