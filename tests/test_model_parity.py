"""Our stages against transformers: greedy tokens on the bundled model, logits on random tiny configs
of every supported family, and batched (padded) runs against one-prompt runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.models import load_tokenizer
from tests.helpers_models import (
    BUNDLED,
    hf_bundled,
    hf_greedy,
    hf_step_logits,
    load_stages,
    make_checkpoint,
    open_all,
    run_stages,
    single_thread,
    tiny_config,
)

PROMPTS = [
    "Once upon a time",
    "The cat",
    "Lily and Tom were best friends. One day they had a fight. At the end they said sorry and were happy",
]
N_NEW = 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pipelines() -> dict[int, InProcessPipeline]:
    return {n: InProcessPipeline.from_pretrained(None, n_stages=n) for n in (1, 2, 3, 5)}


# ------------------------------------------------------------------ greedy tokens, bundled model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(pipelines: dict[int, InProcessPipeline], prompt: str) -> None:
    model, tok = hf_bundled()
    prompt_ids = tok(prompt)["input_ids"]
    expected = hf_greedy(model, prompt_ids, N_NEW)
    assert len(expected) == N_NEW  # the model never emits its EOS id within 48 tokens of these prompts
    for n, pipe in pipelines.items():
        res = pipe.generate(prompt, max_tokens=N_NEW)
        assert res.prompt_token_ids == prompt_ids
        assert res.token_ids == expected, f"{n} stages diverge from transformers"
        assert res.finish_reason == "length"
        assert res.text == tok.decode(prompt_ids + expected, skip_special_tokens=True)[len(prompt) :]


def test_generation_stops_at_eos_like_transformers(pipelines: dict[int, InProcessPipeline]) -> None:
    # stories260K ends a story by emitting BOS (id 1: llama2.c separates stories with BOS, never EOS),
    # so id 1 is the natural end-of-sequence id of this model; give it to both generators.
    model, tok = hf_bundled()
    prompt = (
        "Tim and Sue played all day. When the sun went down, they went home. "
        "They were tired but happy. They hugged and said good night."
    )
    prompt_ids = tok(prompt)["input_ids"]
    expected = hf_greedy(model, prompt_ids, 200, eos_token_id=1)
    assert expected[-1] == 1 and len(expected) < 200  # transformers stopped at the story's end
    for n in (2, 3):
        base = pipelines[n]
        pipe = InProcessPipeline(
            base.stages, base.tokenizer, dataclasses.replace(base.spec, eos_token_ids=(1,))
        )
        res = pipe.generate(prompt, max_tokens=200)
        assert res.finish_reason == "eos"
        assert res.token_ids == expected[:-1]  # our token_ids exclude the EOS id


# ------------------------------------------------------------------ logits, random tiny configs

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {}),
    "llama-head-dim": ("llama", {"head_dim": 16}),
    # head_dim 16: wavelengths 6.3 (between 16/4 and 16/1: smoothed) and 63..6283 (> 16: divided by factor)
    "llama3-rope": ("llama", {"hidden_size": 64, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0}},
    ),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    # layer 0 full attention, layers 1-2 with a window of 8 (transformers' max_window_layers rule)
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
}


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab, (length - 1,), generator=g).tolist()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    family, overrides = CONFIGS[name]
    cfg = tiny_config(family, **overrides)
    model = make_checkpoint(tmp_path, cfg, seed=3)
    prompt = _prompt(cfg.vocab_size, 20, seed=4)
    ref_prefill, ref_steps, fed = hf_step_logits(model, prompt, 16)
    assert ref_prefill.abs().max() > 1.0  # random weights give non-trivial logits

    for spans in ([(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        stages = load_stages(tmp_path, spans)
        with open_all(stages, 1, 40) as sid:
            ids = torch.tensor([prompt])
            got = run_stages(stages, sid, ids, torch.arange(len(prompt))[None], all_logits=True)[0]
            torch.testing.assert_close(got, ref_prefill, atol=1e-4, rtol=0)
            for i, (tok_id, ref) in enumerate(zip(fed, ref_steps)):
                pos = torch.tensor([[len(prompt) + i]])
                got_step = run_stages(stages, sid, torch.tensor([[tok_id]]), pos)[0]
                err = (got_step - ref).abs().max().item()
                assert err <= 1e-4, f"{name} {spans}: decode step {i} max abs error {err}"


def test_sliding_window_changes_logits(tmp_path: Path) -> None:
    # guard for the window tests: with a 20-token prompt a window of 8 must change the logits
    a = make_checkpoint(tmp_path / "a", tiny_config("mistral", sliding_window=8), seed=3)
    b = make_checkpoint(tmp_path / "b", tiny_config("mistral", sliding_window=None), seed=3)
    ids = torch.tensor([_prompt(96, 20, seed=4)])
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits[0, -1], b(input_ids=ids).logits[0, -1]
    assert (la - lb).abs().max() > 1e-2


# ------------------------------------------------------------------ batches vs single prompts


def _greedy_logits(
    stages: list[Any], prompts: list[list[int]], n_steps: int, feed: list[list[int]] | None = None
) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """Run prompts as one right-padded batch; per row, logits of prefill and each decode step.

    ``feed``: tokens to feed per row and step (default: each row's own greedy choice).
    """
    bsz, lens = len(prompts), [len(p) for p in prompts]
    width = max(lens)
    ids = torch.zeros((bsz, width), dtype=torch.int64)
    pos = torch.full((bsz, width), -1, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, : lens[b]] = torch.tensor(p)
        pos[b, : lens[b]] = torch.arange(lens[b])
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    fed: list[list[int]] = [[] for _ in prompts]
    with open_all(stages, bsz, width + n_steps + 1) as sid:
        logits = run_stages(stages, sid, ids, pos)
        for step in range(n_steps + 1):
            for b in range(bsz):
                out[b].append(logits[b])
            if step == n_steps:
                break
            nxt = [feed[b][step] if feed else int(logits[b].argmax()) for b in range(bsz)]
            for b in range(bsz):
                fed[b].append(nxt[b])
            step_pos = torch.tensor([[lens[b] + step] for b in range(bsz)])
            logits = run_stages(stages, sid, torch.tensor(nxt)[:, None], step_pos)
    return out, fed


def _check_batch_equals_single(stages: list[Any], prompts: list[list[int]], n_steps: int) -> None:
    singles = [_greedy_logits(stages, [p], n_steps) for p in prompts]
    feed = [s[1][0] for s in singles]
    batch, _ = _greedy_logits(stages, prompts, n_steps, feed)
    for b, (single_logits, _) in enumerate(singles):
        for step, (x, y) in enumerate(zip(batch[b], single_logits[0])):
            err = (x - y).abs().max().item()
            # 1e-5, or a few fp32 ulps of the largest logit: a matmul over 4 rows does not round
            # like one over 1 row (MKL picks gemm vs gemv), so even [p, p] vs [p] differs by ~5e-6
            # at |logit| ~ 20. A padding or mask bug shows up as >= 1e-3.
            tol = max(1e-5, 2e-6 * y.abs().max().item())
            assert err <= tol, f"row {b} step {step}: batch vs single max abs error {err} > {tol}"


def test_batch_logits_equal_single_bundled() -> None:
    tok = load_tokenizer(str(BUNDLED))
    prompts = [tok(p)["input_ids"] for p in ["One day", *PROMPTS]]
    _check_batch_equals_single(load_stages(BUNDLED, [(0, 2), (2, 5)]), prompts, 8)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "qwen2-tied"])
def test_batch_logits_equal_single_random(tmp_path: Path, name: str) -> None:
    family, overrides = CONFIGS[name]
    make_checkpoint(tmp_path, tiny_config(family, **overrides), seed=5)
    prompts = [_prompt(96, n, seed=n) for n in (3, 17, 9, 12)]
    _check_batch_equals_single(load_stages(tmp_path, [(0, 2), (2, 3)]), prompts, 8)


def test_batch_generate_equals_single(pipelines: dict[int, InProcessPipeline]) -> None:
    base = pipelines[3]
    prompts = ["One day", *PROMPTS]
    alone = [base.generate(p, max_tokens=24) for p in prompts]
    together = base.generate(prompts, max_tokens=24)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]

    # rows that finish early (EOS = ".") become padding while the others go on
    dot = base.tokenizer.convert_tokens_to_ids(".")
    pipe = InProcessPipeline(
        base.stages, base.tokenizer, dataclasses.replace(base.spec, eos_token_ids=(dot,))
    )
    model, tok = hf_bundled()
    together = pipe.generate(prompts, max_tokens=24)
    lengths = set()
    for p, r in zip(prompts, together):
        expected = hf_greedy(model, tok(p)["input_ids"], 24, eos_token_id=dot)
        stopped = expected[-1] == dot
        assert r.token_ids == (expected[:-1] if stopped else expected)
        assert r.finish_reason == ("eos" if stopped else "length")
        lengths.add(len(r.token_ids))
    assert len(lengths) > 1  # the rows really finished at different steps
