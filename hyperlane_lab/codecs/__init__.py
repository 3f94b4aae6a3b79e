"""Wire codecs for activations crossing a pipeline-stage boundary.

``get(name, group_size=64)`` -> a ``Codec``; ``payload = codec.encode(x)`` -> ``EncodedTensor`` (header fields
+ raw bytes); ``codec.decode(payload)`` -> tensor of the original shape and dtype. The receiver rebuilds a
payload from the frame header (codec id, group size, shape, dtype, outliers) plus the body bytes and decodes
it with ``get_by_id(codec_id, group_size)``.

Codecs (wire id): ``fp16`` (1, no quantization), ``int8`` (2), ``int4`` (3), ``int4_outlier`` (4),
``int4_hadamard`` (5), ``int4_asym`` (6: 16 levels from each group's minimum), ``int4_outlier_asym`` (7: both). Id 0 is left to the frame layer's "raw" (the tensor as is, in its own dtype). Byte layouts: ``fp16``, ``intq``, ``outlier`` modules; group layout and padding:
``base``; quantization math and rounding: ``reference``.

Non-finite values: ``encode(x, check_finite=True)`` (default) raises ValueError naming the first NaN/Inf
index. On CUDA the Triton kernels count bad groups in a fused device flag; reading it costs one 4-byte sync.
``check_finite="defer"`` skips that sync: the payload keeps the device flag and ``payload.to_host()`` /
``payload.buffer()`` (which copy to the host anyway) raise. ``check_finite=False`` sends them: quantized
groups holding NaN/Inf get a NaN scale and decode as all-NaN; ``fp16`` passes them through.

Backends: ``backend='auto'`` (default) uses the Triton kernels for CUDA tensors and the pure-torch reference
otherwise; ``'torch'`` / ``'triton'`` force one. Both produce bitwise-identical payloads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hyperlane_lab.codecs.base import Codec, EncodedTensor, GroupLayout, dtype_name
from hyperlane_lab.codecs.fp16 import Fp16Codec
from hyperlane_lab.codecs.intq import IntCodec
from hyperlane_lab.codecs.outlier import OutlierInt4Codec
from hyperlane_lab.registry import Registry

__all__ = [
    "CODECS",
    "CODEC_IDS",
    "Codec",
    "EncodedTensor",
    "GroupLayout",
    "check_frame_payload",
    "decode_frame_payload",
    "get",
    "get_by_id",
    "names",
]

CodecFactory = Callable[[int, str], Codec]

CODECS: Registry[CodecFactory] = Registry("codec")
CODEC_IDS: dict[int, str] = {
    1: "fp16",
    2: "int8",
    3: "int4",
    4: "int4_outlier",
    5: "int4_hadamard",
    6: "int4_asym",
    7: "int4_outlier_asym",
}

CODECS.add("fp16", lambda gs, be: Fp16Codec(group_size=gs, backend=be))
CODECS.add("int8", lambda gs, be: IntCodec("int8", 2, gs, be, bits=8))
CODECS.add("int4", lambda gs, be: IntCodec("int4", 3, gs, be, bits=4))
CODECS.add("int4_outlier", lambda gs, be: OutlierInt4Codec("int4_outlier", 4, gs, be))
CODECS.add("int4_hadamard", lambda gs, be: IntCodec("int4_hadamard", 5, gs, be, bits=4, hadamard=True))
CODECS.add("int4_asym", lambda gs, be: IntCodec("int4_asym", 6, gs, be, bits=4, asymmetric=True))
CODECS.add(
    "int4_outlier_asym", lambda gs, be: OutlierInt4Codec("int4_outlier_asym", 7, gs, be, asymmetric=True)
)


def get(name: str, group_size: int = 64, backend: str = "auto") -> Codec:
    """The codec called ``name``; unknown names raise ValueError listing the valid ones."""
    return CODECS.get(name)(group_size, backend)


def names() -> list[str]:
    return CODECS.names()


def get_by_id(codec_id: int, group_size: int = 64, backend: str = "auto") -> Codec:
    """The codec with wire id ``codec_id`` (as in a frame header); ``group_size`` as in the header."""
    name = CODEC_IDS.get(codec_id)
    if name is None:
        valid = ", ".join(f"{i}={n}" for i, n in sorted(CODEC_IDS.items()))
        raise ValueError(f"unknown codec id {codec_id}; valid ids: {valid}")
    # fp16 headers carry group_size 0; any value builds the same codec
    return get(name, group_size if group_size > 0 else 64, backend)


def _frame_payload(
    codec_id: int,
    group_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype | str,
    payload: memoryview | bytes | torch.Tensor,
    trusted: bool = False,
) -> tuple[Codec, EncodedTensor]:
    codec = get_by_id(codec_id, group_size)
    shape = tuple(int(s) for s in shape)
    enc = EncodedTensor(
        codec=codec.name,
        codec_id=codec.codec_id,
        group_size=codec.group_size,  # == group_size, except fp16 (no groups) which ignores it
        shape=shape,
        dtype=dtype_name(dtype),
        data=payload,
        outliers=codec.payload_outliers(shape),
        trusted=trusted,
    )
    return codec, enc


def check_frame_payload(
    codec_id: int,
    group_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype | str,
    payload: memoryview | bytes | torch.Tensor,
) -> None:
    """Check a frame body against its header fields without decoding it (``Codec.validate``): ValueError
    on an unknown id, a length that does not match, or (outlier codecs) a column index out of range.
    A GPU worker runs this on the host bytes, then decodes a device copy with ``trusted=True``."""
    codec, enc = _frame_payload(codec_id, group_size, shape, dtype, payload)
    codec.validate(enc)


def decode_frame_payload(
    codec_id: int,
    group_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype | str,
    payload: memoryview | bytes | torch.Tensor,
    device: torch.device | str | None = "cpu",
    trusted: bool = False,
) -> torch.Tensor:
    """Decode a frame body from its header fields (codec id, group size, shape, dtype) on ``device``.

    The ``outliers`` field of ``int4_outlier`` is implied by the codec and the shape, so frames need not carry
    it. Raises ValueError on an unknown id or a body whose length does not match the header. ``trusted``:
    the body passed ``check_frame_payload`` already (the checks that would read device memory are skipped).
    """
    codec, enc = _frame_payload(codec_id, group_size, shape, dtype, payload, trusted)
    return codec.decode(enc, device=device)
