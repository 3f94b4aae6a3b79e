"""Turning last-stage logits into token ids: greedy, temperature, top-k, top-p, seeded.

The same code runs in the in-process pipeline and on the last worker of a distributed pipeline,
so a seeded sampled generation gives the same tokens either way.
"""

from __future__ import annotations

import torch

from hyperlane_lab.types import SamplingParams

__all__ = ["Sampler", "filter_logits"]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of fp32 logits [B, V]."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


NON_FINITE = "logits contain NaN or Inf: the model produced non-finite values (check dtype/weights)"


class Sampler:
    """Stateful per session: one seeded generator per batch row, so a row's tokens depend only on
    (seed, row index) and its own logits, and successive steps continue each row's stream."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._gens: list[torch.Generator] = []

    def _generators(self, rows: int) -> list[torch.Generator]:
        while len(self._gens) < rows:
            g = torch.Generator()
            if self.params.seed is None:
                g.seed()
            else:
                g.manual_seed(self.params.seed + 1_000_003 * len(self._gens))
            self._gens.append(g)
        return self._gens

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> token ids [B] int64 (on CPU)."""
        if not torch.isfinite(logits).all():
            raise ValueError(NON_FINITE)
        if self.params.greedy:
            return logits.argmax(dim=-1).cpu()
        probs = filter_logits(logits, self.params).softmax(-1).cpu()
        gens = self._generators(probs.shape[0])
        return torch.cat(
            [torch.multinomial(probs[b : b + 1], 1, generator=gens[b])[0] for b in range(probs.shape[0])]
        )
