"""Run-mode throughput points: real worker processes on this machine (``runtime.LocalCluster``).

For a point the model is loaded onto the sweep's cluster with the point's partitioner, codec and
engine; an optional warm-up request runs; then ``concurrency`` threads each send one request of
``max_tokens`` tokens at the same moment. Reported: wall time, generated tokens/s over all
requests, and the pipeline's bubbles from the trace (warm-up sessions excluded).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperlane_lab.sweep.config import PointConfig
    from hyperlane_lab.sweep.runner import SweepContext

__all__ = ["concurrent_generate", "run_point"]


def concurrent_generate(
    model: Any, prompt: str, max_tokens: int, concurrency: int, seed: int = 0
) -> tuple[list[Any], float]:
    """``concurrency`` threads call ``model.generate`` together; returns (results, wall seconds).

    A thread's exception is re-raised here after all threads finished.
    """
    results: list[Any] = [None] * concurrency
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = model.generate(prompt, max_tokens=max_tokens, seed=seed + i)
        except BaseException as e:  # reported to the caller below
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"sweep-gen-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{concurrency} concurrent generate calls did not finish within 600 s")
    return results, wall


def run_point(point: PointConfig, ctx: SweepContext) -> list[dict[str, Any]]:
    from hyperlane_lab.runtime import AutoDistributedModel
    from hyperlane_lab.tracing import summarize

    assert isinstance(point.cluster, int)  # checked by parse_config for run mode
    cluster = ctx.local_cluster(point.cluster)
    model = AutoDistributedModel.from_pretrained(
        point.model,
        workers=cluster.addresses,
        partitioner=point.partitioner,
        compression=point.codec,
        group_size=point.group_size,
        engine=point.engine,
        dtype=point.dtype,
        objective=point.objective,
        concurrency=point.concurrency,
        progress=False,
    )
    try:
        warm_sessions: set[str] = set()
        if point.warmup:
            model.generate(point.prompt, max_tokens=2)
            warm_sessions = {ev.session for ev in model.trace_events()}
        results, wall = concurrent_generate(
            model, point.prompt, point.max_tokens, point.concurrency, point.seed
        )
        tokens = sum(len(r.token_ids) for r in results)
        events = [ev for ev in model.trace_events() if ev.session not in warm_sessions]
        row: dict[str, Any] = {
            "stages": len(model.plan.stages),
            "spans": ";".join(str(s.span) for s in model.plan.stages),
            "wall_s": wall,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "decode_tokens_per_s_mean": sum(r.timings.decode_tokens_per_s for r in results) / len(results),
            "predicted_tokens_per_s": model.plan.predicted_tokens_per_s,
        }
        if events:
            s = summarize(events)
            row.update(
                bubble_pct_mean=float(s["bubble_pct"].mean()),
                bubble_pct_max=float(s["bubble_pct"].max()),
                busy_pct_min=float(s["busy_pct"].min()),
                bytes_sent=int(s["bytes_sent"].sum()),
                trace_events=len(events),
            )
        return [row]
    finally:
        model.close()
