"""Grouped integer codecs: symmetric ``int8``, ``int4`` and ``int4_hadamard``; asymmetric ``int4_asym``.

Byte layout of the payload (N groups, see ``base``; offsets in bytes):

- ``[0, 2N)``: one fp16 scale per group (NaN marks a group that held NaN/Inf, see ``reference``);
- ``int4_asym`` only: ``[2N, 4N)``: one fp16 minimum per group; its values follow from ``4N`` on;
- ``int8``: ``[2N, 2N + N*gs)``: int8 values (two's complement), group after group, padding included;
- ``int4`` / ``int4_hadamard``: ``[2N, 2N + N*gs/2)``: packed nibbles (``q + 8``; element 2k low nibble,
  2k+1 high nibble). ``int4_hadamard`` quantizes the Walsh-Hadamard rotation of each group and rotates back
  after dequantizing (the rotation spreads an outlier over the group; gs must be a power of two).
  ``int4_asym`` packs ``q`` (0..15, levels ``m + q*s`` from the group's minimum ``m`` up) the same way.

Quantization math and rounding (round-half-to-even): ``hyperlane_lab.codecs.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hyperlane_lab.codecs import reference as ref
from hyperlane_lab.codecs._kernels import kernel_module
from hyperlane_lab.codecs.base import (
    DTYPES,
    CheckFinite,
    Codec,
    EncodedTensor,
    dtype_name,
    nonfinite_error,
    resolve_backend,
    rows_of,
)
from hyperlane_lab.codecs.fp16 import first_nonfinite_index

__all__ = ["IntCodec", "range_error"]


def range_error(
    codec: Codec,
    x: torch.Tensor,
    qmax: int,
    where_rotated: bool = False,
    quantized: torch.Tensor | None = None,
) -> ValueError:
    """The error raised for a tensor whose bad groups hold NaN/Inf or exceed the fp16 range of the
    scales (and, asymmetric, of the minimums); ``quantized``: what was grouped, if not ``x`` (the
    outlier codecs quantize ``x`` with its outliers zeroed)."""
    shape = tuple(x.shape)
    where = first_nonfinite_index(x)
    if where is not None:
        return nonfinite_error(codec.name, shape, f"index {where}")
    flat = int(x.detach().abs().flatten().argmax())
    idx = tuple(int(t) for t in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()
    value = float(x.flatten()[flat])
    if quantized is not None and abs(value) > 65504:  # each row's largest |x| is an outlier, sent as fp16
        return ValueError(
            f"activation value {value:.4g} at index {idx} is beyond fp16's 65504: the "
            f"{codec.name!r} codec sends each row's largest values as fp16; use int8 for this boundary "
            "or rescale the activations"
        )
    if getattr(codec, "asymmetric", False):
        return _asym_range_error(codec, x if quantized is None else quantized)
    rotated = " after the Hadamard rotation (up to sqrt(group_size) x larger)" if where_rotated else ""
    return ValueError(
        f"activation value {value:.4g} at index {idx} is out of the {codec.name!r} codec's range{rotated}: "
        f"fp16 scales allow |x| <= {65504 * qmax:.4g}; use the fp16 codec for this boundary "
        "or rescale the activations"
    )


def _asym_range_error(codec: Codec, q: torch.Tensor) -> ValueError:
    """Names the first group an asymmetric codec cannot represent, with the limits it broke."""
    rows, cols = rows_of(tuple(q.shape))
    gs = codec.group_size
    v = ref.grouped(q.detach().reshape(rows, cols).float().cpu(), gs)
    bad = ref.asym_group_params(v)[3].nonzero()
    g = int(bad[0, 0]) if bad.numel() else 0
    row, gi = divmod(g, -(-cols // gs))
    c0 = gi * gs
    return ValueError(
        f"row {row}, columns {c0}..{min(c0 + gs, cols) - 1} (min {float(v[g].min()):.4g}, max "
        f"{float(v[g].max()):.4g}) are out of the {codec.name!r} codec's range: its fp16 group minimum "
        f"needs min >= -65504 and its fp16 scale needs max - min <= {15 * 65504}; use int8 or fp16 "
        "for this boundary or rescale the activations"
    )


@dataclass(frozen=True)
class IntCodec(Codec):
    bits: int = 8
    hadamard: bool = False
    asymmetric: bool = False  # 4 bits only: levels from the group's minimum (an fp16 minimum per group)

    def __post_init__(self) -> None:
        gs = self.group_size
        if self.bits not in ref.QMAX:
            raise ValueError(f"IntCodec bits must be 8 or 4, got {self.bits}")
        if not isinstance(gs, int) or gs < 1 or gs > 4096:
            raise ValueError(f"codec {self.name!r}: group_size must be an int in [1, 4096], got {gs!r}")
        if self.bits == 4 and gs % 2:
            raise ValueError(
                f"codec {self.name!r} packs two values per byte: group_size must be even, got {gs}"
            )
        if self.hadamard and (self.bits != 4 or gs < 2 or gs & (gs - 1)):
            raise ValueError(f"codec {self.name!r} needs a power-of-two group_size >= 2, got {gs}")
        if self.asymmetric and (self.bits != 4 or self.hadamard):
            raise ValueError(f"codec {self.name!r}: asymmetric groups are int4 without rotation")

    @property
    def qmax(self) -> int:
        """The largest level: symmetric groups fit |x| <= 65504 * qmax (asymmetric: ``_asym_range_error``)."""
        return ref.QMAX[self.bits]

    def head_bytes(self, n_groups: int) -> int:
        """Bytes of the per-group section at the start of a payload (scales, and minimums if asymmetric)."""
        return (4 if self.asymmetric else 2) * n_groups

    def _value_bytes(self, n_groups: int) -> int:
        return n_groups * self.group_size * self.bits // 8

    def _sections(self, rows: int, cols: int) -> tuple[int, int, int]:
        """Bytes of a ``[rows, cols]`` payload's sections: (per-group head, side channel, values)."""
        n = rows * -(-cols // self.group_size)  # GroupLayout(rows, cols, gs).n_groups, without the object
        return self.head_bytes(n), self._side_bytes(rows, cols), self._value_bytes(n)

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | str = torch.float16) -> int:
        dtype_name(dtype)
        return sum(self._sections(*rows_of(tuple(shape))))

    # ---------------------------------------------------------------- quantize / dequantize (2-D)

    def _quantize_into(
        self, x2d: torch.Tensor, head: torch.Tensor, body: torch.Tensor, be: str, flag: Any
    ) -> Any:
        """Fill the per-group (``head``: int16 scales, then minimums if asymmetric) and value sections of a
        payload from ``x2d [R, H]``; returns a device count of bad groups (or None when not asked for)."""
        gs = self.group_size
        if self.asymmetric:
            n = head.numel() // 2
            if be == "torch":
                bits, mbits, vals = ref.quantize_int4_asym(x2d, gs)
                head[:n].copy_(bits)
                head[n:].copy_(mbits)
                body.copy_(vals)
                return (bits == ref.NAN16_BITS).sum() if flag is not None else None
            kernel_module("quant_int4_asym").quantize(x2d, head[:n], head[n:], body, gs, flag)
            return flag
        scales = head
        if be == "torch":
            if self.bits == 8:
                bits, vals = ref.quantize_int8(x2d, gs)
                body.view(torch.int8).copy_(vals)
            else:
                bits, vals = ref.quantize_int4(x2d, gs, self.hadamard)
                body.copy_(vals)
            scales.copy_(bits)
            return (bits == ref.NAN16_BITS).sum() if flag is not None else None
        if self.bits == 8:
            kernel_module("quant_int8").quantize(x2d, scales, body.view(torch.int8), gs, flag)
        else:
            kernel_module("quant_int4").quantize(x2d, scales, body, gs, self.hadamard, flag)
        return flag

    def _dequantize_into(self, head: torch.Tensor, body: torch.Tensor, out2d: torch.Tensor, be: str) -> None:
        gs = self.group_size
        rows, cols = out2d.shape
        if self.asymmetric:
            n = head.numel() // 2
            if be == "torch":
                out2d.copy_(ref.dequantize_int4_asym(head[:n], head[n:], body, rows, cols, gs, out2d.dtype))
            else:
                kernel_module("quant_int4_asym").dequantize(head[:n], head[n:], body, out2d, gs)
            return
        scales = head
        if be == "torch":
            if self.bits == 8:
                res = ref.dequantize_int8(scales, body.view(torch.int8), rows, cols, gs, out2d.dtype)
            else:
                res = ref.dequantize_int4(scales, body, rows, cols, gs, out2d.dtype, self.hadamard)
            out2d.copy_(res)
        elif self.bits == 8:
            kernel_module("quant_int8").dequantize(scales, body.view(torch.int8), out2d, gs)
        else:
            kernel_module("quant_int4").dequantize(scales, body, out2d, gs, self.hadamard)

    # ---------------------------------------------------------------- whole payloads in fixed buffers

    def _side_bytes(self, rows: int, cols: int) -> int:
        """Bytes between the per-group head and the values (the outlier codecs' side channel)."""
        return 0

    def _quantize_payload(
        self, grouped: torch.Tensor, buf: torch.Tensor, flag: torch.Tensor | None, be: str
    ) -> None:
        """Quantize ``grouped [R, H]`` into the head and value sections of ``buf`` (the side channel between
        them is the caller's); bad groups are added to ``flag`` when given."""
        head, side, _ = self._sections(*grouped.shape)
        count = self._quantize_into(grouped, buf[:head].view(torch.int16), buf[head + side :], be, flag)
        if be == "torch" and flag is not None:  # the reference returns its count
            flag.add_(count.to(torch.int32))

    def _write(self, x2d: torch.Tensor, buf: torch.Tensor, flag: torch.Tensor | None, be: str) -> None:
        """``encode_into`` with an optional flag."""
        self._quantize_payload(x2d, buf, flag, be)

    def grouped_rows(self, x2d: torch.Tensor) -> torch.Tensor | None:
        """What the groups of ``x2d [R, H]`` are formed from where it is not ``x2d`` itself (the outlier
        codecs: the rows without their outliers), for the range error; None here."""
        return None

    def encode_into(
        self, x2d: torch.Tensor, buf: torch.Tensor, flag: torch.Tensor, backend: str = "triton"
    ) -> None:
        """Write the payload of ``x2d [R, H]`` (contiguous) into ``buf`` (uint8, ``encoded_nbytes`` long, the layout
        of ``encode``) and add its number of bad groups (NaN/Inf, out of range) to ``flag`` (int32 [1]). With
        the Triton backend: device work only (no host sync, no output allocation), so a CUDA graph can hold it
        (``models/decode_wire.py``)."""
        self._write(x2d, buf, flag, backend)

    def decode_from(self, buf: torch.Tensor, out2d: torch.Tensor, backend: str = "triton") -> None:
        """Fill ``out2d [R, H]`` from a payload in ``buf`` (uint8, the layout of ``encode``); the inverse of
        ``encode_into``, device work only. The bytes must have passed ``validate``."""
        head, side, _ = self._sections(*out2d.shape)
        self._dequantize_into(buf[:head].view(torch.int16), buf[head + side :], out2d, backend)

    # ---------------------------------------------------------------- Codec API

    def encode(
        self, x: torch.Tensor, *, check_finite: CheckFinite = True, backend: str | None = None
    ) -> EncodedTensor:
        """Kept lean: at decode size (1 x 4096) every view and allocation here is a visible share of the call."""
        dname = self._check_input(x)
        shape = tuple(x.shape)
        rows, cols = rows_of(shape)
        x2d = x.detach() if x.requires_grad else x
        if x2d.dim() != 2:
            x2d = x2d.reshape(rows, cols)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        data = torch.empty(sum(self._sections(rows, cols)), dtype=torch.uint8, device=x.device)
        # the kernels accumulate into the flag, so it must start at 0
        flag = torch.zeros(1, dtype=torch.int32, device=x.device) if check_finite else None
        self._write(x2d, data, flag, resolve_backend(backend or self.backend, x2d))
        if check_finite is True and int(flag.item()) > 0:  # type: ignore[union-attr]
            raise range_error(self, x, self.qmax, self.hadamard, quantized=self.grouped_rows(x2d))
        return EncodedTensor(
            codec=self.name,
            codec_id=self.codec_id,
            group_size=self.group_size,
            shape=shape,
            dtype=dname,
            data=data,
            outliers=self.payload_outliers(shape),
            pending_check=flag if check_finite == "defer" else None,
        )

    def decode(
        self,
        payload: EncodedTensor,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        # a trusted payload passed ``validate`` where it arrived: only the cheap header checks again
        data = self._check_payload(payload) if payload.trusted else self.validate(payload)
        if device is not None:
            data = data.to(device)
        rows, cols = rows_of(payload.shape)
        out2d = torch.empty((rows, cols), dtype=DTYPES[payload.dtype], device=data.device)
        self.decode_from(data, out2d, resolve_backend(backend or self.backend, data))
        return out2d.reshape(payload.shape)
