"""Sampling (seeded, top-k, top-p, temperature), stop strings, streaming, EOS and the token loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from hyperlane_lab.generation import Sampler, TextGenerator, filter_logits
from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.generation.text import SequenceState
from hyperlane_lab.types import SamplingParams
from tests.helpers_models import hf_bundled, hf_greedy, single_thread

PROMPT = "Once upon a time"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pipe() -> InProcessPipeline:
    return InProcessPipeline.from_pretrained(None, n_stages=2)


def _hf_continuation(n: int, prompt: str = PROMPT) -> tuple[list[int], str]:
    """transformers' greedy ids and the text they add after the prompt."""
    model, tok = hf_bundled()
    ids = tok(prompt)["input_ids"]
    new = hf_greedy(model, ids, n)
    full = tok.decode(ids + new, skip_special_tokens=True)
    return new, full[len(tok.decode(ids, skip_special_tokens=True)) :]


# ------------------------------------------------------------------ sampling against oracles


def _np_top_p_keep(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Brute force nucleus: the smallest set of most likely tokens whose probability reaches top_p."""
    keep = np.zeros(logits.shape, dtype=bool)
    for r, row in enumerate(logits.astype(np.float64)):
        finite = np.isfinite(row)
        p = np.zeros_like(row)
        p[finite] = np.exp(row[finite] - row[finite].max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        total = 0.0
        for i in order:
            keep[r, i] = True
            total += p[i]
            if total >= top_p:
                break
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95])
def test_top_p_matches_brute_force(seed: int, top_p: float) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((6, 40)) * rng.uniform(0.5, 4.0, (6, 1))).astype(np.float32)
    got = filter_logits(torch.from_numpy(logits), SamplingParams(1.0, 0, top_p))
    np.testing.assert_array_equal(torch.isfinite(got).numpy(), _np_top_p_keep(logits, top_p))


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (39, 1.0), (8, 0.6), (3, 0.99)])
def test_top_k_then_top_p_matches_brute_force(top_k: int, top_p: float) -> None:
    rng = np.random.default_rng(top_k)
    logits = (rng.standard_normal((5, 40)) * 2).astype(np.float32)
    kth = -np.sort(-logits, axis=1)[:, top_k - 1 : top_k]
    # temperature, then top-k, then the nucleus of what is left
    oracle = np.where(logits >= kth, logits.astype(np.float64) / 0.7, -np.inf)
    oracle_keep = _np_top_p_keep(oracle, top_p) & np.isfinite(oracle)
    got = filter_logits(torch.from_numpy(logits), SamplingParams(0.7, top_k, top_p))
    np.testing.assert_array_equal(torch.isfinite(got).numpy(), oracle_keep)
    torch.testing.assert_close(got[torch.isfinite(got)], torch.from_numpy(logits)[torch.isfinite(got)] / 0.7)
    assert (torch.isfinite(got).sum(1) >= 1).all()


def test_temperature_scales_logits_and_sampling_frequencies() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(filter_logits(logits, SamplingParams(t)), logits / t)
        n = 40_000
        draws = Sampler(SamplingParams(t, seed=123))(logits.expand(n, 4))
        freq = np.bincount(draws.numpy(), minlength=4) / n
        expected = np.exp(logits[0].double().numpy() / t)
        expected /= expected.sum()
        # 40k draws: 4 standard errors of a frequency <= 0.01
        np.testing.assert_allclose(freq, expected, atol=0.01)


def test_sampler_seeded_and_greedy() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = [Sampler(SamplingParams(1.0, seed=9))(logits) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    s = Sampler(SamplingParams(1.0, seed=9))
    runs = torch.stack([s(logits) for _ in range(20)])
    assert len({tuple(r.tolist()) for r in runs}) > 1  # one stream: successive steps differ
    assert torch.equal(Sampler(SamplingParams())(logits), logits.argmax(-1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Sampler(SamplingParams())(torch.tensor([[0.0, float("nan")]]))


# ------------------------------------------------------------------ sampled generation on the model


def test_seeded_generation_is_reproducible(pipe: InProcessPipeline) -> None:
    kw: dict[str, Any] = {"max_tokens": 24, "temperature": 0.9}
    a = pipe.generate(PROMPT, seed=5, **kw)
    b = pipe.generate(PROMPT, seed=5, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert "".join(pipe.generate(PROMPT, seed=5, stream=True, **kw)) == a.text
    others = {tuple(pipe.generate(PROMPT, seed=s, **kw).token_ids) for s in (6, 7, 8)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_top_k_1_is_greedy(pipe: InProcessPipeline) -> None:
    expected, _ = _hf_continuation(24)
    assert pipe.generate(PROMPT, max_tokens=24, temperature=1.3, top_k=1, seed=0).token_ids == expected


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5)])
def test_sampled_tokens_lie_in_transformers_candidate_set(
    pipe: InProcessPipeline, top_k: int, top_p: float
) -> None:
    model, _ = hf_bundled()
    res = pipe.generate(PROMPT, max_tokens=32, temperature=1.5, top_k=top_k, top_p=top_p, seed=11)
    ids = res.prompt_token_ids + res.token_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float() / 1.5  # [S, V]
    n_p = len(res.prompt_token_ids)
    for i, t in enumerate(res.token_ids):
        row = logits[n_p - 1 + i]
        if top_k:
            allowed = set(torch.topk(row, top_k).indices.tolist())
        else:
            allowed = set(np.flatnonzero(_np_top_p_keep(row[None].numpy(), top_p)[0]).tolist())
        assert t in allowed, f"token {i} ({t}) outside transformers' candidate set {sorted(allowed)}"
    assert res.token_ids != _hf_continuation(32)[0]  # it did sample


# ------------------------------------------------------------------ stop strings and streaming


def test_stop_string_split_across_tokens(pipe: InProcessPipeline) -> None:
    _, tok = hf_bundled()
    ids, full = _hf_continuation(30)
    assert "girl" in full and not any(
        "girl" in p for p in tok.convert_ids_to_tokens(ids)
    )  # split: '▁g','ir','l'
    res = pipe.generate(PROMPT, max_tokens=30, stop="girl")
    assert res.finish_reason == "stop"
    assert res.text == full[: full.find("girl")]
    assert "".join(pipe.generate(PROMPT, max_tokens=30, stop="girl", stream=True)) == res.text


@pytest.mark.parametrize("stop", [(), ("zebra",), ("park", "Lily"), (",",), ("ly", "d L")])
def test_streaming_joins_to_the_final_text(pipe: InProcessPipeline, stop: tuple[str, ...]) -> None:
    _, full = _hf_continuation(30)
    res = pipe.generate(PROMPT, max_tokens=30, stop=stop)
    cuts = [full.find(s) for s in stop if s in full]
    # the earliest stop string wins (("ly", "d L") both complete with the token "▁Lily")
    assert res.text == (full[: min(cuts)] if cuts else full)
    assert res.finish_reason == ("stop" if cuts else "length")
    pieces = list(pipe.generate(PROMPT, max_tokens=30, stop=stop, stream=True))
    assert "".join(pieces) == res.text
    assert all(pieces)  # no empty pieces


def test_streaming_a_batch(pipe: InProcessPipeline) -> None:
    prompts = [PROMPT, "The cat", "One day"]
    results = pipe.generate(prompts, max_tokens=16, stop=".")
    assert [r.finish_reason for r in results].count("stop") >= 1
    texts = ["", "", ""]
    for idx, piece in pipe.generate(prompts, max_tokens=16, stop=".", stream=True):
        texts[idx] += piece
    assert texts == [r.text for r in results]


def test_streaming_multibyte_byte_fallback() -> None:
    # byte tokens decode to one U+FFFD per byte until their run is valid UTF-8 (then the run is
    # re-decoded): a stream must never show those placeholders
    _, tok = hf_bundled()
    prompt = tok("Hi")["input_ids"]
    generated = tok("Hi 日本 café 😀 ok", add_special_tokens=False)["input_ids"][len(prompt) - 1 :]
    assert sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(generated)) >= 10
    state = SequenceState(prompt, tok, max_tokens=100, eos_ids=frozenset({2}))
    pieces = [state.push(t) for t in generated] + [state.push(2)]
    oracle = tok.decode(prompt + generated, skip_special_tokens=True)[
        len(tok.decode(prompt, skip_special_tokens=True)) :
    ]
    assert state.text == oracle and state.finish_reason == "eos"
    assert "".join(pieces) == oracle
    assert not any("\ufffd" in p for p in pieces)


def test_sequence_state_eos_and_length() -> None:
    _, tok = hf_bundled()
    s = SequenceState([1, 403], tok, max_tokens=3, eos_ids=frozenset({2, 7}))
    s.push(407)
    s.push(7)  # an EOS id: ends the sequence, is not part of the output
    assert s.done and s.finish_reason == "eos" and s.token_ids == [407]
    assert s.push(261) == "" and s.token_ids == [407]  # pushes after the end are ignored
    s = SequenceState([1, 403], tok, max_tokens=2, eos_ids=frozenset({2}))
    s.push(407)
    s.push(261)
    assert s.finish_reason == "length" and s.token_ids == [407, 261]


# ------------------------------------------------------------------ the token loop with a scripted runner


class _ScriptedRunner:
    """Returns scripted next tokens and records what the loop fed it."""

    def __init__(self, script: list[list[int]]) -> None:
        self.script, self.calls = script, []  # script[step][row]

    @contextmanager
    def open_session(self, batch: int, max_len: int, params: SamplingParams) -> Iterator[Any]:
        self.batch, self.max_len = batch, max_len
        yield self

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.calls.append((ids.clone(), positions.clone()))
        return torch.tensor(self.script[len(self.calls) - 1])


class _ScriptedGenerator(TextGenerator):
    def __init__(self, runner: _ScriptedRunner, spec: Any) -> None:
        _, self.tokenizer = hf_bundled()
        self.spec, self.runner = spec, runner


def test_loop_pads_and_retires_rows() -> None:
    _, tok = hf_bundled()
    spec = dataclasses.replace(InProcessPipeline.from_pretrained(None).spec, eos_token_ids=(2,))
    prompts = ["Once upon a time", "The cat"]  # 5 and 3 tokens
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    script = [[300, 301], [2, 302], [303, 304], [305, 306]]  # row 0 ends with EOS at step 1
    runner = _ScriptedRunner(script)
    out = _ScriptedGenerator(runner, spec).generate(prompts, max_tokens=4)
    assert [r.token_ids for r in out] == [[300], [301, 302, 304, 306]]
    assert [r.finish_reason for r in out] == ["eos", "length"]
    assert runner.batch == 2 and runner.max_len == max(lens) + 4
    ids0, pos0 = runner.calls[0]
    assert lens[0] > lens[1]
    pad = [-1] * (lens[0] - lens[1])
    assert pos0.tolist() == [list(range(lens[0])), list(range(lens[1])) + pad]  # right padding at -1
    assert ids0[1, : lens[1]].tolist() == tok(prompts[1])["input_ids"]
    a, b = lens
    assert [c[1][:, 0].tolist() for c in runner.calls[1:]] == [
        [a, b],
        [-1, b + 1],
        [-1, b + 2],
    ]  # retired: -1
    assert [c[0][1, 0].item() for c in runner.calls[1:]] == [301, 302, 304]
    assert len(runner.calls) == 4  # prefill + 3 decode steps for 4 tokens


def test_generate_argument_errors(pipe: InProcessPipeline) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        pipe.generate(PROMPT, max_tokens=0)
    with pytest.raises(ValueError, match="no prompts given"):
        pipe.generate([], max_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        pipe.generate(PROMPT, max_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        pipe.generate(PROMPT, max_tokens=4, stop=[""])


def test_run_ahead_loop_equals_the_plain_loop(
    pipe: InProcessPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run-ahead loop (greedy, next step fed by the device-side token; CUDA in production) gives
    exactly the plain loop's tokens, texts and finish reasons, with rows finishing at different
    steps (stop string, EOS-free length, batch padding), and wastes at most one step."""
    from hyperlane_lab.generation import pipeline as pl

    prompts = ["Once upon a time", "The cat", "Lily and Ben went to the park. They saw"]
    cases: list[dict[str, Any]] = [
        dict(prompt=prompts, max_tokens=20),
        dict(prompt=prompts, max_tokens=24, stop=[" the "]),
        dict(prompt=PROMPT, max_tokens=1),
        dict(prompt=PROMPT, max_tokens=17),
    ]
    monkeypatch.setattr(pl._LocalSession, "can_run_ahead", lambda self: False)
    calls0 = pipe.stage_stats[0].calls
    plain = [pipe.generate(**c) for c in cases]
    plain_calls = pipe.stage_stats[0].calls - calls0
    monkeypatch.setattr(pl._LocalSession, "can_run_ahead", lambda self: self.sampler.params.greedy)
    calls0 = pipe.stage_stats[0].calls
    ahead = [pipe.generate(**c) for c in cases]
    ahead_calls = pipe.stage_stats[0].calls - calls0
    for p_res, a_res in zip(plain, ahead):
        p_list = p_res if isinstance(p_res, list) else [p_res]
        a_list = a_res if isinstance(a_res, list) else [a_res]
        assert [r.token_ids for r in a_list] == [r.token_ids for r in p_list]
        assert [r.text for r in a_list] == [r.text for r in p_list]
        assert [r.finish_reason for r in a_list] == [r.finish_reason for r in p_list]
        assert a_list[0].timings.decode_steps == p_list[0].timings.decode_steps
    assert plain_calls <= ahead_calls <= plain_calls + len(cases)  # at most one wasted step per call
    assert {r.finish_reason for r in ahead[1]} >= {"stop"}  # the stop case really stopped a row early
    new, _ = _hf_continuation(17)
    assert ahead[3].token_ids == new  # and it is still transformers' greedy continuation
    # streaming goes through the same loop
    assert "".join(pipe.generate(PROMPT, max_tokens=17, stream=True)) == ahead[3].text
