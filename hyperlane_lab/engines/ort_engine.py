"""The ``onnxruntime`` engine: one stage = one exported ONNX file run by an InferenceSession.

``OrtStage`` implements the same stage interface as ``TorchStage`` (sessions with a preallocated
KV cache, ``forward(sid, x, positions)``). The graph (see ``hyperlane_lab.onnx.graph``) is a pure
function: it reads the cache buffers and returns only the new tokens' K/V, which the engine then
writes into its cache in place. All buffers — cache, inputs, outputs — are torch tensors on the
stage's device, bound to ORT by pointer with IO binding, so nothing is copied between steps and
the cache never leaves the device (CPU memory, or GPU memory with the CUDA execution provider).

On CUDA the engine synchronises torch's current stream before ``run_with_iobinding`` (so ORT sees
finished inputs and cache writes) and relies on ORT's end-of-run synchronisation for the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import parse_dtype
from hyperlane_lab.models.sessions import StageSessions
from hyperlane_lab.types import LayerSpan

__all__ = ["OrtStage", "cuda_provider_options", "load_ort_stage", "ort_available_providers"]

log = logging.getLogger(__name__)

# torch dtype -> element type for IOBinding.bind_input/bind_output (numpy type, or onnx code for bf16)
_ELEM: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.bfloat16: 16,  # onnx.TensorProto.BFLOAT16; numpy has no bfloat16
}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelLoadError(
            "the onnxruntime engine needs onnxruntime: `pip install onnxruntime` (CPU) or "
            "`pip install hyperlane-lab[gpu]` (onnxruntime-gpu)"
        ) from e
    global _PRELOADED
    if (
        not _PRELOADED
        and hasattr(ort, "preload_dlls")
        and "CUDAExecutionProvider" in ort.get_available_providers()
    ):
        # onnxruntime-gpu finds the CUDA/cuDNN libraries that torch already ships this way
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    _PRELOADED = True
    return ort


_PRELOADED = False


def cuda_provider_options(dev: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """CUDA execution provider options for a stage. fp32 stages turn TF32 off (``use_tf32``): ORT
    enables TF32 for fp32 GEMMs by default, which rounds their inputs to 10 mantissa bits, while the
    torch engine (and the CPU reference) multiply in full fp32, so fp32 shards would drift from them."""
    opts = {"device_id": str(dev.index or 0)}
    if dtype == torch.float32:
        opts["use_tf32"] = "0"
    return opts


def ort_available_providers() -> list[str]:
    return list(_import_ort().get_available_providers())


class OrtStage(StageSessions):
    """One pipeline stage run by ONNX Runtime (the ``onnxruntime`` engine)."""

    engine_name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        threads: int | None = None,
        providers: list[Any] | None = None,
        expected_span: LayerSpan | tuple[int, int] | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        from hyperlane_lab.onnx.shard import read_shard_info, validate_onnx_shard

        path = Path(onnx_path)
        try:
            if expected_span is None and expected_sha256 is None:
                info = read_shard_info(path)
            else:
                want = expected_span if expected_span is not None else read_shard_info(path).span
                info = validate_onnx_shard(path, want, expected_sha256)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        self.info, self.onnx_path = info, path
        self.spec: ModelSpec = info.spec
        self.span: LayerSpan = info.span
        self.is_first, self.is_last = info.is_first, info.is_last
        self.dtype: torch.dtype = parse_dtype(info.dtype)
        ort = _import_ort()
        dev = torch.device(device)
        available = ort.get_available_providers()
        if providers is None:
            if dev.type == "cuda" and "CUDAExecutionProvider" not in available:
                log.warning(
                    "device %s asked but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: "
                    "`pip install hyperlane-lab[gpu]`); running stage %s on CPU",
                    dev,
                    info.span,
                )
                dev = torch.device("cpu")
            if dev.type == "cuda":
                providers = [
                    ("CUDAExecutionProvider", cuda_provider_options(dev, self.dtype)),
                    "CPUExecutionProvider",
                ]
            elif dev.type == "cpu":
                providers = ["CPUExecutionProvider"]
            else:
                raise ValueError(f"the onnxruntime engine runs on cpu or cuda, not {dev}")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        self.device = dev
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only; ORT warns about every CPU fallback node
        try:
            self._ort = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            if "NOT_IMPLEMENTED" in str(e):
                raise ModelLoadError(
                    f"onnxruntime's {providers} can't run {path} ({info.dtype}): {e}; the CPU provider has no "
                    "bf16 kernels: use fp32/fp16 shards on CPU, or run bf16 with onnxruntime-gpu on CUDA"
                ) from e
            raise ModelLoadError(
                f"onnxruntime could not load {path}: {e}; the file may be corrupted or from an incompatible "
                "exporter: re-export it (`hyperlane export`) or delete it from the export cache"
            ) from e
        self.providers: list[str] = list(self._ort.get_providers())
        self._device_type = "cuda" if self.device.type == "cuda" else "cpu"
        self._device_id = self.device.index or 0
        self._init_sessions()
        log.info("onnxruntime stage %s from %s on %s (%s)", self.span, path, self.device, self.providers[0])

    # ------------------------------------------------------------------ compute

    def _bind_in(self, io: Any, name: str, t: torch.Tensor) -> None:
        io.bind_input(name, self._device_type, self._device_id, _ELEM[t.dtype], tuple(t.shape), t.data_ptr())

    def _bind_out(self, io: Any, name: str, t: torch.Tensor) -> None:
        io.bind_output(name, self._device_type, self._device_id, _ELEM[t.dtype], tuple(t.shape), t.data_ptr())

    @torch.inference_mode()
    def forward(
        self, session_id: str, x: torch.Tensor, positions: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        cache, _ = self._begin_step(session_id, x, positions)
        bsz, seq = positions.shape
        positions = positions.to(self.device).contiguous()
        dev, s = self.device, self.spec
        x = (x.to(dev) if self.is_first else x.to(device=dev, dtype=self.dtype)).contiguous()
        io = self._ort.io_binding()
        self._bind_in(io, "x", x)
        self._bind_in(io, "positions", positions)
        if self.is_last:
            if all_logits:
                index = torch.arange(seq, device=dev).expand(bsz, seq).contiguous()
            else:
                index = positions.argmax(dim=1, keepdim=True)  # each row's last valid token [B, 1]
            self._bind_in(io, "logits_index", index)
            out = torch.empty((bsz, index.shape[1], s.vocab_size), dtype=torch.float32, device=dev)
            self._bind_out(io, "logits", out)
        else:
            out = torch.empty((bsz, seq, s.hidden_size), dtype=self.dtype, device=dev)
            self._bind_out(io, "hidden", out)
        new_kv = []
        for i, layer in enumerate(self.span.layers()):
            self._bind_in(io, f"past_k_{layer}", cache.k[i])  # whole [B, Hkv, T, D] buffer, read in place
            self._bind_in(io, f"past_v_{layer}", cache.v[i])
            nk = torch.empty((bsz, s.n_kv_heads, seq, s.head_dim), dtype=self.dtype, device=dev)
            nv = torch.empty_like(nk)
            self._bind_out(io, f"new_k_{layer}", nk)
            self._bind_out(io, f"new_v_{layer}", nv)
            new_kv.append((nk, nv))
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # inputs and cache writes done before ORT reads
        self._ort.run_with_iobinding(io)
        # Scatter the new K/V into the cache at their positions; padding goes to the trash slot.
        write_idx = torch.where(positions >= 0, positions, torch.full_like(positions, cache.max_len))
        rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, seq)
        for i, (nk, nv) in enumerate(new_kv):
            cache.k[i][rows, :, write_idx] = nk.transpose(1, 2)  # [B, S, Hkv, D] to slots
            cache.v[i][rows, :, write_idx] = nv.transpose(1, 2)
        if self.is_last and not all_logits:
            return out[:, 0]
        return out

    def describe(self) -> dict[str, object]:
        return {
            "span": [self.span.start, self.span.end],
            "engine": self.engine_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "weight_bytes": self.info.size_bytes,
            "first": self.is_first,
            "last": self.is_last,
            "provider": self.providers[0] if self.providers else "",
            "onnx": str(self.onnx_path),
        }


def load_ort_stage(
    source: Any = None,
    span: LayerSpan | tuple[int, int] | None = None,
    dtype: str | torch.dtype = "fp32",
    device: torch.device | str = "cpu",
    spec: ModelSpec | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    **opts: Any,
) -> OrtStage:
    """An ``OrtStage`` for ``span`` of ``source`` (HF folder, GGUF, hub id, None = bundled, or a
    ``TorchStage``), exported through the cache unless ``onnx_path`` names a ready shard.

    Options: ``threads``, ``providers`` (for the session); ``cache_dir``, ``opset``, ``exporter``,
    ``validate`` (for the export); ``expected_sha256`` (alias ``onnx_sha256``: checked against
    ``onnx_path``, as a worker does for an uploaded shard).
    """
    span = LayerSpan(*span) if isinstance(span, tuple) else span
    session_keys = ("threads", "providers")
    stage_opts = {k: opts.pop(k) for k in session_keys if k in opts}
    alias = opts.pop("onnx_sha256", None)
    expected_sha = opts.pop("expected_sha256", None) or alias
    if onnx_path is None:
        from hyperlane_lab.onnx.export import export_stage

        onnx_path = export_stage(source, span, dtype=dtype, spec=spec, **opts).path
    elif opts:
        raise ValueError(f"export options {sorted(opts)} don't apply when onnx_path is given")
    stage = OrtStage(onnx_path, device, expected_span=span, expected_sha256=expected_sha, **stage_opts)
    if stage.dtype != parse_dtype(dtype):
        raise ModelLoadError(
            f"ONNX shard {onnx_path} is {stage.info.dtype} but dtype={dtype} was asked; "
            f"pass dtype={stage.info.dtype!r} or export a shard in {dtype}"
        )
    return stage
