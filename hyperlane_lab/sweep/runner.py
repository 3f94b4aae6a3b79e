"""Run a sweep: every grid point once, results saved after each point, finished points skipped.

    df = hyperlane_lab.sweep.run("experiments/partitioners_catalog.yaml")   # -> DataFrame
    df = hyperlane_lab.sweep.run(path, out="results/mine")                  # other results folder

An evaluator turns one point into metric rows: ``evaluate(point, ctx) -> list[dict]``. Which one runs
is chosen by ``(mode, measure)`` in ``EVALUATORS`` (entries may be callables or "module:function").
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperlane_lab.sweep.config import PointConfig, SweepConfig, load_config, parse_config, point_hash
from hyperlane_lab.sweep.store import ResultStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EVALUATORS", "Evaluator", "SweepContext", "point_params", "run", "run_config"]

log = logging.getLogger(__name__)

Evaluator = Callable[[PointConfig, "SweepContext"], list[dict[str, Any]]]
EVALUATORS: dict[tuple[str, str], Evaluator | str] = {
    ("simulate", "throughput"): "hyperlane_lab.sweep.simulate:simulate_point",
    ("run", "throughput"): "hyperlane_lab.sweep.local:run_point",
    ("run", "accuracy"): "hyperlane_lab.sweep.accuracy:accuracy_point",
}


def _resolve(entry: Evaluator | str) -> Evaluator:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    fn: Evaluator = getattr(importlib.import_module(module), name)
    return fn


class SweepContext:
    """Resources shared by a sweep's points: a LocalCluster is kept while consecutive points want
    the same number of workers (points are ordered cluster-first), and closed at the end."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self._stack = ExitStack()
        self._cluster: Any = None
        self._size = 0
        self.clusters_started = 0

    def local_cluster(self, n: int) -> Any:
        """A running ``runtime.LocalCluster`` of ``n`` workers (reused when the size matches)."""
        if self._cluster is not None and self._size == n:
            return self._cluster
        from hyperlane_lab.runtime import LocalCluster

        self._stack.close()
        self._stack = ExitStack()
        self._cluster = self._stack.enter_context(LocalCluster(n))
        self._size = n
        self.clusters_started += 1
        return self._cluster

    def close(self) -> None:
        self._cluster = None
        self._stack.close()


def point_params(point: PointConfig) -> dict[str, Any]:
    """A point's fields as result columns (a card-list cluster reads ``rtx4090+rtx3090``)."""
    d = point.as_dict()
    if isinstance(point.cluster, tuple):
        d["cluster"] = "+".join(point.cluster)
    return d


def run_config(
    cfg: SweepConfig, out: str | Path | None = None, *, progress: bool = True, fail_fast: bool = False
) -> pd.DataFrame:
    """Run ``cfg``'s points not yet done in ``out``; return the rows of all its points (config order)."""
    from tqdm.auto import tqdm

    folder = Path(out) if out is not None else Path(cfg.results or Path("results") / cfg.name)
    store = ResultStore(folder)
    evaluate = _resolve(EVALUATORS[(cfg.mode, cfg.measure)])
    points = cfg.points()
    hashes = [point_hash(cfg, p) for p in points]
    done = store.completed()
    todo = [(h, p) for h, p in zip(hashes, points) if h not in done]
    log.info(
        "sweep %s: %d points, %d already done, results in %s",
        cfg.name,
        len(points),
        len(points) - len(todo),
        store.path,
    )
    ctx = SweepContext(cfg)
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=cfg.name, disable=not progress)
    try:
        for h, p in todo:
            bar.set_postfix_str(", ".join(f"{k}={getattr(p, k)}" for k in cfg.grid_keys), refresh=False)
            try:
                rows = evaluate(p, ctx)
            except Exception as e:
                if fail_fast:
                    raise
                log.warning("sweep %s: point %s failed: %s", cfg.name, point_params(p), e)
                store.add(h, point_params(p), [{}], status="error", error=f"{type(e).__name__}: {e}")
            else:
                store.add(h, point_params(p), rows or [{}])
            store.save()  # incremental: an interrupt loses at most the point in flight
            bar.update(1)
    finally:
        bar.close()
        ctx.close()
    return store.frame(hashes)


def run(
    path: str | Path | dict[str, Any],
    out: str | Path | None = None,
    *,
    progress: bool = True,
    fail_fast: bool = False,
) -> pd.DataFrame:
    """Load the sweep YAML at ``path`` (or a config mapping), run it, return its results DataFrame."""
    cfg = parse_config(path, "<dict>") if isinstance(path, dict) else load_config(path)
    return run_config(cfg, out, progress=progress, fail_fast=fail_fast)
