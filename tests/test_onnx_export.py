"""ONNX stage export: per-stage parity with TorchStage, the export cache, shard validation, CLI.

The oracle everywhere is ``TorchStage`` run on the same inputs (its own tests check it against
transformers); ONNX outputs and the engine's KV caches must match it to fp32 rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch

from hyperlane_lab.engines.ort_engine import OrtStage, load_ort_stage
from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.models import ModelSpec, TorchStage, bundled_model_path, load_stage
from hyperlane_lab.onnx import (
    GRAPH_VERSION,
    export_stage,
    input_names,
    load_manifest,
    output_names,
    parity_error,
    read_shard_info,
    validate_onnx_shard,
)
from hyperlane_lab.types import LayerSpan

BUNDLED = str(bundled_model_path())
GQA = ModelSpec("llama", 4, 64, 8, 2, 8, 128, 300, max_position=128, name="gqa-test")
QWEN_WINDOW = ModelSpec(
    "qwen2",
    3,
    48,
    6,
    3,
    8,
    96,
    200,
    1e-6,
    50000.0,
    max_position=64,
    qkv_bias=True,
    sliding_window=5,
    full_attention_layers=(0, 1),
    name="qw",  # stage [1, 3) mixes a full and a windowed layer
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def _run_pair(
    ref: TorchStage, ort: OrtStage, steps: list[torch.Tensor], max_len: int, seed: int = 0
) -> float:
    """Feed both stages the same inputs step by step; return the max |diff| of outputs and caches."""
    g = torch.Generator().manual_seed(seed)
    bsz = steps[0].shape[0]
    ref.open_session("s", bsz, max_len)
    ort.open_session("s", bsz, max_len)
    ptrs = [t.data_ptr() for t in ort.session("s").k]
    err = 0.0
    for pos in steps:
        if ref.is_first:
            x = torch.randint(0, ref.spec.vocab_size, pos.shape, generator=g)
        else:
            x = torch.randn(*pos.shape, ref.spec.hidden_size, generator=g)
        want, got = ref.forward("s", x, pos), ort.forward("s", x, pos)
        assert got.shape == want.shape and got.dtype == want.dtype
        err = max(err, float((got - want).abs().max()))
        for a, b in zip(ref.session("s").k + ref.session("s").v, ort.session("s").k + ort.session("s").v):
            err = max(err, float((a[:, :, :-1] - b[:, :, :-1]).abs().max()))  # trash slot aside
    # the cache was updated in place: same buffers as when the session opened
    assert [t.data_ptr() for t in ort.session("s").k] == ptrs
    ref.close_session("s")
    ort.close_session("s")
    return err


def _ragged_steps(lens: list[int], decode: int) -> list[torch.Tensor]:
    """Right-padded prefill of rows with ``lens`` tokens, then ``decode`` one-token steps."""
    width = max(lens)
    pre = torch.full((len(lens), width), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        pre[b, :n] = torch.arange(n)
    steps = [pre]
    for i in range(decode):
        steps.append(torch.tensor([[n + i] for n in lens]))
    return steps


@pytest.mark.parametrize("spans", [[(0, 2), (2, 4), (4, 5)], [(0, 3), (3, 5)]])
def test_bundled_stage_parity_prefill_and_decode(spans: list[tuple[int, int]], cache: Path) -> None:
    # Batch 3 / max_len 40 / 17-token prompts: none of these sizes were seen at export (2, 4, 9).
    steps = _ragged_steps([17, 9, 1], decode=4)
    for sp in spans:
        res = export_stage(None, sp, cache_dir=cache)
        assert res.max_abs_err is None or res.max_abs_err < 1e-4
        err = _run_pair(load_stage(BUNDLED, sp), OrtStage(res.path), steps, max_len=40)
        assert err < 1e-4, f"stage {sp}: max |onnx - torch| = {err}"


@pytest.mark.parametrize("spec", [GQA, QWEN_WINDOW], ids=["llama-gqa", "qwen2-bias-window"])
def test_random_config_parity(spec: ModelSpec, cache: Path) -> None:
    # qwen2 has qkv bias and a 5-token sliding window on layer 2, so 12-token prompts exercise both masks.
    steps = _ragged_steps([12, 7], decode=5)
    cut = spec.n_layers // 2
    for span in (LayerSpan(0, cut), LayerSpan(cut, spec.n_layers)):
        stage = TorchStage.random(spec, span, seed=3, std=0.08)
        res = export_stage(stage, cache_dir=cache)
        assert res.max_abs_err is not None and res.max_abs_err < 1e-4
        err = _run_pair(stage, OrtStage(res.path), steps, max_len=30, seed=5)
        assert err < 1e-4, f"{spec.name} stage {span}: {err}"


def test_parity_check_detects_a_wrong_graph(cache: Path) -> None:
    stage = TorchStage.random(GQA, LayerSpan(0, 2), seed=3, std=0.08)
    res = export_stage(stage, cache_dir=cache)
    other = TorchStage.random(GQA, LayerSpan(0, 2), seed=4, std=0.08)  # different weights
    assert parity_error(other, res.path)[0] > 1e-2


def test_parity_check_with_pooled_torch_caches(cache: Path) -> None:
    """On CUDA a torch stage's caches are longer than asked (pooled sizes): the check compares the
    session's positions only, and still catches wrong weights."""
    from hyperlane_lab.models.cuda_decode import GraphDecoder

    stage = TorchStage.random(GQA, LayerSpan(0, 2), seed=3, std=0.08)
    res = export_stage(stage, cache_dir=cache)
    exact = parity_error(stage, res.path)
    gd = GraphDecoder(stage, compile_layers=False)
    stage._new_cache, stage._release = gd.new_cache, gd.release  # what TorchStage does on CUDA
    assert gd.cache_len(12) > 12
    assert parity_error(stage, res.path) == exact
    other = TorchStage.random(GQA, LayerSpan(0, 2), seed=4, std=0.08)
    gd2 = GraphDecoder(other, compile_layers=False)
    other._new_cache, other._release = gd2.new_cache, gd2.release
    assert parity_error(other, res.path)[0] > 1e-2


def test_fp16_export_matches_fp16_torch(cache: Path) -> None:
    stage = load_stage(BUNDLED, (3, 5), dtype="fp16")
    res = export_stage(stage, cache_dir=cache)
    assert res.dtype == "fp16" and read_shard_info(res.path).dtype == "fp16"
    ref32 = load_stage(BUNDLED, (3, 5))
    ort = OrtStage(res.path)
    steps = _ragged_steps([6, 3], decode=2)
    # fp16 logits vs the fp32 model: bounded by fp16 rounding, not by the export
    err = 0.0
    g = torch.Generator().manual_seed(0)
    ref32.open_session("s", 2, 12)
    ort.open_session("s", 2, 12)
    for pos in steps:
        x = torch.randn(*pos.shape, 64, generator=g)
        err = max(err, float((ort.forward("s", x, pos) - ref32.forward("s", x, pos)).abs().max()))
    assert err < 0.1


def test_export_cache_hit_and_rebuild_of_corrupt_entry(tmp_path: Path) -> None:
    first = export_stage(None, (0, 2), cache_dir=tmp_path)
    assert not first.cached and first.max_abs_err is not None
    mtime = first.path.stat().st_mtime_ns
    second = export_stage(None, (0, 2), cache_dir=tmp_path)
    assert second.cached and second.path == first.path and second.sha256 == first.sha256
    assert second.path.stat().st_mtime_ns == mtime
    # another dtype or span is another entry
    assert not export_stage(None, (2, 5), cache_dir=tmp_path).cached
    # a corrupted cache file is detected and exported again
    first.path.write_bytes(b"\x00garbage" * 100)
    third = export_stage(None, (0, 2), cache_dir=tmp_path)
    assert not third.cached and third.sha256 == first.sha256


def test_env_var_sets_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERLANE_CACHE", str(tmp_path))
    res = export_stage(None, (4, 5), validate=False)
    assert res.path.parent == tmp_path / "onnx"


def test_export_to_path_copies_the_file(tmp_path: Path, cache: Path) -> None:
    res = export_stage(None, (4, 5), tmp_path / "out" / "last.onnx", cache_dir=cache)
    assert res.path == tmp_path / "out" / "last.onnx"
    assert hashlib.sha256(res.path.read_bytes()).hexdigest() == res.sha256


def test_shard_metadata_and_io_names(cache: Path) -> None:
    res = export_stage(None, (2, 5), cache_dir=cache)
    info = read_shard_info(res.path)
    assert info.span == LayerSpan(2, 5) and info.spec == ModelSpec.from_pretrained(BUNDLED)
    assert info.graph_version == GRAPH_VERSION and info.opset == 18 and info.ir_version <= 10
    assert [n for n, _, _ in info.inputs] == input_names(range(2, 5), False, True)
    assert [n for n, _, _ in info.outputs] == output_names(range(2, 5), True)
    shapes = {n: s for n, _, s in info.inputs + info.outputs}
    assert shapes["past_k_3"] == ("batch", 4, "cache_len", 8)
    assert shapes["new_v_4"] == ("batch", 4, "seq", 8)
    assert shapes["logits"] == ("batch", "n_logits", 512)
    assert onnx.load(str(res.path)).ir_version <= 10


def test_validate_onnx_shard_accepts_good_and_names_each_problem(cache: Path) -> None:
    res = export_stage(None, (0, 2), cache_dir=cache)
    data = res.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert validate_onnx_shard(data, (0, 2), sha).span == LayerSpan(0, 2)
    assert validate_onnx_shard(res.path, LayerSpan(0, 2)).sha256 == sha
    with pytest.raises(ValueError, match="sha256"):
        validate_onnx_shard(data, (0, 2), "0" * 64)
    with pytest.raises(ValueError, match=r"holds layers \[0, 2\).*assigned \[2, 4\)"):
        validate_onnx_shard(data, (2, 4), sha)
    with pytest.raises(ValueError, match="not a valid ONNX"):
        validate_onnx_shard(b"\x08\x07garbage\xff\xff" * 50, (0, 2))
    with pytest.raises(ValueError, match=r"not a valid ONNX|empty graph"):
        validate_onnx_shard(data[: len(data) // 2], (0, 2))  # truncated upload
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["a"], ["b"])],
            "g",
            [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(ValueError, match="not a hyperlane stage"):
        validate_onnx_shard(plain.SerializeToString(), (0, 2))


def test_corrupted_onnx_file_gives_a_clear_error(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x12\x34not an onnx file\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"not a valid ONNX.*re-export"):
        OrtStage(bad)
    with pytest.raises(ModelLoadError, match="not a valid ONNX"):
        load_ort_stage(None, (0, 2), onnx_path=bad)
    with pytest.raises(ValueError, match="does not exist"):
        validate_onnx_shard(tmp_path / "missing.onnx", (0, 2))


def test_export_argument_errors(cache: Path) -> None:
    stage = TorchStage.random(GQA, LayerSpan(0, 2))
    with pytest.raises(ValueError, match="holds"):
        export_stage(stage, (0, 1), cache_dir=cache)
    with pytest.raises(ValueError, match="span"):
        export_stage(None, None, cache_dir=cache)
    with pytest.raises(ValueError, match="valid: auto"):
        export_stage(None, (0, 1), exporter="magic", cache_dir=cache)


def test_cli_export_writes_shards_and_manifest(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperlane_lab.cli.export import run

    args = argparse.Namespace(
        model=None,
        stages=2,
        spans=None,
        out=str(tmp_path / "shards"),
        dtype="fp32",
        opset=None,
        exporter="auto",
        no_validate=False,
        cache_dir=str(cache),
        json=False,
    )
    assert run(args) == 0
    assert "manifest.json" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["span"] for s in manifest["stages"]] == [[0, 3], [3, 5]]
    assert manifest["dtype"] == "fp32" and manifest["opset"] == 18 and manifest["spec"]["n_layers"] == 5
    for st in manifest["stages"]:
        data = (tmp_path / "shards" / st["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == st["sha256"]
        assert [i["name"] for i in st["inputs"]][:2] == ["x", "positions"]
    assert manifest["stages"][1]["outputs"][0] == {
        "name": "logits",
        "dtype": "float32",
        "shape": ["batch", "n_logits", 512],
    }
    load_manifest(tmp_path / "shards")  # verifies every hash and span
    (tmp_path / "shards" / manifest["stages"][0]["file"]).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        load_manifest(tmp_path / "shards")


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(tmp_path: Path) -> None:
    spec = GQA.with_layers(2)
    stage = TorchStage.random(spec, LayerSpan(1, 2), seed=2, std=0.08)
    res = export_stage(stage, cache_dir=tmp_path, exporter="dynamo")
    assert res.exporter == "dynamo" and res.max_abs_err is not None and res.max_abs_err < 1e-4
    err = _run_pair(stage, OrtStage(res.path), _ragged_steps([11, 4], decode=3), max_len=24)
    assert err < 1e-4
