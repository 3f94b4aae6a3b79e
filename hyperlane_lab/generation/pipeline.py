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
from hyperlane_lab.generation.sampling import NON_FINITE, Sampler
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

    def _forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every stage in turn; on CUDA the time recorded is the host's (enqueueing)."""
        for st, stat in zip(self.stages, self.stats):
            t0 = time.perf_counter()
            x = st.forward(self.sid, x, positions)
            stat.compute_s += time.perf_counter() - t0
            stat.calls += 1
            stat.tokens += int((positions >= 0).sum())
        return x

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.sampler(self._forward(ids, positions))

    # -------------------------------------------------------------- run-ahead decode (greedy, CUDA)

    def can_run_ahead(self) -> bool:
        """Greedy decoding with torch stages on CUDA: the next token can stay on the device."""
        return self.sampler.params.greedy and all(
            hasattr(st, "graph_decoder") and getattr(getattr(st, "device", None), "type", "") == "cuda"
            for st in self.stages
        )

    def submit(self, ids: torch.Tensor, positions: torch.Tensor) -> _PendingIds:
        """Enqueue a step whose greedy token stays on the device; returns at once (no host sync).

        ``ids`` are host ids [B, S] or the device ids of the previous ``_PendingIds`` (``.device_ids``):
        the driver can enqueue step t+1 before it has read step t's token, so the GPU never waits
        for the host's loop (stop checks, detokenizing, streaming)."""
        x = self._forward(ids, positions)
        # the Sampler's greedy choice and its finiteness check, on the device (inside the decode
        # graph when there is one): one small copy back
        from hyperlane_lab.models.cuda_decode import graph_greedy, greedy_pack

        last = self.stages[-1]
        packed = graph_greedy(last.session(self.sid), x) if hasattr(last, "session") else None
        if packed is None:
            packed = greedy_pack(x)
        if packed.device.type != "cuda":  # CPU (the tests drive this path there too): already done
            return _PendingIds(packed[:-1].view(-1, 1), packed, None)
        host = torch.empty(packed.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _PendingIds(packed[:-1].view(-1, 1), host, ready)


@dataclass
class _PendingIds:
    device_ids: torch.Tensor  # [B, 1] int64 on the device
    host: torch.Tensor  # pinned [B + 1]: ids, then 1 if the logits held NaN/Inf
    ready: Any  # torch.cuda.Event after the copy into ``host`` (None: nothing to wait for)

    def result(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        if int(self.host[-1]):
            raise ValueError(NON_FINITE)
        return self.host[:-1].clone()


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
