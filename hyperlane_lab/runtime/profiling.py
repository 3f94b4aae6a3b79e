"""Device profiling for the planner: matmul FLOP/s, memory bandwidth, one real decoder layer.

Runs on the worker (Profile RPC). Times with CUDA synchronisation on GPUs; medians of repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["measure_layer", "measure_matmul", "measure_mem_bw", "profile_device"]


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """Dense matmul FLOP/s (fp16 on GPUs, fp32 on CPUs unless given)."""
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _median_time(lambda: a @ b, device)
    return 2 * n**3 / t


def measure_mem_bw(device: torch.device, nbytes: int | None = None) -> float:
    """Copy bandwidth in B/s, counting bytes read plus bytes written."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device)
    return 2 * nbytes / t


def measure_layer(
    device: torch.device, config: dict[str, Any], dtype: str, context: int
) -> tuple[float, float]:
    """(decode step s, prefill s per token) of ONE decoder layer of this model shape, random weights."""
    from transformers import AutoConfig

    from hyperlane_lab.models import ModelSpec, TorchStage, parse_dtype
    from hyperlane_lab.types import LayerSpan

    cfg = dict(config)
    model_type = cfg.pop("model_type", "llama")
    spec = ModelSpec.from_hf_config(AutoConfig.for_model(model_type, **cfg)).with_layers(3)
    torch_dtype = parse_dtype(dtype)
    if device.type == "cpu" and torch_dtype != torch.float32:
        torch_dtype = torch.float32  # CPU half matmuls are not representative
    stage = TorchStage.random(spec, LayerSpan(1, 2), dtype=torch_dtype, device=device)
    stage.open_session("p", 1, context + 8)
    hidden = torch.randn(1, context, spec.hidden_size, dtype=torch_dtype, device=device)
    pos = torch.arange(context, device=device)[None]
    prefill = _median_time(lambda: stage.forward("p", hidden, pos), device, repeats=3, warmup=1)
    h1 = torch.randn(1, 1, spec.hidden_size, dtype=torch_dtype, device=device)
    p1 = torch.tensor([[context]], device=device)
    decode = _median_time(lambda: stage.forward("p", h1, p1), device, repeats=10, warmup=3)
    stage.close_session("p")
    return decode, prefill / context


def profile_device(
    device: torch.device, config: dict[str, Any] | None, dtype: str, context: int
) -> dict[str, float]:
    out = {
        "flops": measure_matmul(device),
        "mem_bw": measure_mem_bw(device),
        "layer_decode_s": 0.0,
        "layer_prefill_s_per_token": 0.0,
    }
    if config:
        out["layer_decode_s"], out["layer_prefill_s_per_token"] = measure_layer(
            device, config, dtype, context
        )
    return out
