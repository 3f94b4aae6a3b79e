"""Load the weights of one stage's layer span, and nothing else.

Sources: an HF folder (single ``model.safetensors`` or shards with ``model.safetensors.index.json``),
a GGUF file, or a hub id (only the config, tokenizer and the shards the span needs are fetched).
Every read goes through a reader that records what it touched (``LoadStats``), so tests can prove a
stage ``[2, 4)`` of a 32-layer model read only layers 2 and 3.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.layers import LayerWeights
from hyperlane_lab.models.stage import StageWeights, TorchStage
from hyperlane_lab.types import LayerSpan

__all__ = [
    "DTYPES",
    "LoadStats",
    "load_hf_config",
    "load_stage",
    "load_stage_weights",
    "parse_dtype",
    "random_stage_weights",
    "resolve_source",
    "stage_tensor_names",
]

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


@dataclass
class LoadStats:
    tensors: list[str] = field(default_factory=list)  # checkpoint names read
    bytes_read: int = 0
    files_opened: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    kind: str  # "hf" | "gguf"
    folder: Path
    gguf_file: str | None = None


def _is_hub_id(source: str) -> bool:
    return "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1


def _hub_download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ModelLoadError("huggingface_hub is needed to fetch hub models") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the hub ({e}); pass a local folder or GGUF file instead"
        ) from e


def resolve_source(source: str | os.PathLike[str], need_weights: bool = False) -> Source:
    """Where a model lives. A missing path that looks like ``org/name`` is taken as a hub id."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass an HF folder or a .gguf file")
        return Source("gguf", path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source("gguf", path, ggufs[0])
            raise ModelLoadError(
                f"{path} has no config.json; pass an HF model folder (config.json + *.safetensors) or a .gguf file"
            )
        return Source("hf", path)
    if _is_hub_id(str(source)):
        patterns = ["*.json", "tokenizer*", "*.model"]
        return Source("hf", _hub_download(str(source), patterns))
    raise ModelLoadError(f"model {str(source)!r} not found: no such file or folder, and it is not a hub id")


def load_hf_config(source: str | os.PathLike[str]) -> Any:
    from transformers import AutoConfig

    src = resolve_source(source)
    try:
        if src.kind == "gguf":
            return AutoConfig.from_pretrained(src.folder, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.folder)
    except Exception as e:
        raise ModelLoadError(f"could not read the model config of {source}: {e}") from e


def stage_tensor_names(spec: ModelSpec, span: LayerSpan) -> list[str]:
    """HF checkpoint names a stage needs (embedding on first, norm + head on last)."""
    names: list[str] = []
    first, last = span.start == 0, span.end == spec.n_layers
    if first or (last and spec.tie_embeddings):
        names.append("model.embed_tokens.weight")
    for i in span.layers():
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if spec.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if last:
        names.append("model.norm.weight")
        if not spec.tie_embeddings:
            names.append("lm_head.weight")
    return names


class _SafetensorsReader:
    def __init__(self, folder: Path, hub_id: str | None = None) -> None:
        self.folder, self.hub_id = folder, hub_id
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists() or hub_id:
            self.weight_map = {}
        else:
            raise ModelLoadError(f"{folder} has no model.safetensors or model.safetensors.index.json")

    def read(self, names: list[str], stats: LoadStats) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if self.weight_map and n not in self.weight_map:
                raise ModelLoadError(
                    f"tensor {n!r} is not listed in {self.folder / 'model.safetensors.index.json'}; "
                    "the checkpoint is incomplete or not a Llama-family layout (re-download or re-export it)"
                )
            by_file.setdefault(self.weight_map.get(n, "model.safetensors"), []).append(n)
        out: dict[str, torch.Tensor] = {}
        for fname, group in sorted(by_file.items()):
            path = self.folder / fname
            if not path.exists() and self.hub_id:
                path = _hub_download(self.hub_id, [fname]) / fname
            if not path.exists():
                raise ModelLoadError(f"weights file {path} is missing; re-download the checkpoint")
            stats.files_opened.append(fname)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for n in group:
                    if n not in present:
                        raise ModelLoadError(
                            f"tensor {n!r} is missing from {path}; is the checkpoint complete?"
                        )
                    t = f.get_tensor(n)
                    out[n] = t
                    stats.tensors.append(n)
                    stats.bytes_read += t.numel() * t.element_size()
        return out


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.{i}.{module}.{name}.{weight|bias}
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[module]}.{kind}"


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved per head for its RoPE; undo that to HF's half layout.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _GGUFReader:
    def __init__(self, path: Path, spec: ModelSpec) -> None:
        import gguf

        self.path, self.spec = path, spec
        self._reader = gguf.GGUFReader(str(path))  # memory-mapped: tensors are read only when touched
        self._tensors = {t.name: t for t in self._reader.tensors}
        arch = self._reader.fields.get("general.architecture")
        self.arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else spec.model_type
        # llama.cpp permutes q/k rows for its RoPE only in llama-family conversions (not qwen2)
        self._unpermute = self.arch in ("llama", "mistral")
        if "rope_freqs.weight" in self._tensors or any(
            k.endswith(".rope.scaling.type") for k in self._reader.fields
        ):
            raise ModelLoadError(
                f"{path} uses scaled RoPE (rope_freqs / rope.scaling), which the GGUF route does not read; "
                "load the model's HF folder instead"
            )

    def read(self, names: list[str], stats: LoadStats) -> dict[str, torch.Tensor]:
        import gguf
        import numpy as np

        stats.files_opened.append(self.path.name)
        out: dict[str, torch.Tensor] = {}
        for n in names:
            g = _gguf_name(n)
            if g not in self._tensors and n == "lm_head.weight":
                g = "token_embd.weight"  # GGUFs of tied models omit output.weight
            if g not in self._tensors:
                raise ModelLoadError(f"tensor {g!r} (for {n}) is missing from {self.path}")
            t = self._tensors[g]
            data = t.data
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = gguf.quants.dequantize(data, t.tensor_type)
            arr = torch.from_numpy(np.array(data, copy=True))
            if self._unpermute and (n.endswith("q_proj.weight") or n.endswith("q_proj.bias")):
                arr = _unpermute_rope(arr, self.spec.n_heads)
            elif self._unpermute and (n.endswith("k_proj.weight") or n.endswith("k_proj.bias")):
                arr = _unpermute_rope(arr, self.spec.n_kv_heads)
            out[n] = arr
            stats.tensors.append(n)
            stats.bytes_read += int(t.n_bytes)
        return out


def _reader(src: Source, spec: ModelSpec, hub_id: str | None) -> _SafetensorsReader | _GGUFReader:
    if src.kind == "gguf":
        assert src.gguf_file is not None
        return _GGUFReader(src.folder / src.gguf_file, spec)
    return _SafetensorsReader(src.folder, hub_id)


def _assemble(
    spec: ModelSpec,
    span: LayerSpan,
    t: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
) -> StageWeights:
    def get(name: str) -> torch.Tensor:
        return t[name].to(device=device, dtype=dtype)

    layers = []
    for i in span.layers():
        p = f"model.layers.{i}."
        a = p + "self_attn."
        wqkv = torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"])
        bqkv = torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"]) if spec.qkv_bias else None
        layers.append(
            LayerWeights(
                wqkv=wqkv,
                bqkv=bqkv,
                wo=get(a + "o_proj.weight"),
                w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                w_down=get(p + "mlp.down_proj.weight"),
                ln_attn=get(p + "input_layernorm.weight"),
                ln_mlp=get(p + "post_attention_layernorm.weight"),
            )
        )
    embed = get("model.embed_tokens.weight") if "model.embed_tokens.weight" in t else None
    last = span.end == spec.n_layers
    norm = get("model.norm.weight") if last else None
    head = (embed if spec.tie_embeddings else get("lm_head.weight")) if last else None
    return StageWeights(layers, embed if span.start == 0 else None, norm, head)


def load_stage_weights(
    source: str | os.PathLike[str],
    span: LayerSpan,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, StageWeights, LoadStats]:
    hub_id = (
        str(source)
        if not Path(os.path.expanduser(str(source))).exists() and _is_hub_id(str(source))
        else None
    )
    src = resolve_source(source)
    spec = spec or ModelSpec.from_hf_config(load_hf_config(source), name=str(source))
    span.check_within(spec.n_layers)
    stats = LoadStats()
    tensors = _reader(src, spec, hub_id).read(stage_tensor_names(spec, span), stats)
    weights = _assemble(spec, span, tensors, parse_dtype(dtype), device)
    log.info(
        "loaded stage %s of %s: %d tensors, %.1f MB", span, source, len(stats.tensors), stats.bytes_read / 1e6
    )
    return spec, weights, stats


def load_stage(
    source: str | os.PathLike[str],
    span: LayerSpan | tuple[int, int],
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spec: ModelSpec | None = None,
) -> TorchStage:
    """A ready ``TorchStage`` for ``span`` of the model at ``source``."""
    span = span if isinstance(span, LayerSpan) else LayerSpan(*span)
    spec, weights, stats = load_stage_weights(source, span, dtype, device, spec)
    stage = TorchStage(spec, span, weights, parse_dtype(dtype), device)
    stage.load_stats = stats  # type: ignore[attr-defined]
    return stage


def random_stage_weights(
    spec: ModelSpec,
    span: LayerSpan,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    std: float = 0.02,
) -> StageWeights:
    """Random weights for ``span``; layer i's values depend only on (seed, i), not on the span.

    On CUDA the values are drawn on the device, in ``dtype``, by a CUDA generator (a 70B shard is
    built in seconds, without a host copy); they differ from the CPU draw of the same seed."""
    span.check_within(spec.n_layers)
    h, d, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    qkv_rows = (spec.n_heads + 2 * spec.n_kv_heads) * d
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"

    def generator(seed_value: int) -> torch.Generator:
        return (torch.Generator(device=dev) if on_gpu else torch.Generator()).manual_seed(seed_value)

    def rnd(gen: torch.Generator, *shape: int) -> torch.Tensor:
        if on_gpu:
            return torch.empty(shape, dtype=dtype, device=dev).normal_(0.0, std, generator=gen)
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        return t.to(device=device, dtype=dtype)

    layers = []
    for i in span.layers():
        g = generator(seed * 100_003 + i)
        layers.append(
            LayerWeights(
                wqkv=rnd(g, qkv_rows, h),
                bqkv=rnd(g, qkv_rows) if spec.qkv_bias else None,
                wo=rnd(g, h, spec.n_heads * d),
                w_gate_up=rnd(g, 2 * f, h),
                w_down=rnd(g, h, f),
                ln_attn=torch.ones(h, dtype=dtype, device=device),
                ln_mlp=torch.ones(h, dtype=dtype, device=device),
            )
        )
    g = generator(seed * 100_003 - 1)
    embed = (
        rnd(g, spec.vocab_size, h)
        if span.start == 0 or (spec.tie_embeddings and span.end == spec.n_layers)
        else None
    )
    last = span.end == spec.n_layers
    head = None
    if last:
        head = embed if spec.tie_embeddings else rnd(generator(seed * 100_003 - 2), spec.vocab_size, h)
    norm = torch.ones(h, dtype=dtype, device=device) if last else None
    return StageWeights(layers, embed if span.start == 0 else None, norm, head)
