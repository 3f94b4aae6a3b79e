"""Accuracy probes for wire codecs: what compressing the hidden state at stage boundaries does to a model.

``probe(model, codec, group_size, ...)`` runs the model (default: the bundled stories260K) split into stages,
once as is and once with the hidden state at stage boundaries encoded and decoded by ``codec`` exactly as
the runtime does (``runtime.wire.encode_tensor`` -> frame bytes -> ``decode_payload``). It returns a
``pandas.DataFrame`` with one row per boundary and one row ``boundary="all"``:

- a boundary row (``boundary`` = first layer after the cut, e.g. "2" for spans [0,2) [2,4)) compresses only
  that boundary; its hidden-state columns are the codec's round trip of the *reference* hidden state there;
- the ``"all"`` row compresses every boundary; its hidden-state columns compare what the last stage
  *receives* with the reference (the error accumulated over all hops).

Hidden-state columns (rows = every prompt token, float64): ``rel_l2`` = ||y - x|| / ||x||; ``cosine`` = mean
over tokens of cos(x_t, y_t); ``max_abs`` = max |y - x|; ``rel_l2_non_outlier`` = ``rel_l2`` over the
channels outside the ``outlier_channels`` (default k = 4) channels of largest |mean over tokens of x| (the
"massive activation" channels that dominate ||x|| and would hide the error on ordinary channels).

Logit columns (teacher-forced, every prompt position): ``kl`` = mean KL(p_ref || p_codec) in nats;
``top1_agreement`` = fraction of positions whose argmax agrees; ``ppl_ref`` / ``ppl`` = perplexity of the
prompts (NLL of tokens 1..S-1, token-weighted over prompts); ``ppl_delta_rel`` = ppl / ppl_ref - 1.

Greedy columns (``max_new_tokens`` per prompt, each prompt alone, stopping at EOS like ``generate``; an
emitted EOS counts as a token): per prompt n = max(len_ref, len_codec); ``greedy_prefix_agreement`` = sum of
leading equal tokens / sum n; ``greedy_agreement`` = sum of equal tokens at the same index / sum n;
``greedy_identical`` = fraction of prompts with identical sequences. Everything is deterministic.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_PROMPTS",
    "CodecStage",
    "greedy_agreement",
    "greedy_sequences",
    "load_pipeline",
    "probe",
    "probe_grid",
    "probe_table",
    "round_trip",
]

# TinyStories-like text: the bundled model was trained on TinyStories, so its perplexity here is low and
# a codec's damage shows up clearly.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she found a small red ball under a big tree.",
    "Tom had a big dog named Max. Max liked to run and jump in the garden. One sunny day, Tom and Max went "
    "to the lake to play in the water.",
    "Sara wanted to bake a cake for her mom. She got some flour, eggs and milk. Her mom smiled and said, "
    '"Thank you, Sara! You are very kind."',
    "The little bird sat on the branch and sang a happy song. A cat saw the bird and wanted to play. The "
    "bird was scared and flew away to its nest.",
    "Ben and Mia went to the beach with their dad. They built a big sand castle and found many shells. "
    "When the sun went down, they were tired but happy.",
    "One day, a boy named Jack saw a shiny rock on the ground. He picked it up and showed it to his friend. "
    '"Look, it is so pretty!" he said.',
)

_IDENTITY = ("raw", "none")


# ---------------------------------------------------------------------------------------------- codec hop


def _codec_label(codec: Any) -> str:
    return codec if isinstance(codec, str) else str(getattr(codec, "name", type(codec).__name__))


def round_trip(x: torch.Tensor, codec: Any, group_size: int = 64) -> torch.Tensor:
    """``x`` after one hop through ``codec`` as the runtime sends it: encode, to frame bytes, decode.

    ``codec``: a registered name (``"raw"`` / ``"none"`` = no compression), or a ``Codec`` instance (used
    as is: ``decode(encode(x))``), or None (identity).
    """
    if codec is None:
        return x
    if not isinstance(codec, str):
        return codec.decode(codec.encode(x), device=x.device).to(x.dtype)
    from hyperlane_lab.runtime.frame import FrameHeader, FrameKind
    from hyperlane_lab.runtime.wire import decode_payload, encode_tensor

    payload = encode_tensor(x, codec, group_size)
    body = b"".join(bytes(p) for p in payload.parts)  # what crosses the socket
    fields = (payload.dtype, payload.codec, payload.group_size, payload.shape, len(body))
    header = FrameHeader(FrameKind.TENSOR, "", 0, 1, 1, *fields)
    out = decode_payload(header, memoryview(bytearray(body)), device=x.device)
    return out.reshape(x.shape)


def _resolve(codec: Any, group_size: int) -> Any:
    """The Codec object for ``codec`` (None for no compression)."""
    if codec is None or (isinstance(codec, str) and codec in _IDENTITY):
        return None
    if isinstance(codec, str):
        from hyperlane_lab import codecs

        return codecs.get(codec, group_size)
    return codec


class CodecStage:
    """Any stage whose output hidden state goes through ``codec`` (the hop); the last stage's logits don't."""

    def __init__(self, stage: Any, codec: Any, group_size: int = 64) -> None:
        self.stage, self.codec, self.group_size = stage, codec, group_size

    def __getattr__(self, name: str) -> Any:  # span, spec, is_first, open_session, ... of the stage
        return getattr(self.stage, name)

    def forward(self, sid: str, x: torch.Tensor, positions: torch.Tensor, all_logits: bool = False) -> Any:
        out = self.stage.forward(sid, x, positions, all_logits=all_logits)
        if self.stage.is_last:
            return out
        return round_trip(out, self.codec, self.group_size)


# ---------------------------------------------------------------------------------------------- model


def load_pipeline(
    model: Any = None,
    spans: Sequence[Any] | None = None,
    n_stages: int = 3,
    dtype: str = "fp32",
    device: str = "cpu",
) -> Any:
    """An ``InProcessPipeline`` for ``model`` (path / None = bundled / an InProcessPipeline), >= 2 stages."""
    from hyperlane_lab.generation.pipeline import InProcessPipeline
    from hyperlane_lab.types import LayerSpan

    spans = [s if isinstance(s, LayerSpan) else LayerSpan(*s) for s in spans] if spans else None
    if isinstance(model, InProcessPipeline):
        pipe = model
        if spans is not None and spans != [s.span for s in pipe.stages]:
            raise ValueError(
                f"spans {[str(s) for s in spans]} differ from the pipeline's "
                f"{[str(s.span) for s in pipe.stages]}; pass the model path instead to re-split it"
            )
    else:
        pipe = InProcessPipeline.from_pretrained(
            model, n_stages=n_stages, spans=spans, dtype=dtype, device=device
        )
    if len(pipe.stages) < 2:
        raise ValueError(
            "a codec probe needs at least 2 stages (a boundary to compress); pass n_stages >= 2 or spans"
        )
    return pipe


@dataclass
class _Pass:
    sent: list[list[torch.Tensor]]  # per boundary, per prompt: hidden [S, H] leaving the stage (fp64)
    received: list[list[torch.Tensor]]  # per boundary, per prompt: hidden [S, H] the next stage gets
    logits: list[torch.Tensor]  # per prompt [S, V] float64


@torch.inference_mode()
def _teacher_forced(
    stages: Sequence[Any], prompts: Sequence[list[int]], hops: Sequence[Any], gs: int
) -> _Pass:
    """Run every prompt (batch 1, all positions) with ``hops[b]`` applied at boundary b."""
    nb = len(stages) - 1
    out = _Pass([[] for _ in range(nb)], [[] for _ in range(nb)], [])
    device = getattr(stages[0], "device", torch.device("cpu"))
    for ids in prompts:
        sid = uuid.uuid4().hex
        x: torch.Tensor = torch.tensor([ids], dtype=torch.int64, device=device)
        pos = torch.arange(len(ids), dtype=torch.int64, device=device)[None]
        for st in stages:
            st.open_session(sid, 1, len(ids))
        try:
            for b, st in enumerate(stages):
                if b == nb:
                    out.logits.append(st.forward(sid, x, pos, all_logits=True)[0].double().cpu())
                    break
                h = st.forward(sid, x, pos)
                x = round_trip(h, hops[b], gs)
                out.sent[b].append(h[0].double().cpu())
                out.received[b].append(x[0].double().cpu())
        finally:
            for st in stages:
                st.close_session(sid)
    return out


def greedy_sequences(
    pipeline: Any, prompts: Sequence[Any], hops: Sequence[Any], group_size: int = 64, max_new_tokens: int = 32
) -> list[list[int]]:
    """Greedy ids per prompt (each prompt alone, like ``generate(prompt)``) with ``hops[b]`` at boundary b;
    a sequence that stopped at EOS ends with the EOS id."""
    from hyperlane_lab.generation.pipeline import InProcessPipeline

    nb = len(pipeline.stages) - 1
    if len(hops) != nb:
        raise ValueError(f"{len(hops)} codecs given for {nb} boundaries; give one per boundary")
    stages = [CodecStage(st, hops[i], group_size) if i < nb else st for i, st in enumerate(pipeline.stages)]
    pipe = InProcessPipeline(stages, pipeline.tokenizer, pipeline.spec)
    eos = pipeline.spec.eos_token_ids[0] if pipeline.spec.eos_token_ids else None
    seqs = []
    for p in prompts:
        r = pipe.generate(p, max_tokens=max_new_tokens)
        seqs.append(list(r.token_ids) + ([eos] if r.finish_reason == "eos" and eos is not None else []))
    return seqs


# ---------------------------------------------------------------------------------------------- metrics


def _hidden_metrics(x: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, float]:
    """x, y [T, H] float64: reference and compressed hidden states (see the module docstring)."""
    err = y - x
    norm = float(x.norm())
    cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-300)
    k = min(k, x.shape[1] - 1)
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    if k > 0:
        keep[x.mean(0).abs().topk(k).indices] = False
    keep_norm = float(x[:, keep].norm())
    return {
        "rel_l2": float(err.norm()) / norm if norm > 0 else 0.0,
        "cosine": float(cos.mean()),
        "rel_l2_non_outlier": float(err[:, keep].norm()) / keep_norm if keep_norm > 0 else 0.0,
        "max_abs": float(err.abs().max()),
    }


def _logit_metrics(ref: list[torch.Tensor], got: list[torch.Tensor], prompts: Sequence[list[int]]) -> dict:
    kl_sum = agree = n_pos = nll_ref = nll = n_tgt = 0.0
    for lr, lg, ids in zip(ref, got, prompts):
        pr, pg = torch.log_softmax(lr, -1), torch.log_softmax(lg, -1)
        kl_sum += float((pr.exp() * (pr - pg)).sum())
        agree += float((lr.argmax(-1) == lg.argmax(-1)).sum())
        n_pos += lr.shape[0]
        tgt = torch.tensor(ids[1:], dtype=torch.int64)
        nll_ref -= float(pr[:-1].gather(1, tgt[:, None]).sum())
        nll -= float(pg[:-1].gather(1, tgt[:, None]).sum())
        n_tgt += len(tgt)
    ppl_ref, ppl = math.exp(nll_ref / n_tgt), math.exp(nll / n_tgt)
    rel = ppl / ppl_ref - 1.0
    return dict(kl=kl_sum / n_pos, top1_agreement=agree / n_pos, ppl_ref=ppl_ref, ppl=ppl, ppl_delta_rel=rel,
                positions=int(n_pos))  # fmt: skip


def greedy_agreement(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> dict[str, float]:
    """Agreement of greedy sequences (see the module docstring for the definitions)."""
    total = prefix = same = identical = 0
    for a, b in zip(ref, got):
        n = max(len(a), len(b))
        eq = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
        lead = next((i for i, e in enumerate(eq) if not e), n)
        total, prefix, same = total + n, prefix + lead, same + sum(eq)
        identical += int(list(a) == list(b))
    return {
        "greedy_prefix_agreement": prefix / total if total else 1.0,
        "greedy_agreement": same / total if total else 1.0,
        "greedy_identical": identical / max(1, len(ref)),
        "greedy_tokens": total,
    }


# ---------------------------------------------------------------------------------------------- probes


@dataclass
class _Reference:
    pipe: Any
    prompts: list[Any]  # as given (text or ids), for generate
    ids: list[list[int]]
    clean: _Pass
    greedy: list[list[int]]


def _reference(pipe: Any, prompts: Sequence[Any] | None, text: str | None, max_new_tokens: int) -> _Reference:
    if prompts is not None and text is not None:
        raise ValueError("pass prompts or text, not both")
    plist: list[Any] = [text] if text is not None else list(prompts or DEFAULT_PROMPTS)
    if not plist:
        raise ValueError("no prompts given")
    ids = [pipe.encode(p) for p in plist]
    if any(len(i) < 2 for i in ids):
        raise ValueError("every prompt needs >= 2 tokens (perplexity predicts token t+1 from t)")
    nb = len(pipe.stages) - 1
    clean = _teacher_forced(pipe.stages, ids, [None] * nb, 0)
    greedy = greedy_sequences(pipe, plist, [None] * nb, 0, max_new_tokens)
    return _Reference(pipe, plist, ids, clean, greedy)


def _probe_rows(ref: _Reference, codec: Any, group_size: int, max_new_tokens: int, k: int) -> list[dict]:
    pipe, stages = ref.pipe, ref.pipe.stages
    nb = len(stages) - 1
    spec = pipe.spec
    dtype = getattr(stages[0], "dtype", torch.float32)
    resolved = _resolve(codec, group_size)  # ValueError for an unknown name, before any work
    h = spec.hidden_size
    nbytes = h * dtype.itemsize if resolved is None else int(resolved.encoded_nbytes((1, 1, h), dtype))
    base = {
        "codec": _codec_label(codec),
        "group_size": 0 if resolved is None else int(resolved.group_size),
        "bytes_per_token": nbytes,
        "ratio_vs_fp16": 2 * h / nbytes,
    }
    rows = []
    for b in [*range(nb), None]:  # None = every boundary
        hops = [codec if b is None or i == b else None for i in range(nb)]
        run = _teacher_forced(stages, ref.ids, hops, group_size)
        if b is None:  # what the last stage receives vs the reference: accumulated error
            x, y = torch.cat(ref.clean.sent[-1]), torch.cat(run.received[-1])
        else:  # one hop on the reference hidden state
            x, y = torch.cat(run.sent[b]), torch.cat(run.received[b])
        greedy = greedy_sequences(pipe, ref.prompts, hops, group_size, max_new_tokens)
        rows.append(
            {
                "boundary": "all" if b is None else str(stages[b + 1].span.start),
                **base,
                **_hidden_metrics(x, y, k),
                **_logit_metrics(ref.clean.logits, run.logits, ref.ids),
                **greedy_agreement(ref.greedy, greedy),
            }
        )
    return rows


def probe(
    model: Any = None,
    codec: Any = "int4",
    group_size: int = 64,
    prompts: Sequence[Any] | None = None,
    text: str | None = None,
    spans: Sequence[Any] | None = None,
    n_stages: int = 3,
    max_new_tokens: int = 32,
    dtype: str = "fp32",
    outlier_channels: int = 4,
) -> Any:
    """Per-boundary and whole-model accuracy of ``codec`` on ``model`` (see the module docstring).

    ``model``: path, None (bundled) or an ``InProcessPipeline``; ``prompts`` (texts or id lists) or one
    ``text`` (default: ``DEFAULT_PROMPTS``); ``spans`` (LayerSpan or (start, end) pairs) or ``n_stages``.
    """
    args = (model, prompts, text, spans, n_stages, max_new_tokens, dtype, outlier_channels)
    return probe_grid([codec], [group_size], *args)


def probe_grid(
    codecs: Sequence[Any],
    group_sizes: Sequence[int] = (64,),
    model: Any = None,
    prompts: Sequence[Any] | None = None,
    text: str | None = None,
    spans: Sequence[Any] | None = None,
    n_stages: int = 3,
    max_new_tokens: int = 32,
    dtype: str = "fp32",
    outlier_channels: int = 4,
) -> Any:
    """``probe`` for every codec x group size (one model load and one reference run); codecs without
    groups (fp16, raw) run once. Returns the concatenated frame."""
    import pandas as pd

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pipe = load_pipeline(model, spans, n_stages, dtype)
    ref = _reference(pipe, prompts, text, max_new_tokens)
    rows: list[dict] = []
    seen: set[tuple[str, int]] = set()
    for c in codecs:
        for gs in group_sizes:
            resolved = _resolve(c, gs)
            key = (_codec_label(c), 0 if resolved is None else int(resolved.group_size))
            if key in seen:
                continue
            seen.add(key)
            rows += _probe_rows(ref, c, gs, max_new_tokens, outlier_channels)
    return pd.DataFrame(rows)


_TABLE_COLS = {  # column -> format
    "codec": "{}", "group_size": "{}", "boundary": "{}", "ratio_vs_fp16": "{:.2f}", "rel_l2": "{:.2e}",
    "rel_l2_non_outlier": "{:.2e}", "cosine": "{:.6f}", "max_abs": "{:.2e}", "kl": "{:.2e}",
    "top1_agreement": "{:.4%}", "ppl_delta_rel": "{:+.4%}", "greedy_prefix_agreement": "{:.3f}",
    "greedy_agreement": "{:.3f}",
}  # fmt: skip


def probe_table(df: Any) -> str:
    """Markdown table of a probe frame."""
    lines = ["| " + " | ".join(_TABLE_COLS) + " |", "|" + "---|" * len(_TABLE_COLS)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f.format(r[c]) for c, f in _TABLE_COLS.items()) + " |")
    return "\n".join(lines)
