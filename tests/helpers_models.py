"""Shared test utilities for the model core: tiny random HF checkpoints, transformers references,
running stages by hand, GGUF writing and a spy on safetensors reads.

Everything here builds its oracle from transformers (or the file formats' own headers), never from
hyperlane_lab's code, so the tests that use it can catch a wrong model, loader or generator.
"""

from __future__ import annotations

import functools
import inspect
import json
import struct
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.models import bundled_model_path, load_stage
from hyperlane_lab.types import LayerSpan

__all__ = [
    "BUNDLED",
    "SHARED_GGUF",
    "SafeOpenSpy",
    "hf_bundled",
    "hf_greedy",
    "hf_step_logits",
    "llama_cpp_permute",
    "load_stages",
    "make_checkpoint",
    "open_all",
    "run_stages",
    "safetensors_header",
    "single_thread",
    "spy_safe_open",
    "tiny_config",
    "write_gguf",
]

BUNDLED: Path = bundled_model_path()
# CI checks the repo out next to ../shared; the file is optional (tests skip without it).
SHARED_GGUF: Path = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K-fixed.gguf"


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: these models are tiny, and on a shared, loaded CPU two spinning
    OpenMP threads make each small op tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ transformers references


@functools.cache
def hf_bundled() -> tuple[Any, Any]:
    """(model, tokenizer) of the bundled checkpoint, loaded by transformers (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(
        BUNDLED, attn_implementation="eager", dtype=torch.float32
    ).eval()
    return model, tok


def hf_greedy(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """transformers' greedy ``generate``: new ids only (EOS included when it stopped there)."""
    ids = torch.tensor([list(prompt_ids)])
    kwargs: dict[str, Any] = {"eos_token_id": eos_token_id} if eos_token_id is not None else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def hf_step_logits(
    model: Any, prompt_ids: Sequence[int], n_decode: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Prefill logits [S, V], then ``n_decode`` greedy decode steps with transformers' own KV cache.

    Returns (prefill logits, per-step logits [V] list, the tokens fed at each decode step).
    """
    ids = torch.tensor([list(prompt_ids)])
    # transformers 5.x renamed the forward argument past_key_values -> cache
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].float()
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        steps, fed = [], []
        for _ in range(n_decode):
            fed.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{cache_kw: past})
            past = out.past_key_values
            steps.append(out.logits[0, -1].float())
            nxt = int(out.logits[0, -1].argmax())
    return prefill, steps, fed


# ------------------------------------------------------------------ random tiny checkpoints


def tiny_config(family: str, **overrides: Any) -> Any:
    """A small transformers config of ``family`` ("llama" | "mistral" | "qwen2" | "gpt2")."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, **overrides)
    base: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**base)


def make_checkpoint(folder: Path, cfg: Any, seed: int = 0, max_shard_size: int | str | None = None) -> Any:
    """Random weights for ``cfg`` saved as safetensors in ``folder``; returns the transformers model
    (fp32, eager attention) holding exactly those weights.

    Weights are N(0, 0.1) and norms 1 + N(0, 0.2), biases N(0, 0.1), so every tensor matters
    (transformers' own init leaves norms at 1 and biases at 0, which would hide bugs there).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(folder, **kwargs)
    return model


def load_stages(source: str | Path, spans: Sequence[tuple[int, int]], dtype: str = "fp32") -> list[Any]:
    return [load_stage(str(source), LayerSpan(a, b), dtype) for a, b in spans]


def run_stages(
    stages: Sequence[Any], sid: str, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool = False
) -> torch.Tensor:
    """One pipeline step through every stage (ids [B, S] -> logits [B, V] or [B, S, V])."""
    x = ids
    for i, st in enumerate(stages):
        last = i == len(stages) - 1
        x = st.forward(sid, x, positions, all_logits=all_logits) if last else st.forward(sid, x, positions)
    return x


@contextmanager
def open_all(stages: Sequence[Any], batch: int, max_len: int) -> Iterator[str]:
    sid = uuid.uuid4().hex
    for st in stages:
        st.open_session(sid, batch, max_len)
    try:
        yield sid
    finally:
        for st in stages:
            st.close_session(sid)


# ------------------------------------------------------------------ safetensors spy and headers


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@dataclass
class SafeOpenSpy:
    opened: list[str] = field(default_factory=list)  # file names passed to safe_open
    read: list[tuple[str, str]] = field(default_factory=list)  # (file name, tensor name) of get_tensor calls


@contextmanager
def spy_safe_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[SafeOpenSpy]:
    """Record every ``safetensors.safe_open`` call and every tensor read through it."""
    import safetensors

    real = safetensors.safe_open
    spy = SafeOpenSpy()

    class Handle:
        def __init__(self, filename: str, *args: Any, **kwargs: Any) -> None:
            self._name = Path(filename).name
            spy.opened.append(self._name)
            self._inner = real(filename, *args, **kwargs)

        def __enter__(self) -> Handle:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            spy.read.append((self._name, name))
            return self._inner.get_tensor(name)

        def get_slice(self, name: str) -> Any:
            spy.read.append((self._name, name))
            return self._inner.get_slice(name)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._inner, attr)

    monkeypatch.setattr(safetensors, "safe_open", Handle)
    yield spy


# ------------------------------------------------------------------ GGUF writing


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows of each head from HF's half-split RoPE layout
    (first half of the head dim = real parts) to interleaved pairs: row (2j + r) <- row (r * D/2 + j)."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
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


def write_gguf(hf_folder: Path, out: Path, matrices_f16: bool = False) -> Path:
    """Convert an HF Llama folder to a GGUF the way llama.cpp does (names, q/k permutation), written
    with the ``gguf`` package. ``matrices_f16`` stores 2-D tensors as F16 (norms stay F32)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    sd = load_file(str(hf_folder / "model.safetensors"))
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("test-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])

    def name_of(hf: str) -> str:
        fixed = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }
        if hf in fixed:
            return fixed[hf]
        parts = hf.split(".")
        module, kind = ".".join(parts[3:-1]), parts[-1]
        return f"blk.{parts[2]}.{_GGUF_LAYER_NAMES[module]}.{kind}"

    for hf_name, t in sd.items():
        arr = t.float().numpy()
        if "q_proj" in hf_name:
            arr = llama_cpp_permute(arr, n_heads)
        elif "k_proj" in hf_name:
            arr = llama_cpp_permute(arr, n_kv)
        if matrices_f16 and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(name_of(hf_name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
