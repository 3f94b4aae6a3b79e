"""The post-export check: run the ONNX stage and its ``TorchStage`` side by side on random inputs."""

from __future__ import annotations

import os
import time

import torch

from hyperlane_lab.models.stage import TorchStage

__all__ = ["parity_device", "parity_error"]


def parity_error(
    stage: TorchStage, onnx_path: str | os.PathLike[str], seed: int = 0, device: str = "cpu"
) -> tuple[float, float]:
    """(max |onnx - torch|, the same scaled by max(1, max |torch|)) over outputs and caches, for a
    padded prefill and three decode steps on random inputs (ORT on ``device``)."""
    from hyperlane_lab.engines.ort_engine import OrtStage

    ort_stage = OrtStage(onnx_path, device)
    g = torch.Generator().manual_seed(seed)
    s = stage.spec
    steps = [  # row 1 is shorter (right padding), then finishes (padding) in the last step
        torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]]),
        torch.tensor([[5], [3]]),
        torch.tensor([[6], [4]]),
        torch.tensor([[7], [-1]]),
    ]
    sid = f"parity-{os.getpid()}-{time.monotonic_ns()}"
    stage.open_session(sid, 2, 12)
    ort_stage.open_session(sid, 2, 12)
    err = rel = 0.0
    try:
        for pos in steps:
            if stage.is_first:
                x = torch.randint(0, s.vocab_size, pos.shape, generator=g)
            else:
                x = torch.randn(*pos.shape, s.hidden_size, generator=g).to(stage.dtype)
            want = stage.forward(sid, x.to(stage.device), pos.to(stage.device)).float().cpu()
            got = ort_stage.forward(sid, x, pos).float().cpu()
            e = float((got - want).abs().max())
            err, rel = max(err, e), max(rel, e / max(1.0, float(want.abs().max())))
        ref, mine = stage.session(sid), ort_stage.session(sid)
        n = min(ref.limit, mine.limit)  # the session's positions (a CUDA cache may be longer: pooled)
        for a, b in zip(ref.k + ref.v, mine.k + mine.v):
            a, b = a[:, :, :n].float().cpu(), b[:, :, :n].float().cpu()  # trash slot and spare slots excluded
            e = float((a - b).abs().max())
            err, rel = max(err, e), max(rel, e / max(1.0, float(a.abs().max())))
    finally:
        stage.close_session(sid)
        ort_stage.close_session(sid)
    return err, rel


def parity_device(stage: TorchStage, dname: str) -> str | None:
    """Where to run the post-export check: the stage's GPU if ORT has CUDA, else CPU (not for bf16)."""
    if stage.device.type == "cuda":
        from hyperlane_lab.engines.ort_engine import ort_available_providers

        if "CUDAExecutionProvider" in ort_available_providers():
            return str(stage.device)
    return None if dname == "bf16" else "cpu"
