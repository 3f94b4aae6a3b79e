"""Where exported stages are cached, and the model hashes that key the cache.

Cache root: the ``cache_dir`` argument, else ``$HYPERLANE_CACHE/onnx``, else
``~/.cache/hyperlane_lab/onnx``. A model's hash is the sha256 over its config and weight files
(each file's hash is remembered by path, size and mtime in ``file_hashes.json``, so a large
checkpoint is read once); a ``TorchStage`` (or a hub model, whose weights arrive per span) is
hashed over its spec and tensors instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.models.bundled import resolve_model
from hyperlane_lab.models.stage import TorchStage
from hyperlane_lab.onnx.shard import spec_to_json

__all__ = ["default_cache_dir", "model_hash", "stage_tensor_hash"]


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("HYPERLANE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "hyperlane_lab") / "onnx"


# ---------------------------------------------------------------------- hashing


def _file_sha256(path: Path, memo_file: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big checkpoints are hashed once."""
    st = path.stat()
    key = str(path.resolve())
    try:
        memo: dict[str, Any] = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=0))
    os.replace(tmp, memo_file)
    return h.hexdigest()


def stage_tensor_hash(stage: TorchStage) -> str:
    h = hashlib.sha256(spec_to_json(stage.spec).encode())
    w = stage.weights
    tensors = [w.embed, w.norm, w.lm_head]
    for lw in w.layers:
        tensors += [lw.wqkv, lw.bqkv, lw.wo, lw.w_gate_up, lw.w_down, lw.ln_attn, lw.ln_mlp]
    for t in tensors:
        if t is None:
            h.update(b"-")
            continue
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_hash(
    source: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """sha256 over a local model's config and weight files (None for a hub id: hash the stage instead)."""
    path = Path(os.path.expanduser(resolve_model(None if source is None else str(source))))
    if not path.exists():
        return None
    if path.is_file():  # GGUF: config and weights in one file
        files = [path]
    else:
        ggufs = sorted(path.glob("*.gguf"))
        files = [path / "config.json"] if (path / "config.json").exists() else []
        files += sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
        if not (path / "config.json").exists():
            files += ggufs
    memo = default_cache_dir(cache_dir) / "file_hashes.json"
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_file_sha256(f, memo).encode())
    return h.hexdigest()
