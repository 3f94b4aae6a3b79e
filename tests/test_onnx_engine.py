"""The onnxruntime engine behind the stage interface: greedy generation through pipelines of
OrtStages (and torch/ort mixes) must equal the all-torch pipeline token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hyperlane_lab.engines import StageEngine, create_engine
from hyperlane_lab.engines.ort_engine import OrtStage, load_ort_stage, ort_available_providers
from hyperlane_lab.errors import ModelLoadError
from hyperlane_lab.generation import InProcessPipeline
from hyperlane_lab.models import ModelSpec, bundled_model_path, load_stage, load_tokenizer
from hyperlane_lab.onnx import export_stage
from hyperlane_lab.types import LayerSpan

BUNDLED = str(bundled_model_path())
PROMPTS = ["Once upon a time", "The little dog ran to the park because it wanted"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    pipe = InProcessPipeline.from_pretrained(None, n_stages=1)
    return [r.token_ids for r in pipe.generate(PROMPTS, max_tokens=40)]


def _pipeline(stages: list[StageEngine]) -> InProcessPipeline:
    return InProcessPipeline(stages, load_tokenizer(BUNDLED), ModelSpec.from_pretrained(BUNDLED))


def test_ort_pipeline_generates_the_same_tokens_as_torch(cache: Path, reference: list[list[int]]) -> None:
    spans = LayerSpan.split_uniform(5, 3)
    stages = [load_ort_stage(None, sp, cache_dir=cache) for sp in spans]
    assert all(isinstance(s, StageEngine) and s.engine_name == "onnxruntime" for s in stages)
    out = _pipeline(stages).generate(PROMPTS, max_tokens=40)  # batch of 2, different prompt lengths
    assert [r.token_ids for r in out] == reference
    assert len(reference[0]) == 40  # the comparison covered the whole budget (no early EOS)
    single = _pipeline(stages).generate(PROMPTS[1], max_tokens=40)
    assert single.token_ids == reference[1]


def test_mixed_torch_ort_torch_pipeline(cache: Path, reference: list[list[int]]) -> None:
    a, b, c = LayerSpan(0, 2), LayerSpan(2, 4), LayerSpan(4, 5)
    stages = [
        load_stage(BUNDLED, a),
        create_engine(
            "onnxruntime", source=None, span=b, dtype="fp32", device="cpu", spec=None, cache_dir=cache
        ),
        load_stage(BUNDLED, c),
    ]
    assert [s.engine_name for s in stages] == ["torch", "onnxruntime", "torch"]
    out = _pipeline(stages).generate(PROMPTS, max_tokens=40)
    assert [r.token_ids for r in out] == reference
    # and the other mix: ort first and last around a torch stage
    stages = [
        load_ort_stage(None, a, cache_dir=cache),
        load_stage(BUNDLED, b),
        load_ort_stage(None, c, cache_dir=cache),
    ]
    assert [r.token_ids for r in _pipeline(stages).generate(PROMPTS, max_tokens=40)] == reference


def test_all_logits_matches_torch(cache: Path) -> None:
    ref, ort = load_stage(BUNDLED, (3, 5)), load_ort_stage(None, (3, 5), cache_dir=cache)
    pos = torch.tensor([[0, 1, 2, 3], [0, 1, -1, -1]])
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    for st in (ref, ort):
        st.open_session("s", 2, 8)
    want, got = ref.forward("s", x, pos, all_logits=True), ort.forward("s", x, pos, all_logits=True)
    assert got.shape == (2, 4, 512) and got.dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-4
    # default: the logits at each row's last valid token (row 1 -> index 1)
    nxt = torch.tensor([[4], [2]])
    y = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(1))
    assert float((ort.forward("s", y, nxt) - ref.forward("s", y, nxt)).abs().max()) < 1e-4


def test_session_and_input_errors_match_the_interface(cache: Path) -> None:
    st = load_ort_stage(None, (0, 2), cache_dir=cache)
    ids, pos = torch.zeros(1, 3, dtype=torch.int64), torch.arange(3)[None]
    with pytest.raises(KeyError, match="open it first"):
        st.forward("nope", ids, pos)
    st.open_session("s", 1, 4)
    assert st.has_session("s") and st.sessions == ["s"]
    with pytest.raises(ValueError, match="already open"):
        st.open_session("s", 1, 4)
    with pytest.raises(ValueError, match="batch"):
        st.forward("s", torch.zeros(2, 3, dtype=torch.int64), torch.arange(3).repeat(2, 1))
    with pytest.raises(ValueError, match="max length"):
        st.forward("s", torch.zeros(1, 5, dtype=torch.int64), torch.arange(5)[None])
    with pytest.raises(ValueError, match="token ids"):
        st.forward("s", torch.full((1, 3), 999, dtype=torch.int64), pos)
    with pytest.raises(ValueError, match="int64"):
        st.input_shape_ok(ids, pos.int())
    assert st.kv_cache_bytes(1, 4) == sum(t.numel() * 4 for t in st.session("s").k + st.session("s").v)
    st.close_session("s")
    st.close_session("never-opened")  # ignored
    assert not st.has_session("s")
    d = st.describe()
    assert d["engine"] == "onnxruntime" and d["span"] == [0, 2] and d["first"] and not d["last"]


def test_onnx_path_loading_checks_span_hash_and_dtype(cache: Path) -> None:
    res = export_stage(None, (2, 4), cache_dir=cache)
    st = load_ort_stage(span=(2, 4), onnx_path=res.path, expected_sha256=res.sha256)
    assert st.span == LayerSpan(2, 4) and st.spec == ModelSpec.from_pretrained(BUNDLED)
    with pytest.raises(ModelLoadError, match="assigned"):
        load_ort_stage(span=(0, 2), onnx_path=res.path)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_ort_stage(span=(2, 4), onnx_path=res.path, expected_sha256="ab" * 32)
    with pytest.raises(ModelLoadError, match="fp16"):
        load_ort_stage(span=(2, 4), dtype="fp16", onnx_path=res.path)
    with pytest.raises(ValueError, match="export options"):
        load_ort_stage(span=(2, 4), onnx_path=res.path, opset=17)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort_available_providers(), reason="falls back only without CUDA EP"
)
def test_cuda_request_without_cuda_provider_falls_back_to_cpu(cache: Path) -> None:
    res = export_stage(None, (4, 5), cache_dir=cache)
    st = OrtStage(res.path, device="cuda")
    assert st.device.type == "cpu" and st.providers[0] == "CPUExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort_available_providers(),
    reason="needs CUDA and onnxruntime-gpu",
)
def test_cuda_provider_matches_torch_on_gpu(cache: Path, reference: list[list[int]]) -> None:
    spans = LayerSpan.split_uniform(5, 2)
    stages = [load_ort_stage(None, sp, device="cuda", cache_dir=cache) for sp in spans]
    assert stages[0].providers[0] == "CUDAExecutionProvider" and stages[0].device.type == "cuda"
    out = _pipeline(stages).generate(PROMPTS, max_tokens=40)
    assert [r.token_ids for r in out] == reference


def test_cuda_provider_options_turn_tf32_off_for_fp32_only() -> None:
    """ORT's CUDA EP runs fp32 GEMMs in TF32 unless told not to; torch (the reference) does not."""
    from hyperlane_lab.engines.ort_engine import cuda_provider_options

    assert cuda_provider_options(torch.device("cuda", 1), torch.float32) == {
        "device_id": "1",
        "use_tf32": "0",
    }
    assert cuda_provider_options(torch.device("cuda"), torch.float16) == {"device_id": "0"}
