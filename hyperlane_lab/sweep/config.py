"""Typed sweep configs: a YAML file = a base point + a grid of values to vary.

    name: partitioners_catalog
    mode: simulate            # simulate (planner + simulator, no processes) | run (real local workers)
    measure: throughput       # throughput (tokens/s, bubbles) | accuracy (codec error; run mode)
    base:                     # every PointConfig field not given keeps its default
      model: llama-2-7b
      cluster: [rtx4090, rtx3090]
    grid:                     # the product of these lists is the set of points
      partitioner: [uniform, greedy]
      codec: [fp16, int8]
    results: results/partitioners   # optional; `out=` / `--out` override it

Unknown keys anywhere raise ``ConfigError`` naming the key's path and the valid keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperlane_lab.errors import ConfigError

__all__ = ["MEASURES", "MODES", "PointConfig", "SweepConfig", "load_config", "parse_config", "point_hash"]

MODES = ("simulate", "run")
MEASURES = ("throughput", "accuracy")
OBJECTIVES = ("latency", "throughput")
# run-mode clusters are a worker count; simulate-mode clusters name catalog cards / cluster files
ClusterSpec = int | str | tuple[str, ...]


@dataclass(frozen=True)
class PointConfig:
    """One experiment point. Fields a mode does not use are ignored by it (and still hashed)."""

    model: str | None = None  # None = the bundled model (run); a preset like "llama-2-7b" (simulate)
    partitioner: str = "uniform"
    codec: str = "fp16"  # boundary codec (run: the model's compression)
    group_size: int = 64  # quantization group (accuracy)
    # run: number of local workers; simulate: a list of catalog cards, a catalog cluster name or a cluster YAML
    cluster: ClusterSpec = 2
    concurrency: int = 1  # run: concurrent generate threads; simulate: micro-batches in flight
    engine: str = "torch"
    objective: str = "latency"
    prompt: str = "Once upon a time"
    max_tokens: int = 16  # run: tokens per request; simulate: decode steps simulated
    prompt_tokens: int = 16  # simulate: prefill length
    context: int | None = None  # simulate: KV context per sequence (None = the cluster file's, 4096)
    link_gbps: float | None = None  # simulate: override the cluster's default link bandwidth (Gbit/s)
    link_latency_ms: float | None = None  # simulate: override the default link latency
    dtype: str = "fp32"  # run: compute dtype of the workers
    warmup: bool = True  # run: one short generate before measuring (not traced in the summary)
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.cluster, tuple):
            d["cluster"] = list(self.cluster)
        return d


_POINT_FIELDS = {f.name: f for f in dataclasses.fields(PointConfig)}
_INT_FIELDS = {"group_size", "concurrency", "max_tokens", "prompt_tokens", "context", "seed"}
_OPTIONAL = {"context", "link_gbps", "link_latency_ms"}  # null allowed
_FLOAT_FIELDS = {"link_gbps", "link_latency_ms"}
_STR_FIELDS = {"partitioner", "codec", "engine", "objective", "prompt", "dtype"}


@dataclass(frozen=True)
class SweepConfig:
    name: str
    mode: str
    base: PointConfig
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (field, values) in file order
    measure: str = "throughput"
    description: str = ""
    results: str | None = None
    source: str = field(default="<dict>", compare=False)

    def points(self) -> list[PointConfig]:
        """The grid's product over ``base``; the cluster varies slowest (run mode reuses a cluster)."""
        axes = sorted(self.grid, key=lambda kv: kv[0] != "cluster")
        if not axes:
            return [self.base]
        names = [k for k, _ in axes]
        return [
            dataclasses.replace(self.base, **dict(zip(names, combo)))
            for combo in itertools.product(*(v for _, v in axes))
        ]

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, _ in self.grid]


_TOP_KEYS = ("name", "mode", "measure", "description", "base", "grid", "results")


def _err(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(f"sweep config {source}: {path}: {message}")


def _unknown(
    source: str, mapping: Mapping[str, Any], valid: tuple[str, ...] | list[str], prefix: str
) -> None:
    for key in mapping:
        if key not in valid:
            raise _err(source, f"{prefix}{key}", f"unknown key; valid: {', '.join(valid)}")


def _value(source: str, path: str, name: str, value: Any) -> Any:
    """Check one PointConfig value's type; returns it normalized (lists -> tuples)."""
    if value is None and name in _OPTIONAL:
        return None
    if name in _FLOAT_FIELDS:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value < 0
            or (name == "link_gbps" and value == 0)
        ):
            raise _err(
                source, path, f"expected a number {'> 0' if name == 'link_gbps' else '>= 0'}, got {value!r}"
            )
        return float(value)
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(source, path, f"expected an integer, got {value!r}")
        if value < (0 if name == "seed" else 1):
            raise _err(source, path, f"must be >= {0 if name == 'seed' else 1}, got {value}")
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str) or not value:
            raise _err(source, path, f"expected a non-empty string, got {value!r}")
        if name == "objective" and value not in OBJECTIVES:
            raise _err(source, path, f"unknown objective {value!r}; valid: {', '.join(OBJECTIVES)}")
        return value
    if name == "model":
        if value is not None and not isinstance(value, str):
            raise _err(source, path, f"expected a model name/path or null (bundled model), got {value!r}")
        return value
    if name == "warmup":
        if not isinstance(value, bool):
            raise _err(source, path, f"expected true or false, got {value!r}")
        return value
    if name == "cluster":
        if isinstance(value, bool):
            raise _err(source, path, f"expected a worker count, card list or cluster name, got {value!r}")
        if isinstance(value, int):
            if value < 1:
                raise _err(source, path, f"a cluster needs at least 1 worker, got {value}")
            return value
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise _err(
            source,
            path,
            f"expected a worker count (run), a list of catalog cards or a cluster name/file, got {value!r}",
        )
    raise _err(source, path, "unknown key")  # unreachable: callers check names first


def parse_config(data: Any, source: str = "<dict>") -> SweepConfig:
    """Validate a loaded YAML mapping into a SweepConfig (ConfigError names the bad key's path)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"sweep config {source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    _unknown(source, data, _TOP_KEYS, "")
    name = data.get("name") or Path(source).stem
    if not isinstance(name, str):
        raise _err(source, "name", f"expected a string, got {name!r}")
    mode = data.get("mode")
    if mode not in MODES:
        raise _err(source, "mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    measure = data.get("measure", "throughput")
    if measure not in MEASURES:
        raise _err(source, "measure", f"must be one of {', '.join(MEASURES)}, got {measure!r}")
    if measure == "accuracy" and mode != "run":
        raise _err(source, "measure", "accuracy needs mode: run (it runs the model); use measure: throughput")
    valid_fields = list(_POINT_FIELDS)
    base_raw = data.get("base") or {}
    if not isinstance(base_raw, Mapping):
        raise _err(source, "base", f"expected a mapping of point fields, got {type(base_raw).__name__}")
    _unknown(source, base_raw, valid_fields, "base.")
    base = PointConfig(**{k: _value(source, f"base.{k}", k, v) for k, v in base_raw.items()})
    grid_raw = data.get("grid") or {}
    if not isinstance(grid_raw, Mapping):
        raise _err(
            source, "grid", f"expected a mapping field -> list of values, got {type(grid_raw).__name__}"
        )
    _unknown(source, grid_raw, valid_fields, "grid.")
    grid = []
    for key, values in grid_raw.items():
        if not isinstance(values, list) or not values:
            raise _err(source, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        vals = tuple(_value(source, f"grid.{key}[{i}]", key, v) for i, v in enumerate(values))
        grid.append((key, vals))
    results = data.get("results")
    if results is not None and not isinstance(results, str):
        raise _err(source, "results", f"expected a folder path, got {results!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(source, "description", "expected a string")
    cfg = SweepConfig(name, mode, base, tuple(grid), measure, description, results, source)
    if mode == "run":
        for i, p in enumerate(cfg.points()):
            if not isinstance(p.cluster, int):
                raise _err(
                    source,
                    "grid.cluster" if "cluster" in cfg.grid_keys else "base.cluster",
                    f"run mode starts local workers: cluster must be a worker count, got {p.cluster!r} "
                    f"(point {i})",
                )
    return cfg


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"sweep config {p} not found; pass the path of a YAML file (see experiments/)"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep config {p}: not valid YAML: {e}") from None
    return parse_config(data, str(p))


def point_hash(cfg: SweepConfig, point: PointConfig) -> str:
    """Stable id of a point's full config (mode and measure included): resume skips points already done."""
    payload = {"mode": cfg.mode, "measure": cfg.measure, **point.as_dict()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
