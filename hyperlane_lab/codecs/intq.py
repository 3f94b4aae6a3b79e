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
    GroupLayout,
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

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | str = torch.float16) -> int:
        dtype_name(dtype)
        n = GroupLayout.of(tuple(shape), self.group_size).n_groups
        return self.head_bytes(n) + self._value_bytes(n)

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

    def encode_into(
        self, x2d: torch.Tensor, buf: torch.Tensor, flag: torch.Tensor, backend: str = "triton"
    ) -> None:
        """Write the payload of ``x2d [R, H]`` (contiguous) into ``buf`` (uint8, ``encoded_nbytes`` long, the layout
        of ``encode``) and add its number of bad groups (NaN/Inf, out of range) to ``flag`` (int32 [1]). With
        the Triton backend: device work only (no host sync, no output allocation), so a CUDA graph can hold it
        (``models/decode_wire.py``)."""
        rows, cols = x2d.shape
        n = rows * -(-cols // self.group_size)
        head = self.head_bytes(n)
        count = self._quantize_into(x2d, buf[:head].view(torch.int16), buf[head:], backend, flag)
        if backend == "torch":  # the reference returns its count
            flag.add_(count.to(torch.int32))

    def decode_from(self, buf: torch.Tensor, out2d: torch.Tensor, backend: str = "triton") -> None:
        """Fill ``out2d [R, H]`` from a payload in ``buf`` (uint8, the layout of ``encode``); the inverse of
        ``encode_into``, device work only. The bytes must have passed ``validate``."""
        rows, cols = out2d.shape
        n = rows * -(-cols // self.group_size)
        head = self.head_bytes(n)
        self._dequantize_into(buf[:head].view(torch.int16), buf[head:], out2d, backend)

    # ---------------------------------------------------------------- Codec API

    def _encode_sections(
        self, x: torch.Tensor, check_finite: CheckFinite, backend: str | None, extra_bytes: int = 0
    ) -> tuple[torch.Tensor, Any, int]:
        """Quantize ``x`` into a fresh buffer ``[head][extra_bytes][values]`` (head: scales, and minimums if
        asymmetric; the extra section is left for the caller to fill).

        Returns (buffer, device count of bad groups or None, number of groups N). Kept lean: at decode size
        (1 x 4096) every view and allocation here is a visible share of the call.
        """
        rows, cols = rows_of(tuple(x.shape))
        n = rows * -(-cols // self.group_size)  # GroupLayout(rows, cols, gs).n_groups
        be = resolve_backend(backend or self.backend, x)
        head = self.head_bytes(n)
        data = torch.empty(head + extra_bytes + self._value_bytes(n), dtype=torch.uint8, device=x.device)
        x2d = x.detach() if x.requires_grad else x
        if x2d.dim() != 2:
            x2d = x2d.reshape(rows, cols)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        # the kernel accumulates into the flag, so it must start at 0
        flag = torch.zeros(1, dtype=torch.int32, device=x.device) if check_finite else None
        count = self._quantize_into(x2d, data[:head].view(torch.int16), data[head + extra_bytes :], be, flag)
        return data, count, n

    def encode(
        self, x: torch.Tensor, *, check_finite: CheckFinite = True, backend: str | None = None
    ) -> EncodedTensor:
        dname = self._check_input(x)
        data, count, _ = self._encode_sections(x, check_finite, backend)
        if check_finite is True and int(count.item()) > 0:
            raise range_error(self, x, self.qmax, self.hadamard)
        return EncodedTensor(
            codec=self.name,
            codec_id=self.codec_id,
            group_size=self.group_size,
            shape=tuple(x.shape),
            dtype=dname,
            data=data,
            pending_check=count if check_finite == "defer" else None,
        )

    def _decode_sections(
        self,
        payload: EncodedTensor,
        device: torch.device | str | None,
        backend: str | None,
        extra_bytes: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize a payload ``[head][extra_bytes][values]`` -> (out [R, H], extra section view)."""
        data = self._check_payload(payload)
        if device is not None:
            data = data.to(device)
        rows, cols = rows_of(payload.shape)
        n = GroupLayout(rows, cols, self.group_size).n_groups
        be = resolve_backend(backend or self.backend, data)
        out2d = torch.empty((rows, cols), dtype=DTYPES[payload.dtype], device=data.device)
        head = self.head_bytes(n)
        self._dequantize_into(data[:head].view(torch.int16), data[head + extra_bytes :], out2d, be)
        return out2d, data[head : head + extra_bytes]

    def decode(
        self,
        payload: EncodedTensor,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        out2d, _ = self._decode_sections(payload, device, backend)
        return out2d.reshape(payload.shape)
