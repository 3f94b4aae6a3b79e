"""Wire-mode decode graphs: a frame's bytes in, the next frame's bytes out, inside one CUDA graph.

A worker's decode step used to stage its inputs and fetch its result around the graph replay:
~20 small torch calls (views, copies, events, stream switches) on the host per step, tens of µs
each on a slow host, on the critical path of every pipeline hop. In wire mode the graph itself
holds those copies, so a step on the host is: write the frame's positions (and ids or payload
bytes) into pinned buffers with numpy, replay, record one event.

    graph:  pinned in  --H2D-->  [dequantize, when the frame is int8/int4]  -> layers ->
            [quantize, when the next hop is int8/int4] --D2H--> pinned out

The pinned out buffer holds: the hidden state's bytes (raw), or the codec payload followed by a
4-byte count of groups holding NaN/Inf (the Triton kernels' flag, zeroed inside the graph; outlier codecs
add their side values that are NaN/Inf or beyond fp16), or, on the last stage, the greedy ids and the
non-finite flag (``cuda_decode.greedy_pack``).

Which codecs: raw (id 0), ``fp16`` (id 1) between stages whose dtype is fp16 or bf16 (its payload is
then the raw 16-bit values, plus the NaN/Inf check the codec makes), and the grouped integer codecs
(int8, int4, int4_hadamard, int4_asym, and the outlier codecs where their selection is one Triton kernel:
rows of <= 16,384 values, <= 32 outliers), whose ``encode_into`` / ``decode_from`` write and read buffers of
fixed size with device work only. Other frames keep the staged path (``GraphDecoder.step``). An outlier
frame's column indices are checked on the host before the replay (``IDX_CODECS``). Payload layouts are the
codecs' own (``codecs.intq``, ``codecs.outlier``): the bytes this graph sends decode with
``codecs.decode_frame_payload`` and vice versa, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "IDX_CODECS",
    "WireIO",
    "WireSpec",
    "frame_wire_spec",
    "make_wire_io",
    "wire_codec",
    "wire_in",
    "wire_out",
]

# raw, fp16 (16-bit stages), int8, int4, int4_outlier, int4_hadamard, int4_asym, int4_outlier_asym
WIRE_CODECS = (0, 1, 2, 3, 4, 5, 6, 7)
IDX_CODECS = (4, 7)  # payloads with column indices: checked on the host before a graph scatters by them
FP16 = 1


@dataclass(frozen=True)
class WireSpec:
    """The codecs of a stage's decode frames: in (ignored on the first stage, which takes ids) and
    out (ignored on the last stage, which sends greedy ids). Codec id 0 is raw."""

    in_codec: int = 0
    in_group: int = 0
    out_codec: int = 0
    out_group: int = 0

    def __eq__(self, other: object) -> bool:
        # the worker caches one spec per frame kind, so the same object comes back on every decode step:
        # identity first (a field comparison builds two tuples); the hash stays the fields' (frozen, eq)
        if self is other:
            return True
        if not isinstance(other, WireSpec):
            return NotImplemented
        mine = (self.in_codec, self.in_group, self.out_codec, self.out_group)
        return mine == (other.in_codec, other.in_group, other.out_codec, other.out_group)


def _fused(codec: Any, shape: tuple[int, ...]) -> bool:
    """The codec's device work is fixed kernels for this shape (only the outlier codecs' selection has a limit)."""
    return getattr(codec, "fused", lambda _: True)(shape)  # type: ignore[no-any-return]


def wire_codec(codec_id: int, group_size: int) -> Any:
    """The ``IntCodec`` (or outlier codec) for a wire id (None for raw and fp16, whose payload is the raw
    16-bit values in wire mode); ValueError for codecs wire mode lacks."""
    if codec_id in (0, FP16):
        return None
    if codec_id not in WIRE_CODECS:
        raise ValueError(f"codec id {codec_id} has no wire-mode graph (ids {WIRE_CODECS} do)")
    from hyperlane_lab import codecs

    return codecs.get_by_id(codec_id, group_size or 64, backend="triton")


def frame_wire_spec(
    codec_id: int,
    group_size: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    stage_dtype: torch.dtype,
    first: bool,
    last: bool,
    out_codec: str = "raw",
    out_group: int = 0,
    hidden: int = 0,
) -> tuple[WireSpec, int] | None:
    """For a decode frame (its header's codec id, group size, dtype and shape) reaching a stage
    (its dtype, first/last, the codec name and group of its own hand-off): the wire spec and the
    payload length the frame must have, or None where wire mode does not apply (an outlier codec whose
    selection is not one kernel for this width, a raw or fp16 frame whose dtype is not the stage's, fp16
    with a 32-bit stage, ids sent with a codec). ``hidden``: the stage's output width (default: the frame's last
    dim). ValueError for a group size the codec refuses."""
    out_id = out_g = 0
    if not last and out_codec not in ("raw", "none"):
        from hyperlane_lab import codecs

        c = codecs.get(out_codec, group_size=out_group or 64)
        if c.codec_id not in WIRE_CODECS or (c.codec_id == FP16 and stage_dtype.itemsize != 2):
            return None
        if not _fused(c, (shape[0], hidden or shape[-1])):
            return None
        out_id, out_g = c.codec_id, c.group_size
    raw = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if first:
        return (WireSpec(0, 0, out_id, out_g), raw) if codec_id == 0 else None
    if codec_id not in WIRE_CODECS or (codec_id in (0, FP16) and dtype != stage_dtype):
        return None
    if codec_id == FP16 and stage_dtype.itemsize != 2:
        return None
    c = wire_codec(codec_id, group_size)
    if c is not None and not _fused(c, shape):
        return None
    want = raw if c is None else c.encoded_nbytes(shape, dtype)
    return WireSpec(codec_id, c.group_size if c is not None else 0, out_id, out_g), want


@dataclass
class WireIO:
    """Pinned and device buffers of one wire-mode graph (they live as long as the graph)."""

    spec: WireSpec
    in_host: torch.Tensor | None  # pinned uint8 payload (not on the first stage)
    in_dev: torch.Tensor | None  # its device copy (codec frames; raw frames land in x_in directly)
    in_nbytes: int
    out_dev: torch.Tensor | None  # device uint8 [payload][int32 flag] (codec out)
    out_host: torch.Tensor  # pinned result, see the module docstring
    out_nbytes: int  # payload bytes at the start of out_host
    flag_at: int = 0  # codec out: byte offset of the int32 flag (4-aligned, after the payload)
    in_np: Any = None  # numpy views of the pinned buffers (host writes and reads are numpy)
    out_np: Any = None
    out_ids: Any = None  # last stage: int64 view of out_host ([B + 1]: greedy ids, then the finite flag)

    def payload(self) -> memoryview:
        """The outgoing payload's bytes (valid once the step's event has fired)."""
        return memoryview(self.out_np)[: self.out_nbytes]

    def bad_groups(self) -> int:
        """Codec out: groups (int8/int4) or values (fp16) that held NaN/Inf in this step's result
        (always 0 for raw, which sends what it has)."""
        if self.out_dev is None:
            return 0
        return int(self.out_np[self.flag_at : self.flag_at + 4].view(np.int32)[0])

    def put(self, payload: memoryview) -> None:
        """Copy a frame's payload into the pinned input (length checked by the caller)."""
        np.copyto(self.in_np, np.frombuffer(payload, dtype=np.uint8))


def make_wire_io(
    spec: WireSpec,
    first: bool,
    last: bool,
    x_in: torch.Tensor,
    out: torch.Tensor,
    greedy: torch.Tensor | None,
) -> WireIO:
    """Buffers for a graph whose static input is ``x_in`` ([B,1,H], unused on the first stage) and
    whose result is ``out`` (hidden [B,1,H]) or, on the last stage, ``greedy`` ([B + 1] int64)."""
    in_host = in_dev = None
    in_nbytes = 0
    if not first:
        codec = wire_codec(spec.in_codec, spec.in_group)
        shape, dtype = tuple(x_in.shape), x_in.dtype
        in_nbytes = (
            x_in.numel() * x_in.element_size() if codec is None else codec.encoded_nbytes(shape, dtype)
        )
        # zeros: the capture's warm-up replays read them (padding rows; garbage bytes could be
        # NaN, and a plain attention's 0 * NaN on the trash slot would poison the session)
        in_host = torch.zeros(in_nbytes, dtype=torch.uint8, pin_memory=True)
        if codec is not None:
            in_dev = torch.zeros(in_nbytes, dtype=torch.uint8, device=x_in.device)
    out_dev, flag_at = None, 0
    if last:
        assert greedy is not None
        out_host = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
        out_nbytes = greedy.numel() * greedy.element_size()
    else:
        codec = wire_codec(spec.out_codec, spec.out_group)
        if codec is None and spec.out_codec != FP16:
            out_host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            out_nbytes = out.numel() * out.element_size()
        else:  # a payload and an int32 count of NaN/Inf (groups, or values for fp16)
            raw = out.numel() * out.element_size()
            out_nbytes = raw if codec is None else codec.encoded_nbytes(tuple(out.shape), out.dtype)
            flag_at = -(-out_nbytes // 4) * 4
            out_dev = torch.zeros(flag_at + 4, dtype=torch.uint8, device=out.device)
            out_host = torch.empty(flag_at + 4, dtype=torch.uint8, pin_memory=True)
    io = WireIO(spec, in_host, in_dev, in_nbytes, out_dev, out_host, out_nbytes, flag_at)
    io.in_np = in_host.numpy() if in_host is not None else None
    io.out_np = out_host.view(torch.uint8).reshape(-1).numpy()
    if last:
        io.out_ids = out_host.numpy()
    return io


def wire_in(io: WireIO, x_in: torch.Tensor) -> None:
    """Graph prologue (captured): the frame's payload -> ``x_in``."""
    if io.in_host is None:
        return
    codec = wire_codec(io.spec.in_codec, io.spec.in_group)
    if codec is None:
        x_in.view(-1).view(torch.uint8).copy_(io.in_host, non_blocking=True)
        return
    assert io.in_dev is not None
    io.in_dev.copy_(io.in_host, non_blocking=True)
    cols = x_in.shape[-1]
    codec.decode_from(io.in_dev, x_in.view(x_in.numel() // cols, cols), "triton")


def wire_out(io: WireIO, result: torch.Tensor) -> None:
    """Graph epilogue (captured): ``result`` (hidden, or the last stage's greedy pack) -> pinned out."""
    if io.out_dev is None:
        io.out_host.copy_(result, non_blocking=True)
        return
    flag = io.out_dev[io.flag_at :].view(torch.int32)
    codec = wire_codec(io.spec.out_codec, io.spec.out_group)
    if codec is None:  # fp16 from a 16-bit stage: the values as they are, and the count of NaN/Inf
        io.out_dev[: io.out_nbytes].view(result.dtype).copy_(result.reshape(-1))
        flag.copy_((~torch.isfinite(result)).sum().to(torch.int32).view(1))
    else:
        cols = result.shape[-1]
        flag.zero_()  # the kernels add their bad-group counts to it
        codec.encode_into(
            result.reshape(result.numel() // cols, cols), io.out_dev[: io.out_nbytes], flag, "triton"
        )
    io.out_host.copy_(io.out_dev, non_blocking=True)
