"""Tensors <-> frame payloads. Codec 0 (``raw``) sends the tensor as is; other codec ids come from
``hyperlane_lab.codecs`` (int8, int4, ...), which also validates payload lengths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.frame import FrameHeader, raw_nbytes

__all__ = ["RAW", "EncodedPayload", "decode_payload", "encode_tensor", "tensor_bytes"]

RAW = 0


@dataclass
class EncodedPayload:
    dtype: torch.dtype  # dtype of the decoded tensor
    codec: int
    group_size: int
    shape: tuple[int, ...]
    parts: list[memoryview]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def encode_tensor(t: torch.Tensor, codec: str = "raw", group_size: int = 0) -> EncodedPayload:
    if codec in ("raw", "none"):
        return EncodedPayload(t.dtype, RAW, 0, tuple(t.shape), [tensor_bytes(t)])
    from hyperlane_lab import codecs

    c = codecs.get(codec, group_size=group_size or 64)
    enc = c.encode(t)
    return EncodedPayload(t.dtype, c.codec_id, c.group_size, tuple(t.shape), [enc.buffer()])


def decode_payload(h: FrameHeader, payload: memoryview, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rebuild the tensor of a TENSOR/TOKENS frame; ProtocolError if the length doesn't match."""
    if h.codec == RAW:
        want = raw_nbytes(h.shape, h.dtype)
        if len(payload) != want:
            raise ProtocolError(
                f"payload is {len(payload)} bytes but shape {h.shape} of {h.dtype} needs {want}"
            )
        t = (
            torch.frombuffer(payload, dtype=h.dtype).view(h.shape)
            if want
            else torch.empty(h.shape, dtype=h.dtype)
        )
        return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
    from hyperlane_lab import codecs

    try:
        return codecs.decode_frame_payload(h.codec, h.group_size, h.shape, h.dtype, payload, device)
    except ValueError as e:
        raise ProtocolError(str(e)) from e
