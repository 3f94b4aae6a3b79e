"""Error of each codec on real activations, to choose between codecs (e.g. int4_outlier vs int4_hadamard).

``measure_error(x)`` round-trips ``x`` through each codec and compares with ``x`` in float64;
``error_table(results)`` renders a markdown table. Feed it hidden states captured at a stage boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from hyperlane_lab.codecs import get, names

__all__ = ["CodecError", "error_table", "measure_error"]


@dataclass(frozen=True)
class CodecError:
    """Round-trip error of one codec on one tensor (all errors vs the input in float64)."""

    codec: str
    group_size: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # payload bytes
    ratio: float  # fp16 bytes / payload bytes
    rel_l2: float  # ||x - y|| / ||x||
    max_abs: float  # max |x - y|
    mean_abs: float  # mean |x - y|
    snr_db: float  # 20 log10(||x|| / ||x - y||); inf when exact
    cosine: float  # mean over rows of cos(x_row, y_row)


def measure_error(
    x: torch.Tensor,
    codecs: Sequence[str] | None = None,
    group_size: int = 64,
    backend: str = "auto",
) -> list[CodecError]:
    """Round-trip ``x`` (any shape ``[..., H]``, finite) through each codec (default: all registered)."""
    x = x.detach()
    ref = x.to(torch.float64)
    rows = ref.reshape(-1, ref.shape[-1]) if ref.dim() else ref.reshape(1, 1)
    norm = float(ref.norm())
    results = []
    for name in codecs or names():
        codec = get(name, group_size, backend)
        payload = codec.encode(x)
        y = codec.decode(payload).to(torch.float64)
        err = (y - ref).abs()
        err_norm = float(err.norm())
        y_rows = y.reshape(rows.shape)
        cos = torch.nn.functional.cosine_similarity(rows, y_rows, dim=1, eps=1e-30)
        results.append(
            CodecError(
                codec=name,
                group_size=payload.group_size,
                shape=tuple(x.shape),
                dtype=payload.dtype,
                nbytes=payload.nbytes,
                ratio=2 * x.numel() / max(1, payload.nbytes),
                rel_l2=err_norm / norm if norm > 0 else 0.0,
                max_abs=float(err.max()) if err.numel() else 0.0,
                mean_abs=float(err.mean()) if err.numel() else 0.0,
                snr_db=20 * math.log10(norm / err_norm) if err_norm > 0 and norm > 0 else math.inf,
                cosine=float(cos.mean()) if cos.numel() else 1.0,
            )
        )
    return results


def error_table(results: Iterable[CodecError]) -> str:
    """Markdown table of ``measure_error`` results."""
    lines = [
        "| codec | group | ratio | rel L2 | max abs | mean abs | SNR dB | cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.codec} | {r.group_size} | {r.ratio:.2f} | {r.rel_l2:.3e} | {r.max_abs:.3e} | "
            f"{r.mean_abs:.3e} | {r.snr_db:.1f} | {r.cosine:.6f} |"
        )
    return "\n".join(lines)
