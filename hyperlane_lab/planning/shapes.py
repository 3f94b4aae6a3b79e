"""ModelProfile builders: per-layer FLOPs and bytes of a Llama-family decoder, from its shape.

Counting rules (one decoder layer, one token, ``d`` = dtype bytes):

* params = q (H·nh·hd) + k, v (H·nkv·hd each) + o (nh·hd·H) + MLP (3·H·F) + 2 RMSNorm (2·H)
  [+ q/k/v biases (nh·hd + 2·nkv·hd) for Qwen2];
* FLOPs per token = 2 × params (one multiply-add per weight);
* attention over context adds 4·nh·hd FLOPs per context token (QKᵀ and A·V, 2·nh·hd each);
* weight bytes = params × d; KV bytes per token = 2·nkv·hd·d (K and V);
* activation bytes per token crossing a stage boundary = H × 2 (hidden state in fp16).

The first stage holds the embedding table (V·H·d); the last holds the final norm and the LM head
(H + V·H)·d. With tied embeddings the last stage still needs its own copy of the table (unless it
is also the first stage; a single-stage plan is then over-counted by one table, a safe error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from hyperlane_lab.types import ModelProfile

__all__ = [
    "PRESET_SHAPES",
    "ShapeSpec",
    "SpecLike",
    "model_profile_from_spec",
    "preset_names",
    "preset_profile",
    "shape_from_hf_config",
]


class SpecLike(Protocol):
    """What ``model_profile_from_spec`` reads (the lead's ``ModelSpec`` has these attributes)."""

    @property
    def n_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def tie_embeddings(self) -> bool: ...


@dataclass(frozen=True)
class ShapeSpec:
    """The shape fields a planner needs; a minimal stand-in for ``ModelSpec``."""

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for field in (
            "n_layers",
            "hidden_size",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {field} must be a positive int, got {value!r}")


# Published shapes (model cards / config.json of the official checkpoints): one list, the model
# core's presets (``models/config.py`` imports no torch), viewed here as planning shapes.
def _preset_shapes() -> Mapping[str, ShapeSpec]:
    from hyperlane_lab.models.config import PRESETS

    return MappingProxyType(
        {
            name: ShapeSpec(
                name,
                s.n_layers,
                s.hidden_size,
                s.n_heads,
                s.n_kv_heads,
                s.head_dim,
                s.intermediate_size,
                s.vocab_size,
                tie_embeddings=s.tie_embeddings,
                qkv_bias=s.qkv_bias,
            )
            for name, s in PRESETS.items()
        }
    )


PRESET_SHAPES: Mapping[str, ShapeSpec] = _preset_shapes()


def preset_names() -> list[str]:
    return sorted(PRESET_SHAPES)


def layer_params(spec: Any) -> int:
    """Parameters of one decoder layer of ``spec`` (duck-typed, see module docstring)."""
    h, nh, nkv, hd = spec.hidden_size, spec.n_heads, spec.n_kv_heads, spec.head_dim
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    if bool(getattr(spec, "qkv_bias", False)):
        attn += nh * hd + 2 * nkv * hd
    mlp = 3 * h * spec.intermediate_size
    return int(attn + mlp + 2 * h)


def model_profile_from_spec(
    spec: SpecLike | Any, dtype_bytes: int = 2, name: str | None = None
) -> ModelProfile:
    """Per-layer costs of ``spec`` at ``dtype_bytes`` bytes per weight and per KV element.

    ``spec`` is duck-typed: n_layers, hidden_size, n_heads, n_kv_heads, head_dim,
    intermediate_size, vocab_size, tie_embeddings (and optionally qkv_bias, name).
    """
    if dtype_bytes not in (1, 2, 4):
        raise ValueError(f"dtype_bytes must be 1 (int8), 2 (fp16/bf16) or 4 (fp32), got {dtype_bytes!r}")
    n_layers = int(spec.n_layers)
    h, v = int(spec.hidden_size), int(spec.vocab_size)
    params = layer_params(spec)
    label = name or str(getattr(spec, "name", "") or "model")
    return ModelProfile(
        name=label,
        n_layers=n_layers,
        layer_flops_per_token=(2.0 * params,) * n_layers,
        layer_weight_bytes=(params * dtype_bytes,) * n_layers,
        kv_bytes_per_token=2 * int(spec.n_kv_heads) * int(spec.head_dim) * dtype_bytes,
        act_bytes_per_token=h * 2,
        embed_bytes=v * h * dtype_bytes,
        head_bytes=(h + v * h) * dtype_bytes,
        head_flops_per_token=2.0 * v * h,
        attn_flops_per_token_per_ctx=4.0 * int(spec.n_heads) * int(spec.head_dim),
        dtype_bytes=dtype_bytes,
    )


def preset_profile(name: str, dtype_bytes: int = 2) -> ModelProfile:
    """ModelProfile of a named preset (see ``preset_names()``)."""
    try:
        shape = PRESET_SHAPES[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; valid presets: {', '.join(preset_names())} "
            "(or pass a checkpoint path / hub id to read its config)"
        ) from None
    return model_profile_from_spec(shape, dtype_bytes=dtype_bytes)


def shape_from_hf_config(cfg: Any, name: str = "") -> ShapeSpec:
    """A ShapeSpec from a transformers config (duck-typed on its attribute names)."""
    missing = [
        f
        for f in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if getattr(cfg, f, None) is None
    ]
    if missing:
        raise ValueError(
            f"model config {name or '?'} lacks {', '.join(missing)}; only Llama-family decoder configs "
            "(llama, mistral, qwen2) can be planned"
        )
    n_heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    qkv_bias = getattr(cfg, "model_type", "") == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    return ShapeSpec(
        name=name or str(getattr(cfg, "_name_or_path", "") or "model"),
        n_layers=int(cfg.num_hidden_layers),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        intermediate_size=int(cfg.intermediate_size),
        vocab_size=int(cfg.vocab_size),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )
