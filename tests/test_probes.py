"""hyperlane_lab.probes against brute-force oracles: numpy fp16 rounding, transformers logits, a hand-written
greedy loop with the codec applied at each boundary, and identity / channel-dropping codec test doubles."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hyperlane_lab import codecs
from hyperlane_lab.codecs import Codec, EncodedTensor
from hyperlane_lab.codecs.base import dtype_name
from hyperlane_lab.generation.pipeline import InProcessPipeline
from hyperlane_lab.probes import DEFAULT_PROMPTS, greedy_agreement, probe, probe_grid, probe_table

PROMPTS = list(DEFAULT_PROMPTS[:3])
K_OUTLIERS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: one thread is faster and immune to other processes on a busy CPU
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pipe():
    return InProcessPipeline.from_pretrained(None, n_stages=3)


# ------------------------------------------------------------------------------------------- test doubles


@dataclass(frozen=True)
class IdentityCodec(Codec):
    """Sends the fp32 bytes of the tensor: an exact hop."""

    def encoded_nbytes(self, shape, dtype=torch.float16) -> int:
        return 4 * math.prod(shape)

    def encode(self, x, *, check_finite=True, backend=None) -> EncodedTensor:
        data = x.detach().float().contiguous().view(torch.uint8).flatten().clone()
        return EncodedTensor(self.name, self.codec_id, 0, tuple(x.shape), dtype_name(x.dtype), data)

    def decode(self, payload, *, device=None, backend=None) -> torch.Tensor:
        return payload.data.view(torch.float32).reshape(payload.shape).to(device or "cpu")


@dataclass(frozen=True)
class DropChannelCodec(IdentityCodec):
    """Exact except that channel 0 arrives as zero: its error is known in closed form."""

    def decode(self, payload, *, device=None, backend=None) -> torch.Tensor:
        y = super().decode(payload, device=device).clone()
        y[..., 0] = 0.0
        return y


# ------------------------------------------------------------------------------------------- oracles


def _clean_boundaries(pipe, prompt: str, hop=None) -> list[np.ndarray]:
    """Hidden states [S, H] (float64) leaving stages 0 and 1, applying ``hop`` (numpy fn) between them."""
    ids = pipe.encode(prompt)
    sid = uuid.uuid4().hex
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    outs = []
    for st in pipe.stages:
        st.open_session(sid, 1, len(ids))
    try:
        for st in pipe.stages[:2]:
            h = st.forward(sid, x, pos)
            outs.append(h[0].double().numpy())
            x = torch.from_numpy(hop(h.numpy())) if hop is not None else h
    finally:
        for st in pipe.stages:
            st.close_session(sid)
    return outs


def _np_fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(a.dtype)


def _np_metrics(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    err = y - x
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    outl = np.argsort(-np.abs(x.mean(0)), kind="stable")[:k]
    keep = np.setdiff1d(np.arange(x.shape[1]), outl)
    return {
        "rel_l2": np.linalg.norm(err) / np.linalg.norm(x),
        "cosine": cos.mean(),
        "max_abs": np.abs(err).max(),
        "rel_l2_non_outlier": np.linalg.norm(err[:, keep]) / np.linalg.norm(x[:, keep]),
    }


def _greedy_by_hand(pipe, prompt: str, hops: list, n: int) -> list[int]:
    """Greedy decode with a KV cache, ``hops[b]`` (a Codec or None) round-tripping boundary b; EOS kept."""
    ids = pipe.encode(prompt)
    eos = pipe.spec.eos_token_ids[0]
    sid = uuid.uuid4().hex
    for st in pipe.stages:
        st.open_session(sid, 1, len(ids) + n)
    out: list[int] = []
    try:
        x, pos = torch.tensor([ids]), torch.arange(len(ids))[None]
        while len(out) < n:
            for i, st in enumerate(pipe.stages):
                x = st.forward(sid, x, pos)
                if i < len(pipe.stages) - 1 and hops[i] is not None:
                    x = hops[i].decode(hops[i].encode(x))
            tok = int(x[0].argmax())
            out.append(tok)
            if tok == eos:
                break
            x, pos = torch.tensor([[tok]]), torch.tensor([[len(ids) + len(out) - 1]])
    finally:
        for st in pipe.stages:
            st.close_session(sid)
    return out


# ------------------------------------------------------------------------------------------- tests


def test_identity_codecs_are_exact(pipe):
    for codec in ("raw", IdentityCodec("identity", 99, 0)):
        df = probe(pipe, codec=codec, prompts=PROMPTS, max_new_tokens=8)
        assert list(df.boundary) == ["2", "4", "all"]
        assert (
            (df.rel_l2 == 0).all()
            and (df.max_abs == 0).all()
            and (df.cosine.to_numpy() == pytest.approx(1.0))
        )
        assert (df.kl.abs() < 1e-15).all()
        assert (df.top1_agreement == 1).all() and (df.ppl_delta_rel.abs() < 1e-15).all()
        assert (df.greedy_agreement == 1).all() and (df.greedy_prefix_agreement == 1).all()
        assert (df.greedy_identical == 1).all()


def test_fp16_errors_tiny_nonzero_and_match_numpy(pipe):
    df = probe(pipe, codec="fp16", prompts=PROMPTS, max_new_tokens=8, outlier_channels=K_OUTLIERS)
    u = 2.0**-11  # fp16 unit roundoff (round to nearest)
    # oracle: numpy's own fp16 rounding of the reference hidden states
    per_prompt = [_clean_boundaries(pipe, p) for p in PROMPTS]
    for b, name in enumerate(("2", "4")):
        x = np.concatenate([pp[b] for pp in per_prompt])
        want = _np_metrics(x, _np_fp16(x.astype(np.float32)).astype(np.float64), K_OUTLIERS)
        row = df[df.boundary == name].iloc[0]
        for col, v in want.items():
            assert row[col] == pytest.approx(v, rel=1e-9, abs=1e-15), (name, col)
        assert 0 < row.rel_l2 <= u and row.max_abs <= u * np.abs(x).max()
    # "all": what stage 2 receives when both hops are fp16, vs the clean boundary-4 state
    hopped = [_clean_boundaries(pipe, p, hop=_np_fp16) for p in PROMPTS]
    x4 = np.concatenate([pp[1] for pp in per_prompt])
    y4 = np.concatenate([_np_fp16(pp[1].astype(np.float32)).astype(np.float64) for pp in hopped])
    row = df[df.boundary == "all"].iloc[0]
    assert row.rel_l2 == pytest.approx(_np_metrics(x4, y4, K_OUTLIERS)["rel_l2"], rel=1e-6)
    assert (df.kl > 0).all() and (df.kl < 1e-5).all()
    assert (df.ppl_delta_rel.abs() < 1e-4).all() and (df.top1_agreement > 0.98).all()


def test_drop_channel_double_closed_form(pipe):
    df = probe(pipe, codec=DropChannelCodec("drop0", 98, 0), prompts=PROMPTS[:2], max_new_tokens=4)
    x = np.concatenate([_clean_boundaries(pipe, p)[0] for p in PROMPTS[:2]])
    row = df[df.boundary == "2"].iloc[0]
    assert row.rel_l2 == pytest.approx(np.linalg.norm(x[:, 0]) / np.linalg.norm(x), rel=1e-9)
    assert row.max_abs == pytest.approx(np.abs(x[:, 0]).max(), rel=1e-12)
    assert (df.kl > 0).all()


def test_reference_ppl_and_int8_logit_metrics_brute_force(pipe, hf_model):
    df = probe(pipe, codec="int8", group_size=64, prompts=PROMPTS, max_new_tokens=4)
    c = codecs.get("int8", 64)
    kl = agree = n = nll_ref = nll = n_t = 0.0
    for p in PROMPTS:
        ids = torch.tensor([pipe.encode(p)])
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(ids).logits[0].double(), -1).numpy()  # transformers = reference
        sid = uuid.uuid4().hex
        x, pos = ids, torch.arange(ids.shape[1])[None]
        for st in pipe.stages:
            st.open_session(sid, 1, ids.shape[1])
        for i, st in enumerate(pipe.stages):
            x = st.forward(sid, x, pos, all_logits=i == 2)
            x = c.decode(c.encode(x)) if i < 2 else x
            st.close_session(sid)
        got = torch.log_softmax(x[0].double(), -1).numpy()
        kl += (np.exp(ref) * (ref - got)).sum()
        agree += (ref.argmax(-1) == got.argmax(-1)).sum()
        n += ref.shape[0]
        tgt = ids[0, 1:].numpy()
        nll_ref -= ref[np.arange(len(tgt)), tgt].sum()
        nll -= got[np.arange(len(tgt)), tgt].sum()
        n_t += len(tgt)
    row = df[df.boundary == "all"].iloc[0]
    assert row.ppl_ref == pytest.approx(math.exp(nll_ref / n_t), rel=1e-5)
    assert row.ppl == pytest.approx(math.exp(nll / n_t), rel=1e-5)
    assert row.kl == pytest.approx(kl / n, rel=1e-3, abs=1e-8)
    assert row.top1_agreement == pytest.approx(agree / n)
    assert row.positions == n


def _agreement_by_hand(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float, int]:
    """(equal at the same index / max length, leading run / max length, positions) summed over prompts."""
    total = sum(max(len(a), len(b)) for a, b in zip(ref, got))
    same = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
    lead = 0
    for a, b in zip(ref, got):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        lead += k
    return same / total, lead / total, total


def test_int8_greedy_agreement_equals_recomputation(pipe, hf_greedy):
    n = 32
    df = probe(pipe, codec="int8", group_size=64, max_new_tokens=n)
    c = codecs.get("int8", 64)
    ref = [_greedy_by_hand(pipe, p, [None, None], n) for p in DEFAULT_PROMPTS]
    for p, r in zip(DEFAULT_PROMPTS, ref):  # the hand loop agrees with transformers' greedy
        assert [t for t in r if t != pipe.spec.eos_token_ids[0]] == hf_greedy(p, n)
    for boundary, hops in (("all", [c, c]), ("2", [c, None]), ("4", [None, c])):
        got = [_greedy_by_hand(pipe, p, hops, n) for p in DEFAULT_PROMPTS]
        same, lead, total = _agreement_by_hand(ref, got)
        row = df[df.boundary == boundary].iloc[0]
        print(
            f"\nint8/64 at boundary {boundary}: greedy agreement {same:.4f} (prefix {lead:.4f}) over {total}"
        )
        assert row.greedy_agreement == pytest.approx(same)
        assert row.greedy_prefix_agreement == pytest.approx(lead)
        assert row.greedy_tokens == total
        assert row.greedy_identical == pytest.approx(np.mean([a == b for a, b in zip(ref, got)]))


def test_greedy_agreement_definition():
    r = greedy_agreement([[1, 2, 3, 4], [5, 6, 2]], [[1, 2, 9, 4], [5, 6]])
    # prompt 1: 4 positions, 3 equal, 2 leading; prompt 2: 3 positions (one ended early), 2 equal and leading
    assert r == {
        "greedy_prefix_agreement": 4 / 7,
        "greedy_agreement": 5 / 7,
        "greedy_identical": 0.0,
        "greedy_tokens": 7,
    }


def test_grid_spans_and_errors(pipe):
    df = probe_grid(["fp16", "int4"], [32, 64], model=pipe, prompts=PROMPTS[:1], max_new_tokens=2)
    assert list(zip(df.codec, df.group_size)) == [("fp16", 0)] * 3 + [("int4", 32)] * 3 + [("int4", 64)] * 3
    single = probe(pipe, codec="int4", group_size=32, prompts=PROMPTS[:1], max_new_tokens=2)
    assert np.allclose(df[df.group_size == 32].rel_l2.to_numpy(), single.rel_l2.to_numpy(), rtol=0, atol=0)
    assert "| int4 | 32 | all |" in probe_table(df)
    two = probe(None, codec="int8", spans=[(0, 1), (1, 5)], prompts=PROMPTS[:1], max_new_tokens=2)
    assert list(two.boundary) == ["1", "all"]
    with pytest.raises(ValueError, match="differ from the pipeline"):
        probe(pipe, spans=[(0, 1), (1, 5)], prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="at least 2 stages"):
        probe(None, n_stages=1, prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="int4_hadamard"):
        probe(pipe, codec="int3", prompts=PROMPTS[:1], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompts or text"):
        probe(pipe, prompts=PROMPTS, text="x y z")
