"""ONNX export of pipeline stages (one self-describing file per stage) for the onnxruntime engine.

``export_stage`` writes and caches a stage graph; ``validate_onnx_shard`` checks a received one.
onnx and onnxruntime are imported only inside the functions that need them.
"""

from hyperlane_lab.onnx.export import (
    DEFAULT_OPSET,
    ExportParityError,
    ExportResult,
    default_cache_dir,
    export_stage,
    model_hash,
    parity_error,
)
from hyperlane_lab.onnx.graph import StageGraph, input_names, output_names
from hyperlane_lab.onnx.manifest import MANIFEST_NAME, export_shards, load_manifest
from hyperlane_lab.onnx.shard import GRAPH_VERSION, ShardInfo, read_shard_info, validate_onnx_shard

__all__ = [
    "DEFAULT_OPSET",
    "GRAPH_VERSION",
    "MANIFEST_NAME",
    "ExportParityError",
    "ExportResult",
    "ShardInfo",
    "StageGraph",
    "default_cache_dir",
    "export_shards",
    "export_stage",
    "input_names",
    "load_manifest",
    "model_hash",
    "output_names",
    "parity_error",
    "read_shard_info",
    "validate_onnx_shard",
]
