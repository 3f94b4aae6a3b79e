"""What an ONNX stage file says about itself, and the checks a worker runs on an uploaded one.

Every exported shard carries ``metadata_props`` (``hyperlane.*``): the layer span, the full
``ModelSpec`` as JSON, the dtype, the model hash and the graph-contract version, so a worker can
run a shard without the model's config or weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.onnx.graph import input_names, output_names
from hyperlane_lab.types import LayerSpan

__all__ = [
    "DTYPE_NAMES",
    "GRAPH_VERSION",
    "ShardInfo",
    "dtype_name",
    "read_shard_info",
    "spec_from_json",
    "spec_to_json",
    "validate_onnx_shard",
]

GRAPH_VERSION = 1  # bump when the graph contract in graph.py changes (invalidates cached exports)
_FORMAT = "hyperlane-stage"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_ELEM_NAMES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16"}  # onnx.TensorProto codes


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} can't be exported; use fp32, fp16 or bf16") from None


def spec_to_json(spec: ModelSpec) -> str:
    return json.dumps({f.name: getattr(spec, f.name) for f in fields(spec)}, sort_keys=True)


def spec_from_json(text: str) -> ModelSpec:
    d: dict[str, Any] = json.loads(text)
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"ModelSpec fields {unknown} are unknown to this hyperlane_lab version")
    # JSON turns tuples (rope_scaling pairs, eos ids, layer lists) into lists: turn them back
    return ModelSpec(**{k: _tuples(v) for k, v in d.items()})


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@dataclass(frozen=True)
class ShardInfo:
    """The self-description of one ONNX stage file."""

    span: LayerSpan
    spec: ModelSpec
    dtype: str  # fp32 | fp16 | bf16
    model_hash: str
    graph_version: int
    opset: int
    ir_version: int
    sha256: str  # of the .onnx file's bytes
    size_bytes: int
    inputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]  # (name, element type, shape)
    outputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]
    external_data: bool  # weights live in a side file (models over ~2 GB)

    @property
    def is_first(self) -> bool:
        return self.span.start == 0

    @property
    def is_last(self) -> bool:
        return self.span.end == self.spec.n_layers

    def io_json(self) -> dict[str, list[dict[str, object]]]:
        def rows(items: tuple[tuple[str, str, tuple[int | str, ...]], ...]) -> list[dict[str, object]]:
            return [{"name": n, "dtype": t, "shape": list(s)} for n, t, s in items]

        return {"inputs": rows(self.inputs), "outputs": rows(self.outputs)}


def _value_infos(values: Any) -> tuple[tuple[str, str, tuple[int | str, ...]], ...]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = tuple(dim.dim_param or dim.dim_value for dim in tt.shape.dim)
        out.append((v.name, _ELEM_NAMES.get(tt.elem_type, str(tt.elem_type)), shape))
    return tuple(out)


def _load_bytes(path_or_bytes: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes), "<uploaded bytes>"
    path = Path(path_or_bytes)
    if not path.is_file():
        raise ValueError(f"ONNX shard {path} does not exist; export it with `hyperlane export` first")
    return path.read_bytes(), str(path)


def read_shard_info(path_or_bytes: str | os.PathLike[str] | bytes) -> ShardInfo:
    """Parse a shard (file or bytes) without loading external weights; ValueError if it is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    data, where = _load_bytes(path_or_bytes)
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{where} is not a valid ONNX file ({type(e).__name__}: {e}); the file is corrupted or truncated: "
            "re-export it (`hyperlane export`) or delete it from the export cache"
        ) from e
    if not model.graph.node:
        raise ValueError(f"{where} parsed as ONNX but has an empty graph; it is corrupted: re-export it")
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("hyperlane.format") != _FORMAT:
        raise ValueError(
            f"{where} is an ONNX model but not a hyperlane stage (no hyperlane.* metadata); "
            "export shards with hyperlane_lab.onnx.export_stage or `hyperlane export`"
        )
    try:
        start, end = (int(v) for v in meta["hyperlane.span"].split(","))
        spec = spec_from_json(meta["hyperlane.spec"])
        info = ShardInfo(
            span=LayerSpan(start, end),
            spec=spec,
            dtype=meta["hyperlane.dtype"],
            model_hash=meta.get("hyperlane.model_hash", ""),
            graph_version=int(meta.get("hyperlane.graph_version", "0")),
            opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
            ir_version=int(model.ir_version),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            inputs=_value_infos(model.graph.input),
            outputs=_value_infos(model.graph.output),
            external_data=any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where} has broken hyperlane metadata ({e}); re-export the shard") from e
    return info


def validate_onnx_shard(
    path_or_bytes: str | os.PathLike[str] | bytes,
    expected_span: LayerSpan | tuple[int, int],
    expected_sha256: str | None = None,
) -> ShardInfo:
    """Check an uploaded/received shard before running it; ValueError with the reason otherwise.

    Checks, in order: the bytes' sha256 (when given), that it parses as a hyperlane ONNX stage, the
    graph-contract version, the layer span, and that input/output names match that span.
    """
    span = expected_span if isinstance(expected_span, LayerSpan) else LayerSpan(*expected_span)
    data, where = _load_bytes(path_or_bytes)
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256.lower():
            raise ValueError(
                f"ONNX shard {where}: sha256 {got} does not match the expected {expected_sha256}; "
                "the upload is corrupted or is a different file: send the shard again"
            )
    info = read_shard_info(data)
    if info.graph_version != GRAPH_VERSION:
        raise ValueError(
            f"ONNX shard {where} uses graph contract v{info.graph_version}, this build runs v{GRAPH_VERSION}; "
            "re-export it with this version of hyperlane_lab"
        )
    if info.span != span:
        raise ValueError(
            f"ONNX shard {where} holds layers {info.span}, but this worker was assigned {span}; "
            "send the shard exported for that span"
        )
    want_in = input_names(span.layers(), info.is_first, info.is_last)
    want_out = output_names(span.layers(), info.is_last)
    got_in, got_out = [n for n, _, _ in info.inputs], [n for n, _, _ in info.outputs]
    if got_in != want_in or got_out != want_out:
        raise ValueError(
            f"ONNX shard {where}: inputs {got_in} / outputs {got_out} don't match a stage {span} "
            f"(expected {want_in} / {want_out}); re-export the shard"
        )
    return info
