"""Shapes, catalog and the analytic cost model, against published numbers and hand formulas."""

from __future__ import annotations

import math

import pytest

from hyperlane_lab.planning import (
    CATALOG,
    PRESET_SHAPES,
    codec_ratio,
    device_from_catalog,
    model_profile_from_spec,
    preset_profile,
    shape_from_hf_config,
    stage_decode_s,
    stage_memory,
    stage_prefill_s,
)
from hyperlane_lab.planning.cost import Links, link_s
from hyperlane_lab.types import DeviceProfile, LayerSpan, LinkProfile

# Parameter counts published with the checkpoints (model cards / papers), in billions.
PUBLISHED_PARAMS_B = {
    "llama-2-7b": 6.74,
    "llama-2-13b": 13.02,
    "llama-2-70b": 68.98,
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.55,
    "mistral-7b": 7.24,
    "qwen2-7b": 7.62,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_preset_weight_bytes_match_published_parameter_counts(name: str) -> None:
    prof = preset_profile(name, dtype_bytes=2)
    shape = PRESET_SHAPES[name]
    # head_bytes includes the final norm; a tied table would be counted once in the published figure
    total_params = (sum(prof.layer_weight_bytes) + prof.embed_bytes + prof.head_bytes) / 2
    if shape.tie_embeddings:
        total_params -= prof.embed_bytes / 2
    assert total_params / 1e9 == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.005)


def test_profile_formulas_for_a_hand_built_gqa_shape() -> None:
    class Spec:  # duck-typed like the lead's ModelSpec
        n_layers, hidden_size, n_heads, n_kv_heads, head_dim = 3, 64, 8, 2, 8
        intermediate_size, vocab_size, tie_embeddings = 160, 1000, True

    prof = model_profile_from_spec(Spec(), dtype_bytes=2, name="toy")
    params = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 160 + 2 * 64
    assert prof.layer_weight_bytes == (2 * params,) * 3
    assert prof.layer_flops_per_token == (2.0 * params,) * 3
    assert prof.kv_bytes_per_token == 2 * 2 * 8 * 2
    assert prof.act_bytes_per_token == 128
    assert prof.embed_bytes == 1000 * 64 * 2
    assert prof.attn_flops_per_token_per_ctx == 4 * 8 * 8


def test_shape_from_hf_config_defaults_head_dim_and_kv_heads() -> None:
    class Cfg:
        model_type = "llama"
        num_hidden_layers, hidden_size, num_attention_heads = 4, 256, 8
        intermediate_size, vocab_size, tie_word_embeddings = 512, 300, False

    shape = shape_from_hf_config(Cfg(), name="x")
    assert (shape.head_dim, shape.n_kv_heads, shape.qkv_bias) == (32, 8, False)


def test_catalog_lookup_and_unknown_name() -> None:
    dev = device_from_catalog("RTX 4090")
    assert dev.memory_bytes == 24 * 2**30 and dev.mem_bw == pytest.approx(1008e9)
    assert all(e.source for e in CATALOG.values())
    with pytest.raises(ValueError, match="rtx3090"):
        device_from_catalog("rtx9999")


def test_batch1_decode_is_memory_bound_weight_read() -> None:
    prof = preset_profile("llama-2-7b")
    dev = device_from_catalog("rtx3090")
    span = LayerSpan(1, 5)  # middle stage: no embedding, no head
    t = stage_decode_s(prof, dev, span, batch=1, context=0)
    # hand roofline: 4 layers, each reads its weights + writes one KV row; FLOPs far below peak
    per_layer_bytes = prof.layer_weight_bytes[0] + prof.kv_bytes_per_token
    assert t == pytest.approx(4 * per_layer_bytes / dev.mem_bw, rel=1e-12)


def test_large_batch_prefill_becomes_compute_bound() -> None:
    prof = preset_profile("llama-2-7b")
    dev = device_from_catalog("rtx3090")
    n = 2048
    t = stage_prefill_s(prof, dev, LayerSpan(1, 2), batch=1, tokens=n)
    flops = n * prof.layer_flops_per_token[1] + prof.attn_flops_per_token_per_ctx * n * (n + 1) / 2
    assert t == pytest.approx(flops / dev.flops, rel=1e-12)


def test_calibrated_layer_time_reproduces_measurement_and_scales() -> None:
    prof = preset_profile("llama-2-7b")
    base = device_from_catalog("rtx3090")
    measured = DeviceProfile("m", base.memory_bytes, base.flops, base.mem_bw, layer_decode_s=1e-3)
    span = LayerSpan(1, 2)
    assert stage_decode_s(prof, measured, span, 1, 0) == pytest.approx(1e-3, rel=1e-12)
    ratio = stage_decode_s(prof, base, span, 8, 2048) / stage_decode_s(prof, base, span, 1, 0)
    assert stage_decode_s(prof, measured, span, 8, 2048) == pytest.approx(1e-3 * ratio, rel=1e-12)
    assert stage_decode_s(prof, measured, span, 8, 2048, calibrated=False) == pytest.approx(
        stage_decode_s(prof, base, span, 8, 2048), rel=1e-12
    )


def test_memory_breakdown_of_first_and_last_stage() -> None:
    prof = preset_profile("llama-2-7b")
    first = stage_memory(prof, LayerSpan(0, 2), kv_tokens=1000, act_tokens=10, headroom_bytes=7)
    assert first.weights == 2 * prof.layer_weight_bytes[0] + prof.embed_bytes
    assert first.kv == 2 * 1000 * prof.kv_bytes_per_token
    last = stage_memory(prof, LayerSpan(30, 32), 0, 10, 0)
    assert last.weights == 2 * prof.layer_weight_bytes[0] + prof.head_bytes
    assert last.total == last.weights + last.activations


def test_link_time_and_codec_ratios() -> None:
    link = LinkProfile(latency_s=1e-3, bandwidth=1e6)
    assert link_s(link, 2000, codec_ratio("int8")) == pytest.approx(1e-3 + 2000 * 0.53 / 1e6)
    assert codec_ratio("int4") < codec_ratio("int8") < codec_ratio("fp16") == 1.0
    assert codec_ratio("zstd", {"zstd": 0.7}) == 0.7
    with pytest.raises(ValueError, match="known codecs"):
        codec_ratio("zstd")


def test_links_override_serves_both_directions_unless_reverse_given() -> None:
    d, fast, slow = LinkProfile(1e-3, 1e6), LinkProfile(1e-4, 1e9), LinkProfile(1e-2, 1e5)
    links = Links(d, (("a", "b", fast), ("c", "a", slow), ("a", "c", fast)))
    assert links.between("a", "b") is fast and links.between("b", "a") is fast
    assert links.between("c", "a") is slow and links.between("a", "c") is fast
    assert links.between("b", "c") is d
    assert math.isfinite(link_s(links.between("x", "y"), 10))


def test_planning_and_model_presets_import_without_torch() -> None:
    """Planning (and the presets it shares with the model core) stays light: no torch import."""
    import subprocess
    import sys

    code = (
        "import sys, hyperlane_lab.planning as p, hyperlane_lab.models.config as c; "
        "assert set(p.PRESET_SHAPES) == set(c.PRESETS); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
