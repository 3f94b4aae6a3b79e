"""The token loop shared by the in-process pipeline and the distributed client.

A *runner* opens a session over its stages and offers ``step(ids, positions) -> next ids``; this
module batches prompts of different lengths (right padding, position -1), feeds finished rows as
padding, applies EOS / stop strings / max tokens, streams text, and records timings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hyperlane_lab.generation.text import SequenceState
from hyperlane_lab.types import SamplingParams

__all__ = ["GenerationResult", "GenerationTimings", "Runner", "RunnerSession", "TextGenerator"]


class RunnerSession(Protocol):
    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids/positions [B, S] int64 (-1 = padding) -> next token ids [B] int64."""
        ...


class Runner(Protocol):
    def open_session(
        self, batch: int, max_len: int, params: SamplingParams
    ) -> AbstractContextManager[RunnerSession]: ...


@dataclass
class GenerationTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "decode_steps": self.decode_steps,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, prompt excluded, EOS excluded
    prompt_token_ids: list[int]
    finish_reason: str
    timings: GenerationTimings = field(default_factory=GenerationTimings)

    def __str__(self) -> str:
        return self.text


def _push(
    states: list[SequenceState], nxt: torch.Tensor, timings: GenerationTimings
) -> Iterator[tuple[int, str]]:
    """Give each unfinished row its new token; yield (row, text) for rows with new text."""
    for b, s in enumerate(states):
        if not s.done:
            delta = s.push(int(nxt[b]))
            timings.generated_tokens += 1
            if delta:
                yield b, delta


class TextGenerator:
    """``generate`` for anything that has ``tokenizer``, ``spec`` and a ``runner``."""

    tokenizer: Any
    spec: Any
    runner: Runner

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.spec.vocab_size for t in ids):
                raise ValueError(f"token ids must be in [0, {self.spec.vocab_size})")
        elif self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights): pass token ids instead of text")
        else:
            ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError("the prompt encodes to no tokens; pass a non-empty prompt")
        return ids

    def generate(
        self,
        prompt: str | Sequence[str],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stream: bool = False,
    ) -> Any:
        """Generate for one prompt (-> GenerationResult) or a list (-> list of them).

        With ``stream=True`` returns an iterator of text pieces (one prompt) or of
        ``(index, text)`` pairs (a list of prompts) as tokens arrive.
        """
        # a prompt is text, or token ids (a list of ints); a list of either is a batch
        single = isinstance(prompt, str) or (
            isinstance(prompt, Sequence) and bool(prompt) and all(isinstance(t, int) for t in prompt)
        )
        prompts: list[Any] = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        params = SamplingParams(temperature, top_k, top_p, seed)
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        eos = frozenset(self.spec.eos_token_ids)
        states = [SequenceState(self.encode(p), self.tokenizer, max_tokens, eos, stops) for p in prompts]
        timings = GenerationTimings(prompt_tokens=sum(len(s.prompt_ids) for s in states))
        events = self._loop(states, params, timings)
        if stream:
            return (d for _, d in events) if single else events
        for _ in events:
            pass
        results = [
            GenerationResult(s.text, list(s.token_ids), s.prompt_ids, s.finish_reason or "length", timings)
            for s in states
        ]
        return results[0] if single else results

    async def agenerate(self, prompt: str | Sequence[str], **kwargs: Any) -> Any:
        """``generate`` for asyncio code: runs in a worker thread, so many tasks can be in flight."""
        import asyncio

        if kwargs.get("stream"):
            raise ValueError("agenerate does not stream; iterate generate(..., stream=True) in a thread")
        return await asyncio.to_thread(self.generate, prompt, **kwargs)

    def _loop(
        self, states: list[SequenceState], params: SamplingParams, timings: GenerationTimings
    ) -> Iterator[tuple[int, str]]:
        bsz = len(states)
        lens = [len(s.prompt_ids) for s in states]
        width = max(lens)
        max_len = width + max(s.max_tokens for s in states)
        ids = torch.zeros((bsz, width), dtype=torch.int64)
        positions = torch.full((bsz, width), -1, dtype=torch.int64)
        for b, s in enumerate(states):
            ids[b, : lens[b]] = torch.tensor(s.prompt_ids)
            positions[b, : lens[b]] = torch.arange(lens[b])
        cur = torch.tensor(lens, dtype=torch.int64)  # next position of each row
        if getattr(self.runner, "server_loop", False):  # the workers may run the token loop
            opened = self.runner.open_session(  # type: ignore[call-arg]
                bsz, max_len, params, max_new_tokens=max(s.max_tokens for s in states)
            )
        else:
            opened = self.runner.open_session(bsz, max_len, params)
        with opened as session:
            if getattr(session, "ring", False):
                yield from self._loop_ring(session, states, ids, positions, timings)
                return
            if getattr(session, "can_run_ahead", lambda: False)():
                yield from self._loop_ahead(session, states, ids, positions, cur, timings)
                return
            t0 = time.perf_counter()
            nxt = session.step(ids, positions)
            timings.prefill_s = time.perf_counter() - t0
            while True:
                yield from _push(states, nxt, timings)
                if all(s.done for s in states):
                    return
                done = torch.tensor([s.done for s in states])
                pos = torch.where(done, torch.full_like(cur, -1), cur)[:, None]
                cur += 1
                t0 = time.perf_counter()
                nxt = session.step(nxt.to(torch.int64)[:, None], pos)
                timings.decode_s += time.perf_counter() - t0
                timings.decode_steps += 1

    @staticmethod
    def _loop_ahead(
        session: Any,
        states: list[SequenceState],
        ids: torch.Tensor,
        positions: torch.Tensor,
        cur: torch.Tensor,
        timings: GenerationTimings,
    ) -> Iterator[tuple[int, str]]:
        """``_loop`` for greedy sessions whose tokens can stay on the device (``session.submit``).

        Step t+1 is enqueued, fed by step t's device-side token, *before* the host reads step t's
        token: the host's work per token (stop checks, detokenizing, streaming) overlaps the GPU's
        next step instead of leaving the GPU idle. Positions are those ``_loop`` would use, except
        that a row which finishes at step t still takes a real position in the step already queued
        behind it; that step's output for the row is ignored and the row's cache is never read
        again, so the tokens are exactly ``_loop``'s. The step queued after the last token is
        wasted GPU work (one step), never returned.
        """
        t0 = time.perf_counter()
        pending = session.submit(ids, positions)
        t_dec, first = 0.0, True
        while True:
            ahead = None
            if any(not s.done and len(s.token_ids) + 1 < s.max_tokens for s in states):
                done = torch.tensor([s.done for s in states])
                pos = torch.where(done, torch.full_like(cur, -1), cur)[:, None]
                cur += 1
                ahead = session.submit(pending.device_ids, pos)
            nxt = pending.result()
            now = time.perf_counter()
            if first:
                timings.prefill_s, t_dec, first = now - t0, now, False
            else:
                timings.decode_steps += 1
                timings.decode_s = now - t_dec
            yield from _push(states, nxt, timings)
            if all(s.done for s in states):
                return
            if ahead is None:  # unreachable: a row left unfinished had a token budget for this step
                raise RuntimeError("run-ahead decode lost a step")
            pending = ahead

    @staticmethod
    def _loop_ring(
        session: Any,
        states: list[SequenceState],
        ids: torch.Tensor,
        positions: torch.Tensor,
        timings: GenerationTimings,
    ) -> Iterator[tuple[int, str]]:
        """``_loop`` when the workers run the token loop: the client sends the prompt step, then
        only reads each step's ids (``session.next_step``). The last stage advances positions and
        retires rows that sampled EOS exactly as ``_loop`` does; rows this side finishes for other
        reasons (stop strings) keep being computed there, and their ids are ignored here, which
        leaves every other row's tokens unchanged (rows never interact)."""
        t0 = time.perf_counter()
        nxt = session.step(ids, positions)
        timings.prefill_s = time.perf_counter() - t0
        t_dec = time.perf_counter()
        while True:
            yield from _push(states, nxt, timings)
            if all(s.done for s in states):
                return
            nxt = session.next_step()
            timings.decode_steps += 1
            timings.decode_s = time.perf_counter() - t_dec
