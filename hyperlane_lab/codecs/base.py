"""Wire payload (``EncodedTensor``), the ``Codec`` interface and the group layout shared by all codecs.

Group layout: a tensor of shape ``[..., H]`` is viewed as ``R = numel // H`` rows of ``H`` values (a 0-d
tensor is one row of one value). Each row is cut into ``G = ceil(H / group_size)`` groups; the last group of
a row is zero-padded to ``group_size`` values, and the padding is quantized and sent (it decodes to ~0 and is
dropped by the receiver). ``N = R * G`` groups in all, numbered row-major (row, then group within the row).

All multi-byte wire values are little-endian.
"""

from __future__ import annotations

import math
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

__all__ = [
    "DTYPES",
    "Backend",
    "CheckFinite",
    "Codec",
    "EncodedTensor",
    "GroupLayout",
    "as_uint8_tensor",
    "dtype_name",
    "nonfinite_error",
    "resolve_backend",
    "rows_of",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("hyperlane_lab.codecs assumes a little-endian host (the wire format is little-endian)")

Backend = Literal["auto", "torch", "triton"]
CheckFinite = bool | Literal["defer"]

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name (``float16``/``bfloat16``/``float32``) of a supported activation dtype."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return name
    else:
        for name, dt in DTYPES.items():
            if dt == dtype:
                return name
    raise ValueError(
        f"unsupported activation dtype {dtype!r}; codecs accept {', '.join(DTYPES)} (cast the tensor first)"
    )


@dataclass(frozen=True)
class GroupLayout:
    """Rows x groups view of a tensor (see the module docstring)."""

    rows: int
    cols: int  # H, the last dim
    group_size: int

    @property
    def groups_per_row(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def n_groups(self) -> int:
        return self.rows * self.groups_per_row

    @property
    def padded_cols(self) -> int:
        return self.groups_per_row * self.group_size

    @staticmethod
    def of(shape: tuple[int, ...], group_size: int) -> GroupLayout:
        rows, cols = rows_of(shape)
        return GroupLayout(rows, cols, group_size)


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(R, H)`` of a shape: H is the last dim (1 for a 0-d tensor), R the product of the others."""
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded activation: header fields + raw payload bytes.

    The receiver rebuilds it from the frame header (codec id, group size, shape, dtype, outliers) and the raw
    bytes, then calls ``codecs.get_by_id(codec_id, group_size).decode(payload)``.
    """

    codec: str
    codec_id: int
    group_size: int  # 0 for codecs without groups (fp16)
    shape: tuple[int, ...]
    dtype: str  # dtype of the original tensor; decode restores it
    data: torch.Tensor | memoryview | bytes  # 1-D contiguous uint8 tensor (any device), or host bytes
    outliers: int = 0  # int4_outlier: outlier channels sent per row; 0 otherwise
    # Device-side count of non-finite groups, still to be checked (encode(check_finite="defer")).
    pending_check: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # The bytes were checked against the header where they arrived (``Codec.validate`` on the host):
    # decode skips the checks that would read device memory (and wait for the device). Only for bytes
    # that passed ``validate``: an unchecked outlier column could make a device scatter assert.
    trusted: bool = field(default=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.data.numel() if isinstance(self.data, torch.Tensor) else memoryview(self.data).nbytes

    def check_finite(self) -> None:
        """Raise the deferred NaN/Inf error, if any (syncs with the device that encoded the payload)."""
        if self.pending_check is not None and int(self.pending_check.item()) > 0:
            extra = " (or |x| beyond the codec's fp16-scale range)" if self.group_size else ""
            raise nonfinite_error(self.codec, self.shape, self._first_bad_location(), extra)

    def to_host(self) -> EncodedTensor:
        """Same payload with ``data`` as a CPU uint8 tensor; runs the deferred finite check first."""
        self.check_finite()
        data = as_uint8_tensor(self.data)
        if data.device.type != "cpu":
            data = data.cpu()
        return replace(self, data=data, pending_check=None)

    def buffer(self) -> memoryview:
        """Host bytes of the payload (zero-copy when ``data`` is already on the host), for ``sendall``."""
        data = self.to_host().data
        assert isinstance(data, torch.Tensor)
        return data.numpy().data.cast("B")

    def _first_bad_location(self) -> str:
        data = as_uint8_tensor(self.data).cpu()
        if self.group_size == 0:  # fp16 codec: raw 16-bit values
            vals = data.view(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16).float()
            idx = int((~torch.isfinite(vals)).nonzero()[0, 0])
            return f"flat index {idx}"
        from hyperlane_lab.codecs import get_by_id  # the payload's own codec knows its layout

        layout = GroupLayout.of(self.shape, self.group_size)
        n, rows, k = layout.n_groups, layout.rows, self.outliers
        head = get_by_id(self.codec_id, self.group_size).head_bytes(n)  # type: ignore[attr-defined]
        bad_groups = torch.isnan(data[: 2 * n].view(torch.float16)).nonzero()
        if bad_groups.numel() == 0:  # outlier codecs: the NaN/Inf went to the fp16 outlier values
            outl = data[head + 2 * rows * k : head + 4 * rows * k].view(torch.float16)
            bad = (~torch.isfinite(outl)).nonzero()
            return f"row {int(bad[0, 0]) // k}" if bad.numel() else "an unknown position"
        row, gi = divmod(int(bad_groups[0, 0]), layout.groups_per_row)
        c0 = gi * self.group_size
        return f"row {row}, columns {c0}..{min(c0 + self.group_size, layout.cols) - 1}"


def as_uint8_tensor(data: torch.Tensor | memoryview | bytes | bytearray) -> torch.Tensor:
    """A flat uint8 tensor over the payload bytes (no copy unless needed for 2-byte alignment)."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
            raise ValueError(
                f"payload data must be a 1-D contiguous uint8 tensor, got {data.dtype} of shape "
                f"{tuple(data.shape)}; use tensor.contiguous().view(torch.uint8).flatten()"
            )
        t = data
    else:
        mv = memoryview(data).cast("B")
        if mv.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # read-only buffers warn; the codecs never write into them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mv, dtype=torch.uint8)
    if t.numel() and t.data_ptr() % 2:  # fp16 scales are read as int16: keep them aligned
        t = t.clone()
    return t


def nonfinite_error(codec: str, shape: tuple[int, ...], where: str, extra: str = "") -> ValueError:
    return ValueError(
        f"activation contains NaN/Inf at {where} (tensor shape {tuple(shape)}, codec {codec!r}){extra}; "
        "the stage upstream produced non-finite values - check that stage (fp16 overflow? try bfloat16 "
        "or float32), or pass check_finite=False to send them anyway (quantized groups then decode as NaN)"
    )


def resolve_backend(backend: str, tensor: torch.Tensor) -> Literal["torch", "triton"]:
    """'auto' -> Triton for CUDA tensors (when Triton imports), torch otherwise."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return "triton"
    if backend != "auto":
        raise ValueError(f"unknown codec backend {backend!r}; use 'auto', 'torch' or 'triton'")
    if tensor.is_cuda and _triton_available():
        return "triton"
    return "torch"


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


@dataclass(frozen=True)
class Codec(ABC):
    """Encodes activations into an ``EncodedTensor`` and back. Stateless; safe to share between threads."""

    name: str
    codec_id: int
    group_size: int = 64
    backend: str = "auto"  # default backend of encode/decode: 'auto' | 'torch' | 'triton'

    @abstractmethod
    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype | str = torch.float16) -> int:
        """Exact payload size in bytes for a tensor of ``shape``/``dtype``."""

    @abstractmethod
    def encode(
        self, x: torch.Tensor, *, check_finite: CheckFinite = True, backend: str | None = None
    ) -> EncodedTensor:
        """Encode ``x``; the payload's ``data`` lives on ``x``'s device."""

    @abstractmethod
    def decode(
        self,
        payload: EncodedTensor,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Tensor of the payload's shape and dtype on ``device`` (default: where the payload bytes are)."""

    def payload_outliers(self, shape: tuple[int, ...]) -> int:
        """Value of ``EncodedTensor.outliers`` this codec writes for ``shape``."""
        return 0

    def ratio_for(self, shape: tuple[int, ...]) -> float:
        """fp16 bytes / encoded bytes for ``shape``."""
        return 2 * math.prod(shape) / max(1, self.encoded_nbytes(shape))

    @property
    def ratio(self) -> float:
        """Compression vs fp16 for one row of a 4096-wide hidden state (a typical decode step)."""
        return self.ratio_for((1, 4096))

    # ---------------------------------------------------------------- shared checks

    def _check_input(self, x: torch.Tensor) -> str:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"codec {self.name!r} encodes torch tensors, got {type(x).__name__}")
        return dtype_name(x.dtype)

    def validate(self, payload: EncodedTensor) -> torch.Tensor:
        """Check a payload against this codec and its header fields without decoding it: ValueError
        saying what is wrong (codec, group size, outliers, byte length; outlier codecs also check
        their column indices). Returns the bytes as a uint8 tensor. Run it where the bytes are
        (host) before decoding them elsewhere with ``trusted=True``."""
        return self._check_payload(payload)

    def _check_payload(self, payload: EncodedTensor) -> torch.Tensor:
        """Validate header vs this codec and the byte length; return the data as a uint8 tensor."""
        if payload.codec_id != self.codec_id or payload.codec != self.name:
            raise ValueError(
                f"payload was encoded by codec {payload.codec!r} (id {payload.codec_id}), not {self.name!r} "
                f"(id {self.codec_id}); decode it with codecs.get_by_id({payload.codec_id}, group_size)"
            )
        expected_gs = self.group_size
        if payload.group_size != expected_gs:
            raise ValueError(
                f"payload group_size {payload.group_size} != codec {self.name!r} group_size {expected_gs}; "
                f"build the codec with codecs.get({self.name!r}, group_size={payload.group_size})"
            )
        dtype_name(payload.dtype)
        shape = tuple(int(s) for s in payload.shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"payload shape {shape} has a negative dim")
        want_outliers = self.payload_outliers(shape)
        if payload.outliers != want_outliers:
            raise ValueError(
                f"payload declares {payload.outliers} outliers per row, codec {self.name!r} expects "
                f"{want_outliers} for shape {shape}; the header is corrupted or the codecs differ"
            )
        data = as_uint8_tensor(payload.data)
        expected = self.encoded_nbytes(shape, payload.dtype)
        if data.numel() != expected:
            raise ValueError(
                f"corrupted {self.name!r} payload for shape {shape} (group_size {payload.group_size}): "
                f"expected {expected} bytes, got {data.numel()}; the frame was truncated or its header "
                "does not match its body"
            )
        return data
