"""What the client sends to a worker for one stage: config.json and exactly the span's tensors,
as safetensors bytes (never pickle), or the stage's ONNX file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import (
    LoadStats,
    _reader,
    load_hf_config,
    resolve_source,
    stage_tensor_names,
)
from hyperlane_lab.types import LayerSpan

__all__ = ["ShardPayload", "build_shard_payload", "config_json"]

log = logging.getLogger(__name__)


@dataclass
class ShardPayload:
    config: bytes
    weights: bytes | None = None  # safetensors with the HF names of the span's tensors
    onnx: bytes | None = None

    @property
    def nbytes(self) -> int:
        return len(self.config) + len(self.weights or b"") + len(self.onnx or b"")


def config_json(source: str) -> bytes:
    return load_hf_config(source).to_json_string().encode()


def build_shard_payload(
    source: str, spec: ModelSpec, span: LayerSpan, engine: str = "torch", **opts: Any
) -> ShardPayload:
    if opts.get("random_weights"):
        return ShardPayload(json.dumps(spec.to_hf_config_dict()).encode())
    cfg = config_json(source)
    if engine == "onnxruntime":
        from hyperlane_lab.onnx_export import export_stage

        result = export_stage(source, span, dtype=opts.get("dtype", "fp32"), spec=spec)
        side = result.path.with_name(result.path.name + ".data")
        if side.exists():
            raise ValueError(
                f"ONNX shard {span} keeps its weights in a side file ({side.name}, > 1.8 GB); shipping those is not "
                "supported yet: use engine='torch' for this stage, or fewer layers per stage"
            )
        return ShardPayload(cfg, onnx=result.path.read_bytes())
    from safetensors.torch import save

    src = resolve_source(source)
    stats = LoadStats()
    tensors = _reader(src, spec, None).read(stage_tensor_names(spec, span), stats)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    log.info("shard %s: %d tensors, %.1f MB", span, len(tensors), stats.bytes_read / 1e6)
    return ShardPayload(cfg, weights=save(tensors))
