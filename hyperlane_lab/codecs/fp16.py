"""``fp16`` codec: no quantization. Sends the 16-bit values: fp16, or bf16 when the input is bf16 (fp32 input
is rounded to fp16; decode casts back to fp32).

Byte layout: ``numel`` little-endian 16-bit values, row-major. ``group_size`` in the header is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperlane_lab.codecs.base import (
    DTYPES,
    CheckFinite,
    Codec,
    EncodedTensor,
    dtype_name,
    nonfinite_error,
)

__all__ = ["Fp16Codec", "first_nonfinite_index"]


def _wire_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float16


def first_nonfinite_index(x: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf of ``x`` (row-major), or None. Syncs; only used on the error path."""
    flat = (~torch.isfinite(x)).flatten().nonzero()
    if flat.numel() == 0:
        return None
    i = int(flat[0, 0])
    if x.dim() == 0:
        return ()
    return tuple(int(t) for t in torch.unravel_index(torch.tensor(i), tuple(x.shape)))


@dataclass(frozen=True)
class Fp16Codec(Codec):
    name: str = "fp16"
    codec_id: int = 1

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | str = torch.float16) -> int:
        dtype_name(dtype)
        n = 1
        for s in shape:
            n *= int(s)
        return 2 * n

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size", 0)  # no groups: headers carry 0 whatever was asked

    def encode(
        self, x: torch.Tensor, *, check_finite: CheckFinite = True, backend: str | None = None
    ) -> EncodedTensor:
        dname = self._check_input(x)
        wire = torch.empty(tuple(x.shape), dtype=_wire_dtype(dname), device=x.device)
        wire.copy_(x.detach())  # one fresh contiguous buffer: the payload never aliases x
        pending = None
        if check_finite:
            bad = (~torch.isfinite(wire)).sum()  # device scalar, no sync yet
            if check_finite == "defer":
                pending = bad
            elif int(bad.item()) > 0:
                where = first_nonfinite_index(wire)
                extra = (
                    " (after rounding float32 to float16: |x| > 65504 overflows)"
                    if dname == "float32"
                    else ""
                )
                raise nonfinite_error(self.name, tuple(x.shape), f"index {where}", extra)
        return EncodedTensor(
            codec=self.name,
            codec_id=self.codec_id,
            group_size=0,
            shape=tuple(x.shape),
            dtype=dname,
            data=wire.reshape(-1).view(torch.uint8),
            pending_check=pending,
        )

    def decode(
        self,
        payload: EncodedTensor,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        data = self._check_payload(payload)
        wire = data.view(_wire_dtype(payload.dtype)).reshape(payload.shape)
        target = data.device if device is None else torch.device(device)
        return wire.to(device=target, dtype=DTYPES[payload.dtype], copy=True)  # never aliases the payload
