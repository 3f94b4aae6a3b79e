"""ModelSpec: the typed shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2).

Built from a transformers config (4.x ``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``)
or from a named preset for planning and speed work without weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hyperlane_lab.errors import ModelLoadError

__all__ = ["PRESETS", "SUPPORTED_MODEL_TYPES", "ModelSpec"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # "llama" | "mistral" | "qwen2"
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; () = plain RoPE
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # None = full attention
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    name: str = ""
    # layers that ignore ``sliding_window`` (Qwen2's first ``max_window_layers``); () = all use it
    full_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {self.model_type!r}; hyperlane_lab supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)"
            )
        for f in (
            "n_layers",
            "hidden_size",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            if getattr(self, f) <= 0:
                raise ModelLoadError(f"model config field {f} must be > 0, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of decoder layer ``layer`` (None = full causal attention)."""
        return None if layer in self.full_attention_layers else self.sliding_window

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def n_params(self) -> int:
        """Parameter count (embedding and head counted once each unless tied)."""
        h, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        attn = h * self.n_heads * self.head_dim * 2 + h * kv * 2
        if self.qkv_bias:
            attn += self.n_heads * self.head_dim + 2 * kv
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.n_layers * layer + emb * (1 if self.tie_embeddings else 2) + h

    def to_hf_config_dict(self) -> dict[str, Any]:
        """A transformers config.json dict of this shape (for workers building random weights)."""
        rope: dict[str, Any] = {
            "rope_theta": self.rope_theta,
            "rope_type": "default",
            **dict(self.rope_scaling),
        }
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [f"{self.model_type.capitalize()}ForCausalLM"],
            "num_hidden_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "sliding_window": self.sliding_window,
            "use_sliding_window": self.sliding_window is not None,
            "max_window_layers": 0,
            "layer_types": [
                "full_attention" if self.layer_window(i) is None else "sliding_attention"
                for i in range(self.n_layers)
            ],
        }
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    def with_layers(self, n_layers: int) -> ModelSpec:
        return replace(self, n_layers=n_layers)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_config(cls, cfg: Any, name: str = "") -> ModelSpec:
        """From a transformers ``PretrainedConfig`` (or anything with the same attributes)."""
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r} (from {name or 'config'}); hyperlane_lab supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}: pick a Llama, Mistral or Qwen2 checkpoint"
            )
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        rope_params = getattr(cfg, "rope_parameters", None)
        if rope_params:  # transformers >= 5
            params = dict(rope_params)
            theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        else:
            theta = float(getattr(cfg, "rope_theta", 10000.0))
            params = dict(getattr(cfg, "rope_scaling", None) or {})
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ModelLoadError(
                f"RoPE scaling type {rope_type!r} is not supported; supported: default, linear, llama3"
            )
        scaling = () if rope_type == "default" else tuple(sorted({**params, "rope_type": rope_type}.items()))
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if model_type != "qwen2" and (
            getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)
        ):
            # Llama's attention_bias also puts a bias on o_proj, mlp_bias on gate/up/down: not modelled here
            raise ModelLoadError(
                f"{name or 'this config'} sets attention_bias or mlp_bias, which hyperlane_lab does not "
                "support for Llama/Mistral; use a checkpoint without projection biases"
            )
        n_layers = cfg.num_hidden_layers
        window = getattr(cfg, "sliding_window", None)
        full_layers: tuple[int, ...] = ()
        if model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None
        if window is not None:
            # transformers marks each layer "full_attention" or "sliding_attention"; Qwen2 only windows
            # layers >= max_window_layers (older configs carry no layer_types: apply that rule here)
            types = getattr(cfg, "layer_types", None)
            if types is None and model_type == "qwen2":
                mwl = int(getattr(cfg, "max_window_layers", 0))
                types = ["full_attention" if i < mwl else "sliding_attention" for i in range(n_layers)]
            if types is not None:
                full_layers = tuple(i for i, t in enumerate(types) if t != "sliding_attention")
                if len(full_layers) >= n_layers:
                    window, full_layers = None, ()
        return cls(
            model_type=model_type,
            n_layers=n_layers,
            hidden_size=cfg.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_eps=float(cfg.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(getattr(cfg, "max_position_embeddings", 4096)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            sliding_window=window,
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=eos_ids,
            name=name or getattr(cfg, "_name_or_path", ""),
            full_attention_layers=full_layers,
        )

    @classmethod
    def from_pretrained(cls, source: str) -> ModelSpec:
        """From an HF folder, a GGUF file, or a hub id (config only)."""
        from hyperlane_lab.models.loading import load_hf_config

        return cls.from_hf_config(load_hf_config(source), name=str(source))

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
            ) from None


_LLAMA3_SCALING = (
    ("factor", 8.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)

# Published shapes; weights are random when these are instantiated for speed work.
PRESETS: dict[str, ModelSpec] = {
    "llama-2-7b": ModelSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000, 1e-5, name="llama-2-7b"),
    "llama-2-13b": ModelSpec("llama", 40, 5120, 40, 40, 128, 13824, 32000, 1e-5, name="llama-2-13b"),
    "llama-2-70b": ModelSpec("llama", 80, 8192, 64, 8, 128, 28672, 32000, 1e-5, name="llama-2-70b"),
    "llama-3-8b": ModelSpec(
        "llama",
        32,
        4096,
        32,
        8,
        128,
        14336,
        128256,
        1e-5,
        500000.0,
        (),
        8192,
        bos_token_id=128000,
        eos_token_ids=(128001,),
        name="llama-3-8b",
    ),
    "llama-3-70b": ModelSpec(
        "llama",
        80,
        8192,
        64,
        8,
        128,
        28672,
        128256,
        1e-5,
        500000.0,
        (),
        8192,
        bos_token_id=128000,
        eos_token_ids=(128001,),
        name="llama-3-70b",
    ),
    "llama-3.1-8b": ModelSpec(
        "llama",
        32,
        4096,
        32,
        8,
        128,
        14336,
        128256,
        1e-5,
        500000.0,
        _LLAMA3_SCALING,
        131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        name="llama-3.1-8b",
    ),
    "mistral-7b": ModelSpec(
        "mistral", 32, 4096, 32, 8, 128, 14336, 32000, 1e-5, 1000000.0, (), 32768, name="mistral-7b"
    ),
    "qwen2-7b": ModelSpec(
        "qwen2",
        28,
        3584,
        28,
        4,
        128,
        18944,
        152064,
        1e-6,
        1000000.0,
        (),
        32768,
        qkv_bias=True,
        bos_token_id=None,
        eos_token_ids=(151643,),
        name="qwen2-7b",
    ),
    "tiny-100m": ModelSpec("llama", 12, 768, 12, 4, 64, 2048, 32000, 1e-5, name="tiny-100m"),
}
