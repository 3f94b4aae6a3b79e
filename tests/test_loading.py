"""Loading a stage reads only its span (safetensors shards, GGUF), dtypes, and load/input errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.models import ModelSpec, load_stage, parse_dtype
from hyperlane_lab.types import LayerSpan
from tests.helpers_models import (
    BUNDLED,
    SHARED_GGUF,
    hf_bundled,
    hf_greedy,
    llama_cpp_permute,
    load_stages,
    make_checkpoint,
    open_all,
    run_stages,
    safetensors_header,
    single_thread,
    spy_safe_open,
    tiny_config,
    write_gguf,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _bundled_logits(stages: list, ids: list[int]) -> torch.Tensor:
    with open_all(stages, 1, len(ids)) as sid:
        return run_stages(stages, sid, torch.tensor([ids]), torch.arange(len(ids))[None], all_logits=True)[0]


PROMPT_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376]  # "Once upon a time, there was a little"


# ------------------------------------------------------------------ span loading, safetensors shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("llama32")
    cfg = tiny_config(
        "llama",
        num_hidden_layers=32,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = make_checkpoint(folder, cfg, seed=11, max_shard_size=20_000)  # ~8 KB a layer: many shards
    return folder, model


def test_span_reads_only_its_layers(sharded: tuple[Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, model = sharded
    weight_map: dict[str, str] = json.loads((folder / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    shards = set(weight_map.values())
    assert len(shards) >= 5
    wanted = {n for n in weight_map if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert len(wanted) == 2 * 9
    wanted_files = {weight_map[n] for n in wanted}
    assert wanted_files < shards  # the span's shards are a strict subset

    with spy_safe_open(monkeypatch) as spy:
        stage = load_stage(str(folder), (2, 4))
    stats = stage.load_stats
    assert set(stats.tensors) == wanted and len(stats.tensors) == len(wanted)
    assert not any("embed" in n or "lm_head" in n or n == "model.norm.weight" for n in stats.tensors)
    headers = {f: safetensors_header(folder / f) for f in wanted_files}
    expected_bytes = sum(
        headers[weight_map[n]][n]["data_offsets"][1] - headers[weight_map[n]][n]["data_offsets"][0]
        for n in wanted
    )
    assert stats.bytes_read == expected_bytes
    assert set(stats.files_opened) == wanted_files
    # independent of our own bookkeeping: what safetensors itself was asked for
    assert set(spy.opened) == wanted_files and len(spy.opened) == len(wanted_files)
    assert {n for _, n in spy.read} == wanted and all(weight_map[n] == f for f, n in spy.read)
    assert stage.weights.embed is None and stage.weights.lm_head is None and stage.weights.norm is None

    # the middle stage computes what transformers' layers 2 and 3 compute
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 60]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [0] = embeddings
    with open_all([stage], 1, 8) as sid:
        out = stage.forward(sid, hidden[2], torch.arange(7)[None])
    torch.testing.assert_close(out, hidden[4], atol=1e-5, rtol=0)


def test_first_and_last_stage_read_embedding_and_head(sharded: tuple[Path, object]) -> None:
    folder, _ = sharded
    first = load_stage(str(folder), (0, 1)).load_stats.tensors
    last = load_stage(str(folder), (31, 32)).load_stats.tensors
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {"lm_head.weight", "model.norm.weight"} <= set(last) and "model.embed_tokens.weight" not in last


def test_tied_last_stage_reads_embedding_as_head(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path, tiny_config("qwen2", tie_word_embeddings=True), seed=2)
    assert "lm_head.weight" not in safetensors_header(tmp_path / "model.safetensors")
    stage = load_stage(str(tmp_path), (2, 3))
    assert "model.embed_tokens.weight" in stage.load_stats.tensors
    torch.testing.assert_close(stage.weights.lm_head, model.lm_head.weight.detach(), atol=0, rtol=0)


# ------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def gguf_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(BUNDLED, tmp_path_factory.mktemp("gguf") / "stories-f32.gguf")


def test_gguf_logits_equal_safetensors(gguf_f32: Path) -> None:
    spans = [(0, 2), (2, 5)]
    ref = _bundled_logits(load_stages(BUNDLED, spans), PROMPT_IDS)
    stages = load_stages(gguf_f32, spans)
    assert stages[0].spec.n_layers == 5 and stages[0].spec.n_kv_heads == 4
    torch.testing.assert_close(_bundled_logits(stages, PROMPT_IDS), ref, atol=1e-6, rtol=0)
    tail = stages[1].load_stats
    assert tail.files_opened == [gguf_f32.name]
    assert "model.embed_tokens.weight" not in tail.tensors
    assert {n.split(".")[2] for n in tail.tensors if n.startswith("model.layers.")} == {"2", "3", "4"}


def test_gguf_f16_weights_are_the_rounded_originals(tmp_path: Path) -> None:
    path = write_gguf(BUNDLED, tmp_path / "stories-f16.gguf", matrices_f16=True)
    stage = load_stage(str(path), (1, 3))
    sd = load_file(str(BUNDLED / "model.safetensors"))
    layer = stage.weights.layers[1]  # model layer 2
    qkv = torch.cat([sd[f"model.layers.2.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(layer.wqkv, qkv.half().float())  # permuted on write, un-permuted on read
    assert torch.equal(layer.w_down, sd["model.layers.2.mlp.down_proj.weight"].half().float())
    assert torch.equal(layer.ln_attn, sd["model.layers.2.input_layernorm.weight"])  # norms stay F32


@pytest.mark.skipif(not SHARED_GGUF.exists(), reason=f"{SHARED_GGUF} not present (CI has ../shared)")
def test_shared_gguf_tells_the_story() -> None:
    model, tok = hf_bundled()
    prompt = "Once upon a time"
    expected = hf_greedy(model, tok(prompt)["input_ids"], 24)
    pipe = InProcessPipeline.from_pretrained(str(SHARED_GGUF), n_stages=2)
    res = pipe.generate(prompt, max_tokens=24)
    assert res.token_ids == expected
    assert res.text.startswith(", there was a little girl named Lily")


@pytest.mark.skipif(not SHARED_GGUF.exists(), reason=f"{SHARED_GGUF} not present (CI has ../shared)")
def test_gguf_writer_matches_llama_cpp_layout() -> None:
    # the q/k permutation our test writer applies is the one llama.cpp's converter applied to this model
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(SHARED_GGUF)).tensors}
    sd = load_file(str(BUNDLED / "model.safetensors"))
    for i in (0, 4):
        for proj, heads in (("q", 8), ("k", 4)):
            raw = np.asarray(tensors[f"blk.{i}.attn_{proj}.weight"].data)
            hf = sd[f"model.layers.{i}.self_attn.{proj}_proj.weight"].numpy()
            assert not np.array_equal(raw, hf)
            np.testing.assert_array_equal(raw, llama_cpp_permute(hf, heads))


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype,rel_tol", [("fp16", 0.01), ("bf16", 0.04)])  # measured: 0.002, 0.01
def test_half_dtypes_close_to_fp32(dtype: str, rel_tol: float) -> None:
    ref = _bundled_logits(load_stages(BUNDLED, [(0, 3), (3, 5)]), PROMPT_IDS)
    stages = load_stages(BUNDLED, [(0, 3), (3, 5)], dtype=dtype)
    assert stages[0].weights.layers[0].wqkv.dtype == parse_dtype(dtype)
    got = _bundled_logits(stages, PROMPT_IDS)
    assert got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert 0 < err < rel_tol * ref.abs().max().item()  # really half precision, still the same model
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ------------------------------------------------------------------ errors name the problem and the fix


def test_span_errors() -> None:
    with pytest.raises(ValueError, match=r"out of range for a model with 5 layers.*within \[0, 5\)"):
        load_stage(str(BUNDLED), (3, 7))
    with pytest.raises(ValueError, match=r"empty.*need 0 <= start < end"):
        load_stage(str(BUNDLED), (2, 2))


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found: no such file or folder"):
        load_stage(str(tmp_path / "nope"), (0, 1))
    with pytest.raises(ModelLoadError, match="not found"):
        load_stage(str(tmp_path / "nope.gguf"), (0, 1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json; pass an HF model folder"):
        load_stage(str(tmp_path / "empty"), (0, 1))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf; pass an HF folder or a \.gguf file"):
        load_stage(str(tmp_path / "weights.bin"), (0, 1))
    cfg_only = tmp_path / "cfg_only"
    tiny_config("llama").save_pretrained(cfg_only)
    with pytest.raises(ModelLoadError, match=r"has no model\.safetensors"):
        load_stage(str(cfg_only), (0, 1))


def test_unsupported_architecture(tmp_path: Path) -> None:
    tiny_config("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'gpt2'.*Llama, Mistral or Qwen2"):
        load_stage(str(tmp_path), (0, 1))
    with pytest.raises(ModelLoadError, match="attention_bias or mlp_bias"):
        ModelSpec.from_hf_config(tiny_config("llama", attention_bias=True))


def test_missing_tensor_and_shard(tmp_path: Path, sharded: tuple[Path, object]) -> None:
    make_checkpoint(tmp_path, tiny_config("llama"), seed=1)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    load_stage(str(tmp_path), (2, 3))  # layer 1 is not needed here
    with pytest.raises(
        ModelLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing.*complete"
    ):
        load_stage(str(tmp_path), (1, 2))

    folder, _ = sharded
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).symlink_to(f)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.5.mlp.up_proj.weight"
    ]
    (broken / shard).unlink()
    with pytest.raises(ModelLoadError, match=rf"{shard} is missing; re-download"):
        load_stage(str(broken), (5, 6))

    # an index that does not list a tensor the span needs
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.7.self_attn.k_proj.weight"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError, match=r"'model\.layers\.7\.self_attn\.k_proj\.weight' is not listed in .*index\.json"
    ):
        load_stage(str(broken), (7, 8))


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; use one of fp32, fp16, bf16"):
        load_stage(str(BUNDLED), (0, 1), dtype="fp8")


def test_stage_input_errors() -> None:
    first, last = load_stages(BUNDLED, [(0, 2), (2, 5)])
    with open_all([first, last], 1, 8) as sid:
        pos = torch.arange(3)[None]
        with pytest.raises(
            ValueError, match=r"position 8 is beyond .* max length 8; open the session with a larger max_len"
        ):
            first.forward(sid, torch.tensor([[1, 2, 3]]), pos + 6)
        with pytest.raises(
            ValueError,
            match=r"token ids must be in \[0, 512\), got ids in \[1, 600\]; encode prompts with this model's tokenizer",
        ):
            first.forward(sid, torch.tensor([[1, 600, 3]]), pos)
        with pytest.raises(ValueError, match=r"takes hidden states \[B, S, 64\], got \(1, 3, 32\)"):
            last.forward(sid, torch.zeros(1, 3, 32), pos)
        with pytest.raises(ValueError, match=r"opened with batch 1, got batch 2"):
            first.forward(sid, torch.ones(2, 3, dtype=torch.int64), pos.expand(2, 3).contiguous())
        with pytest.raises(ValueError, match=r"disagree on \[B, S\]"):
            first.forward(sid, torch.ones(1, 4, dtype=torch.int64), pos)
    with pytest.raises(KeyError, match=r"unknown session 'nope'.*open it first"):
        first.forward("nope", torch.tensor([[1]]), torch.zeros(1, 1, dtype=torch.int64))
    first.open_session("dup", 1, 4)
    with pytest.raises(ValueError, match="already open"):
        first.open_session("dup", 1, 4)
    first.close_session("dup")


def test_spec_random_stage_shapes() -> None:
    # TorchStage.random builds a preset-shaped stage; a forward pass produces hidden states of the right shape
    from hyperlane_lab.models import TorchStage

    spec = ModelSpec.preset("tiny-100m").with_layers(2)
    stage = TorchStage.random(spec, LayerSpan(0, 1), seed=0)
    with open_all([stage], 1, 4) as sid:
        out = stage.forward(sid, torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert out.shape == (1, 3, 768) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mistral", {"head_dim": 16})],
)
def test_spec_param_count_matches_transformers(family: str, overrides: dict) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    n_hf = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    assert ModelSpec.from_hf_config(cfg).n_params == n_hf
