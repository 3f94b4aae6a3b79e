"""A folder of ONNX shards for a whole model, described by ``manifest.json``.

``export_shards`` writes ``stage{i}_L{start}-{end}.onnx`` for each span plus a manifest naming the
model, spans, files, sha256 hashes, input/output names and shapes, dtype and opset; ``load_manifest``
reads it back and checks every listed file against its hash.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hyperlane_lab.models.bundled import resolve_model
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.onnx.export import DEFAULT_OPSET, export_stage
from hyperlane_lab.onnx.shard import GRAPH_VERSION, read_shard_info, validate_onnx_shard
from hyperlane_lab.types import LayerSpan

__all__ = ["MANIFEST_NAME", "export_shards", "load_manifest"]

MANIFEST_NAME = "manifest.json"


def export_shards(
    model: str | None,
    out_dir: str | os.PathLike[str],
    n_stages: int | None = None,
    spans: Sequence[LayerSpan] | None = None,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    **export_opts: Any,
) -> dict[str, Any]:
    """Export every stage of ``model`` into ``out_dir`` and write the manifest; returns it."""
    source = resolve_model(model)
    spec = ModelSpec.from_pretrained(source)
    if spans is None:
        spans = LayerSpan.split_uniform(spec.n_layers, n_stages or 1)
    spans = tuple(spans)
    if (
        spans[0].start != 0
        or spans[-1].end != spec.n_layers
        or any(a.end != b.start for a, b in itertools.pairwise(spans))
    ):
        raise ValueError(f"spans {[str(s) for s in spans]} must cover [0, {spec.n_layers}) contiguously")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = []
    for i, span in enumerate(spans):
        fname = f"stage{i}_L{span.start}-{span.end}.onnx"
        res = export_stage(source, span, out / fname, dtype=dtype, opset=opset, spec=spec, **export_opts)
        info = read_shard_info(res.path)
        data = res.path.with_name(res.path.name + ".data")
        stages.append(
            {
                "index": i,
                "span": [span.start, span.end],
                "file": fname,
                "sha256": res.sha256,
                "size_bytes": res.size_bytes,
                "external_data": data.name if info.external_data else None,
                **info.io_json(),
                "exporter": res.exporter,
                "export_s": round(res.export_s, 4),
                "max_abs_err": res.max_abs_err,
            }
        )
    manifest = {
        "format": "hyperlane-onnx-shards",
        "graph_version": GRAPH_VERSION,
        "model": str(model) if model is not None else "bundled",
        "model_hash": res.model_hash,
        "spec": {f.name: getattr(spec, f.name) for f in fields(spec)},
        "dtype": res.dtype,
        "opset": res.opset,
        "ir_version": info.ir_version,
        "stages": stages,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(folder: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json``; with ``verify`` check each shard's span and sha256 (ValueError if off)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {MANIFEST_NAME}; create it with `hyperlane export MODEL --out {folder}`"
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        stages = manifest["stages"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a valid shard manifest ({e}); export the model again") from e
    if verify:
        for st in stages:
            validate_onnx_shard(folder / st["file"], tuple(st["span"]), st["sha256"])
    return manifest
