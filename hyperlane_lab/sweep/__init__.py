"""YAML experiment sweeps: a base config x a grid -> one results DataFrame (resumable).

    from hyperlane_lab import sweep
    df = sweep.run("experiments/partitioners_catalog.yaml")      # saved under results/<name>/
    cfg = sweep.load_config("experiments/concurrency_bubbles.yaml"); cfg.points()

Modes: ``simulate`` (planner + pipeline simulator over catalog clusters, no processes) and ``run``
(real local workers through the runtime); see ``hyperlane_lab.sweep.config`` for the file format.
"""

from hyperlane_lab.sweep.config import (
    MEASURES,
    MODES,
    PointConfig,
    SweepConfig,
    load_config,
    parse_config,
    point_hash,
)
from hyperlane_lab.sweep.runner import EVALUATORS, SweepContext, run, run_config
from hyperlane_lab.sweep.store import ResultStore

__all__ = [
    "EVALUATORS",
    "MEASURES",
    "MODES",
    "PointConfig",
    "ResultStore",
    "SweepConfig",
    "SweepContext",
    "load_config",
    "parse_config",
    "point_hash",
    "run",
    "run_config",
]
