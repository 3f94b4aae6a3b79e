"""Shared fixtures: the bundled model, a transformers reference, and a local cluster."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # the CI box has 2 cores shared with worker processes


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_path() -> str:
    from hyperlane_lab.models import bundled_model_path

    return str(bundled_model_path())


@pytest.fixture(scope="session")
def hf_model(bundled_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_path).eval()


@pytest.fixture(scope="session")
def tokenizer(bundled_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_path)


@pytest.fixture(scope="session")
def hf_greedy(hf_model, tokenizer):
    """prompt, n -> generated ids (prompt excluded) from transformers' own generate."""
    cache: dict[tuple[str, int], list[int]] = {}

    def run(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = hf_model.generate(
                    ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)
                )
            gen = out[0, ids.shape[1] :].tolist()
            eos = hf_model.config.eos_token_id
            cache[(prompt, n)] = gen[: gen.index(eos)] if eos in gen else gen
        return cache[(prompt, n)]

    return run


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    from hyperlane_lab.runtime import LocalCluster

    with LocalCluster(3, cache_dir=tmp_path_factory.mktemp("blobs")) as c:
        yield c


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_gpu_module():
    """On CUDA, each test module starts with empty torch.compile caches: the GPU modules compile
    the same layer functions for many specs and dtypes, and dynamo's per-function recompile limit
    would otherwise turn compiling off (silently, mid-module) for whichever module runs later."""
    if cuda_available():
        torch._dynamo.reset()
    yield
