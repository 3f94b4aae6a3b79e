"""Alias of :mod:`hyperlane_lab.onnx` (stage export, shard validation) under the older module name."""

from hyperlane_lab.onnx import (
    DEFAULT_OPSET,
    ExportParityError,
    ExportResult,
    ShardInfo,
    export_shards,
    export_stage,
    load_manifest,
    read_shard_info,
    validate_onnx_shard,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportParityError",
    "ExportResult",
    "ShardInfo",
    "export_shards",
    "export_stage",
    "load_manifest",
    "read_shard_info",
    "validate_onnx_shard",
]
