"""The ``auto`` compression rule: per boundary, compress only where the predicted transfer saving
exceeds the codec's own cost.

For each boundary, with its measured link (latency + bandwidth) and a prefill-sized activation of
``tokens`` tokens: time(raw) = link(raw bytes); time(codec) = link(encoded bytes) + encode + decode
(measured here on the CPU for CPU workers; for CUDA workers, three passes over the raw bytes at
``gpu_bytes_per_s``, as the fused Triton kernels do). The cheapest wins. Only
accuracy-safe codecs are candidates (int8 keeps >= 99.9% top-1 agreement; int4 is opt-in).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from hyperlane_lab.types import LinkProfile

__all__ = ["AUTO_CANDIDATES", "choose_codec", "codec_cost_s"]

AUTO_CANDIDATES = ("int8",)


def codec_cost_s(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, group_size: int = 64, repeats: int = 3
) -> float:
    """Median encode+decode time of one activation of ``shape`` on the CPU."""
    from hyperlane_lab import codecs

    codec = codecs.get(name, group_size=group_size)
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec.decode(codec.encode(x))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choose_codec(
    link: LinkProfile,
    hidden_size: int,
    dtype: torch.dtype,
    tokens: int = 512,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    group_size: int = 64,
    device_kind: str = "cpu",
    gpu_bytes_per_s: float = 1e12,
) -> tuple[str, dict[str, float]]:
    """(codec name, predicted seconds per candidate) for one boundary."""
    from hyperlane_lab import codecs

    shape = (1, tokens, hidden_size)
    raw_bytes = tokens * hidden_size * dtype.itemsize
    predicted = {"raw": link.transfer_s(raw_bytes)}
    for name in candidates:
        enc = codecs.get(name, group_size=group_size).encoded_nbytes(shape, dtype)
        if device_kind == "cuda":
            cost = 3 * raw_bytes / gpu_bytes_per_s
        else:
            cost = codec_cost_s(name, shape, dtype, group_size)
        predicted[name] = link.transfer_s(enc) + cost
    best = min(predicted, key=lambda k: (predicted[k], k != "raw"))
    return best, predicted
