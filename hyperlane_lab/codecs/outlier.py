"""``int4_outlier`` / ``int4_outlier_asym`` codecs: the ``k`` largest-|x| channels of each row travel as fp16 on
the side; the rest of the row (outliers zeroed) is quantized like ``int4`` / ``int4_asym``, so one massive
channel no longer inflates its group's scale.

Byte layout (N groups, R rows, k = min(outliers, H) per row, see ``base``; offsets in bytes; ``h`` = 2N, or
4N for ``int4_outlier_asym``, whose fp16 group minimums follow the scales as in ``int4_asym``):

- ``[0, 2N)``: fp16 group scales (as ``int4``); ``int4_outlier_asym``: ``[2N, 4N)`` fp16 group minimums;
- ``[h, h + 2Rk)``: uint16 column index of each outlier, row after row (needs H <= 65536);
- ``[h + 2Rk, h + 4Rk)``: the outlier values as fp16, same order;
- ``[h + 4Rk, ...)``: packed int4 values of the row with outliers zeroed (as ``int4`` / ``int4_asym``).

Asymmetric groups plus outliers is the most accurate 4-bit variant measured on the bundled model
(bench/RESULTS.md, codec probe): the side channel takes the large channels, the minimum-based levels fit
groups that sit off-centre.

The header field ``outliers`` carries k. Which values go on the side follows one rule on every backend
(``reference.select_outliers``: largest |x| first, ties to the lower column). On the Triton backend, 16-bit
rows of whole power-of-two groups (up to 16,384 values and 32 outliers a row) are encoded by one kernel that
picks, zeroes and quantizes, and decoded by one that dequantizes and puts the outliers back
(``kernels/outlier_quant.py``); other rows of up to 16,384 values (fp32, ragged groups) take the selection
kernel (``kernels/outlier_select.py``) and then the int4 kernels; elsewhere torch selects. A NaN/Inf ranks above every finite value, so it is always selected as
an outlier: it is reported by the finite check and, with ``check_finite=False``, decodes as itself instead of
poisoning a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperlane_lab.codecs._kernels import kernel_module
from hyperlane_lab.codecs.base import EncodedTensor, rows_of
from hyperlane_lab.codecs.intq import IntCodec
from hyperlane_lab.codecs.reference import select_outliers

__all__ = ["OutlierInt4Codec"]

_MAX_COLS = 1 << 16  # column indices are uint16
_FUSED_MAX_COLS, _FUSED_MAX_K = 16384, 32  # kernels/outlier_select.py: MAX_COLS (a row in registers), MAX_K


@dataclass(frozen=True)
class OutlierInt4Codec(IntCodec):
    bits: int = 4
    outliers: int = 8  # channels per row sent as fp16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 4 or self.hadamard:
            raise ValueError("OutlierInt4Codec is int4 without rotation (bits=4, hadamard=False)")
        if self.outliers < 0:
            raise ValueError(f"codec {self.name!r}: outliers per row must be >= 0, got {self.outliers}")

    def payload_outliers(self, shape: tuple[int, ...]) -> int:
        return min(self.outliers, rows_of(tuple(shape))[1])

    def _side_bytes(self, rows: int, cols: int) -> int:
        return 4 * rows * self.payload_outliers((rows, cols))

    def _payload_views(self, buf: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
        """A payload in ``buf`` (uint8) as its sections: (head as int16, outlier columns as int16 bits, outlier
        values as fp16, packed values); the side channel's [R * k] each, row by row."""
        head, side, _ = self._sections(rows, cols)
        mid = head + side // 2
        return (
            buf[:head].view(torch.int16),
            buf[head:mid].view(torch.int16),
            buf[mid : head + side].view(torch.float16),
            buf[head + side :],
        )

    def _split_head(self, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, minimums or None) of an int16 head (``int4_outlier_asym``: the minimums follow)."""
        if not self.asymmetric:
            return head, None
        n = head.numel() // 2
        return head[:n], head[n:]

    def fused(self, shape: tuple[int, ...]) -> bool:
        """The selection runs in Triton kernels for this shape (rows of <= 16,384 values, <= 32 outliers): device
        work only, which a CUDA graph can hold (``models/decode_wire.py`` asks)."""
        return rows_of(tuple(shape))[1] <= _FUSED_MAX_COLS and self.payload_outliers(shape) <= _FUSED_MAX_K

    def _one_kernel(self, cols: int, k: int, be: str, x: torch.Tensor | None = None) -> bool:
        """The payload of rows of ``cols`` values is written (and read) by one kernel each way
        (``kernels/outlier_quant.py``: rows of whole power-of-two groups; to encode, ``x``'s 16-bit words)."""
        return be == "triton" and kernel_module("outlier_quant").applies(cols, self.group_size, k, x)

    def _write(self, x2d: torch.Tensor, buf: torch.Tensor, flag: torch.Tensor | None, be: str) -> None:
        rows, cols = x2d.shape
        if cols > _MAX_COLS:
            raise ValueError(
                f"{self.name} indexes columns with uint16: last dim {cols} > {_MAX_COLS}; use int4"
            )
        k = self.payload_outliers((rows, cols))
        head, idx, vals, body = self._payload_views(buf, rows, cols)  # idx: uint16 bits
        if k and self._one_kernel(cols, k, be, x2d):
            scales, mins = self._split_head(head)
            kernel_module("outlier_quant").encode(
                x2d, k, self.group_size, scales, mins, idx, vals, body, flag
            )
            return
        if not k:
            rest = x2d
        elif be == "triton" and self.fused((rows, cols)):
            rest = torch.empty_like(x2d)
            kernel_module("outlier_select").select(x2d, k, idx, vals, rest)
        else:
            i64, v16, rest = select_outliers(x2d, k)  # rest: fresh [R, H], outliers zeroed
            idx.copy_(i64.to(torch.int16).flatten())
            vals.copy_(v16.flatten())
        if k and flag is not None:
            flag.add_((~torch.isfinite(vals)).sum().to(torch.int32))  # an outlier beyond fp16, or NaN/Inf
        self._quantize_payload(rest, buf, flag, be)

    def grouped_rows(self, x2d: torch.Tensor) -> torch.Tensor | None:
        k = self.payload_outliers(tuple(x2d.shape))
        return select_outliers(x2d, k)[2] if k else None

    def decode_from(self, buf: torch.Tensor, out2d: torch.Tensor, backend: str = "triton") -> None:
        rows, cols = out2d.shape
        k = self.payload_outliers((rows, cols))
        head, idx, vals, body = self._payload_views(buf, rows, cols)
        if k and self._one_kernel(cols, k, backend):
            scales, mins = self._split_head(head)
            kernel_module("outlier_quant").decode(scales, mins, idx, vals, body, out2d, self.group_size, k)
            return
        super().decode_from(buf, out2d, backend)
        if k:
            out2d.scatter_(
                1, (idx.to(torch.int64) & 0xFFFF).view(rows, k), vals.view(rows, k).to(out2d.dtype)
            )

    def validate(self, payload: EncodedTensor) -> torch.Tensor:
        data = self._check_payload(payload)
        rows, cols = rows_of(tuple(payload.shape))
        k = self.payload_outliers(tuple(payload.shape))
        if k and rows:  # where the bytes are (host, usually): a bad index must not reach a device scatter
            top = int((self._payload_views(data, rows, cols)[1].to(torch.int32) & 0xFFFF).max())
            if top >= cols:
                raise ValueError(
                    f"corrupted {self.name} payload: outlier column {top} >= last dim {cols}; "
                    "the frame body is damaged"
                )
        return data
