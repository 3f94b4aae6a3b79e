"""InProcessPipeline: N stages in one process, driven through the same stage interface the
distributed runtime uses (``open_session`` / ``forward`` / ``close_session``)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hyperlane_lab.generation.driver import TextGenerator
from hyperlane_lab.generation.sampling import Sampler
from hyperlane_lab.models import ModelSpec, load_stage, load_tokenizer, resolve_model
from hyperlane_lab.types import LayerSpan, SamplingParams

__all__ = ["InProcessPipeline", "StageStats"]


@dataclass
class StageStats:
    calls: int = 0
    compute_s: float = 0.0
    tokens: int = 0


@dataclass
class _LocalSession:
    stages: Sequence[Any]
    sid: str
    sampler: Sampler
    stats: list[StageStats] = field(default_factory=list)

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = ids
        for st, stat in zip(self.stages, self.stats):
            t0 = time.perf_counter()
            x = st.forward(self.sid, x, positions)
            stat.compute_s += time.perf_counter() - t0
            stat.calls += 1
            stat.tokens += int((positions >= 0).sum())
        return self.sampler(x)


class _LocalRunner:
    def __init__(self, stages: Sequence[Any]) -> None:
        self.stages = stages
        self.stats = [StageStats() for _ in stages]

    @contextmanager
    def open_session(self, batch: int, max_len: int, params: SamplingParams) -> Iterator[_LocalSession]:
        sid = uuid.uuid4().hex
        opened = []
        try:
            for st in self.stages:
                st.open_session(sid, batch, max_len)
                opened.append(st)
            yield _LocalSession(self.stages, sid, Sampler(params), self.stats)
        finally:
            for st in opened:
                st.close_session(sid)


class InProcessPipeline(TextGenerator):
    """Stages run one after another in this process; ``generate`` as in the distributed client."""

    runner: _LocalRunner

    def __init__(self, stages: Sequence[Any], tokenizer: Any, spec: ModelSpec) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        spans = [s.span for s in stages]
        if (
            spans[0].start != 0
            or spans[-1].end != spec.n_layers
            or any(a.end != b.start for a, b in itertools.pairwise(spans))
        ):
            raise ValueError(
                f"stage spans {[str(s) for s in spans]} must cover [0, {spec.n_layers}) contiguously"
            )
        self.stages, self.tokenizer, self.spec = list(stages), tokenizer, spec
        self.runner = _LocalRunner(self.stages)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        n_stages: int = 1,
        spans: Sequence[LayerSpan] | None = None,
        dtype: str | torch.dtype = "fp32",
        device: str = "cpu",
    ) -> InProcessPipeline:
        source = resolve_model(model)
        spec = ModelSpec.from_pretrained(source)
        spans = tuple(spans) if spans else LayerSpan.split_uniform(spec.n_layers, n_stages)
        stages = [load_stage(source, sp, dtype, device, spec) for sp in spans]
        return cls(stages, load_tokenizer(source), spec)

    @property
    def stage_stats(self) -> list[StageStats]:
        return self.runner.stats

    def stage_table(self) -> list[dict[str, Any]]:
        rows = []
        for i, (st, stat) in enumerate(zip(self.stages, self.runner.stats)):
            rows.append(
                {"stage": i, **st.describe(), "calls": stat.calls, "compute_s": round(stat.compute_s, 6)}
            )
        return rows
