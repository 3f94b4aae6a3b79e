"""YAML sweeps: typed configs (unknown keys with their path), the grid, resumable incremental results,
the simulate evaluator against direct planner calls, the shipped experiments and the CLI."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from hyperlane_lab import sweep
from hyperlane_lab.errors import ConfigError
from hyperlane_lab.sweep import runner
from hyperlane_lab.sweep.config import PointConfig, load_config, parse_config, point_hash

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

SMALL = {
    "name": "small",
    "mode": "simulate",
    "base": {"model": "llama-2-7b", "max_tokens": 4, "prompt_tokens": 8},
    "grid": {
        "partitioner": ["uniform", "dp"],
        "cluster": [["rtx4090", "rtx3090"], ["rtx3060", "rtx3090"]],
        "concurrency": [1, 2],
    },
}


def write_yaml(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------- config


def test_unknown_grid_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    p = write_yaml(
        tmp_path,
        """
        mode: simulate
        grid:
          partitoner: [uniform, dp]
    """,
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "grid.partitoner: unknown key; valid: model, partitioner, codec" in msg
    assert str(p) in msg


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"mode": "simulate", "bsae": {}}, "bsae: unknown key"),
        ({"mode": "simulate", "base": {"concurency": 2}}, "base.concurency: unknown key"),
        (
            {"mode": "simulate", "grid": {"concurrency": [1, "two"]}},
            "grid.concurrency[1]: expected an integer",
        ),
        ({"mode": "simulate", "grid": {"codec": "int8"}}, "grid.codec: expected a non-empty list"),
        ({"mode": "simulate", "base": {"objective": "fast"}}, "base.objective: unknown objective"),
        ({"mode": "simulat"}, "mode: must be one of simulate, run"),
        ({"mode": "simulate", "measure": "accuracy"}, "measure: accuracy needs mode: run"),
        ({"mode": "run", "base": {"cluster": ["rtx4090"]}}, "base.cluster: run mode starts local workers"),
        ({"mode": "simulate", "base": {"link_gbps": 0}}, "base.link_gbps: expected a number > 0"),
    ],
)
def test_bad_values_name_their_path(data: dict, path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data, "x.yaml")


def test_grid_is_the_product_with_cluster_slowest() -> None:
    cfg = parse_config(SMALL)
    points = cfg.points()
    assert len(points) == 2 * 2 * 2
    clusters = [p.cluster for p in points]
    assert clusters == [("rtx4090", "rtx3090")] * 4 + [("rtx3060", "rtx3090")] * 4
    assert {(p.partitioner, p.concurrency) for p in points[:4]} == {
        ("uniform", 1),
        ("uniform", 2),
        ("dp", 1),
        ("dp", 2),
    }
    assert all(p.model == "llama-2-7b" and p.max_tokens == 4 for p in points)
    assert len({point_hash(cfg, p) for p in points}) == len(points)


def test_point_hash_depends_on_every_field_and_the_mode() -> None:
    cfg = parse_config(SMALL)
    p = cfg.points()[0]
    h = point_hash(cfg, p)
    assert point_hash(cfg, PointConfig(**{**p.__dict__, "seed": 1})) != h
    assert point_hash(cfg, PointConfig(**{**p.__dict__, "link_gbps": 10.0})) != h
    other = parse_config({**SMALL, "mode": "simulate", "name": "renamed"})
    assert point_hash(other, p) == h  # the name is not part of a point's identity


# ---------------------------------------------------------------- resume


def test_interrupted_sweep_resumes_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []
    stop_after = 3

    def evaluate(point: PointConfig, ctx: runner.SweepContext) -> list[dict]:
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # the user interrupts the 4th point
        calls.append((point.partitioner, point.cluster, point.concurrency))
        return [{"value": 10 * point.concurrency + len(point.partitioner)}]

    monkeypatch.setitem(runner.EVALUATORS, ("simulate", "throughput"), evaluate)
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        sweep.run(SMALL, out, progress=False)
    saved = pd.read_csv(out / "results.csv")  # written incrementally, before the interrupt
    assert len(saved) == stop_after and (saved["status"] == "ok").all()
    first = list(calls)

    calls.clear()
    stop_after = 10**9
    df = sweep.run(SMALL, out, progress=False)
    assert len(calls) == 8 - 3  # only the unfinished points ran
    assert not set(calls) & set(first)
    assert len(df) == 8 and (df["status"] == "ok").all()
    want = [10 * p.concurrency + len(p.partitioner) for p in parse_config(SMALL).points()]
    assert df["value"].tolist() == want  # rows in config order, old and new alike

    calls.clear()
    sweep.run(SMALL, out, progress=False)
    assert calls == []  # everything done


def test_failed_points_are_recorded_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: dict[str, int] = {}

    def flaky(point: PointConfig, ctx: runner.SweepContext) -> list[dict]:
        key = f"{point.partitioner}{point.cluster}{point.concurrency}"
        attempts[key] = attempts.get(key, 0) + 1
        if point.partitioner == "dp" and attempts[key] == 1:
            raise RuntimeError("worker went away")
        return [{"value": 1}]

    monkeypatch.setitem(runner.EVALUATORS, ("simulate", "throughput"), flaky)
    df = sweep.run(SMALL, tmp_path, progress=False)
    bad = df[df.status == "error"]
    assert len(bad) == 4 and bad["error"].str.contains("worker went away").all()
    df = sweep.run(SMALL, tmp_path, progress=False)
    assert (df.status == "ok").all()
    assert sum(attempts.values()) == 8 + 4


def test_fail_fast_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(point: PointConfig, ctx: runner.SweepContext) -> list[dict]:
        raise RuntimeError("boom")

    monkeypatch.setitem(runner.EVALUATORS, ("simulate", "throughput"), broken)
    with pytest.raises(RuntimeError, match="boom"):
        sweep.run(SMALL, tmp_path, progress=False, fail_fast=True)


def test_multi_row_points_replace_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def rows(point: PointConfig, ctx: runner.SweepContext) -> list[dict]:
        return [{"boundary": b, "err": b * point.concurrency} for b in (1, 2, 3)]

    monkeypatch.setitem(runner.EVALUATORS, ("simulate", "throughput"), rows)
    df = sweep.run(SMALL, tmp_path, progress=False)
    assert len(df) == 8 * 3
    assert df.groupby("point_hash").size().eq(3).all()


# ---------------------------------------------------------------- simulate mode (real planner)


def test_simulate_points_match_direct_planner_calls(tmp_path: Path) -> None:
    partitioners = pytest.importorskip("hyperlane_lab.planning.partitioners")
    from hyperlane_lab.planning.cluster import cluster_from_dict
    from hyperlane_lab.planning.shapes import preset_profile
    from hyperlane_lab.planning.simulator import simulate_plan
    from hyperlane_lab.planning.table import PlanOptions

    df = sweep.run(SMALL, tmp_path, progress=False)
    assert (df.status == "ok").all() and df["feasible"].all()
    for p, row in zip(parse_config(SMALL).points(), df.itertuples()):
        cluster = cluster_from_dict({"devices": [{"name": c} for c in p.cluster]})
        opts = PlanOptions(concurrency=p.concurrency, context=cluster.context, codec="fp16")
        model = preset_profile("llama-2-7b")
        plan = partitioners.get_partitioner(p.partitioner)(model, cluster.devices, cluster.links, opts)
        sim = simulate_plan(
            plan, model, cluster.devices, cluster.links, opts, prompt_tokens=8, decode_steps=4
        )
        assert row.predicted_tokens_per_s == pytest.approx(plan.predicted_tokens_per_s)
        assert row.sim_decode_tokens_per_s == pytest.approx(sim.summary.decode_tokens_per_s)
        assert row.stages == len(plan.stages)
        assert row.cluster == "+".join(p.cluster)


def test_simulate_cluster_file_links_and_infeasible_points(tmp_path: Path) -> None:
    pytest.importorskip("hyperlane_lab.planning.partitioners")
    write_yaml(
        tmp_path,
        """
        devices:
          - name: rtx3060
          - name: rtx3060
        links:
          default: {gbit_s: 1.0, latency_ms: 0.5}
    """,
        "two3060.yaml",
    )
    cfg = write_yaml(
        tmp_path,
        """
        mode: simulate
        base: {model: llama-2-7b, partitioner: uniform, cluster: two3060.yaml, max_tokens: 2}
        grid:
          link_gbps: [1.0, 100.0]
          model: [llama-2-7b, llama-2-70b]
    """,
    )
    df = sweep.run(cfg, tmp_path / "out", progress=False).set_index(["model", "link_gbps"])
    assert df.loc[("llama-2-70b", 1.0), "feasible"] == False  # noqa: E712  (70B cannot fit 2x12 GiB)
    assert df.loc[("llama-2-70b", 1.0), "status"] == "ok"  # deterministic: not retried
    fast, slow = df.loc[("llama-2-7b", 100.0)], df.loc[("llama-2-7b", 1.0)]
    assert fast["predicted_latency_ms"] < slow["predicted_latency_ms"]  # faster links, lower latency


def test_simulate_rejects_worker_counts() -> None:
    from hyperlane_lab.sweep.simulate import cards_of, point_cluster

    with pytest.raises(ValueError, match="catalog cards"):
        point_cluster(PointConfig(cluster=3))
    assert cards_of("rtx4090+2xrtx3060") == ["rtx4090", "rtx3060", "rtx3060"]
    assert cards_of(("a6000", "3*l4")) == ["a6000", "l4", "l4", "l4"]


# ---------------------------------------------------------------- shipped experiments + CLI


@pytest.mark.parametrize("name", ["partitioners_catalog", "codec_accuracy", "concurrency_bubbles"])
def test_shipped_experiments_are_valid(name: str) -> None:
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    points = cfg.points()
    assert points
    try:
        from hyperlane_lab.planning.partitioners import PARTITIONERS
    except ImportError:
        PARTITIONERS = None
    if PARTITIONERS is not None:
        assert all(p.partitioner in PARTITIONERS for p in points)
    from hyperlane_lab import codecs

    assert all(p.codec in codecs.names() for p in points)
    if cfg.mode == "run":
        assert len(points) <= 8  # run sweeps stay CI-sized


def test_cli_runs_a_sweep_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hyperlane_lab.planning.partitioners")
    from hyperlane_lab.cli import sweep as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    cfg = write_yaml(
        tmp_path,
        """
        mode: simulate
        base: {model: llama-2-7b, cluster: [rtx4090, rtx3090], max_tokens: 2}
        grid: {partitioner: [uniform, dp]}
    """,
    )
    args = parser.parse_args(
        [
            "sweep",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--columns",
            "partitioner,predicted_tokens_per_s",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "dp" in out and "predicted_tokens_per_s" in out
    assert "2 rows ->" in out and (tmp_path / "o" / "results.csv").exists()
    args = parser.parse_args(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--columns", "nope"])
    with pytest.raises(ValueError, match="no column"):
        args.func(args)


# ---------------------------------------------------------------- run mode pieces


def test_concurrent_generate_runs_threads_together() -> None:
    import threading

    from hyperlane_lab.sweep.local import concurrent_generate

    inside, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(3, timeout=10)

    class Model:
        def generate(self, prompt: str, max_tokens: int, seed: int) -> tuple[str, int]:
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            gate.wait()  # only passes when all 3 requests are in flight at once
            with lock:
                inside[0] -= 1
            return (prompt, seed)

    results, wall = concurrent_generate(Model(), "p", 4, 3, seed=10)
    assert peak[0] == 3 and sorted(results) == [("p", 10), ("p", 11), ("p", 12)] and wall >= 0


def test_accuracy_sweep_on_bundled_model(tmp_path: Path) -> None:
    pytest.importorskip("hyperlane_lab.probes")
    cfg = {
        "mode": "run",
        "measure": "accuracy",
        "base": {"model": None, "cluster": 1, "max_tokens": 2, "group_size": 32},
        "grid": {"codec": ["fp16", "int8", "int4"]},
    }
    df = sweep.run(cfg, tmp_path, progress=False)
    assert (df.status == "ok").all()
    # the bundled model has 5 layers: cuts before layers 1..4, plus the all-boundaries row
    assert sorted(set(df["boundary"])) == ["1", "2", "3", "4", "all"]
    every = df[df.boundary == "all"].set_index("codec")
    # fp16 rounding of fp32 activations: relative error ~ 2^-11 at most; int8 < int4 by far
    assert every.loc["fp16", "rel_l2"] < 1e-3
    assert every.loc["fp16", "rel_l2"] < every.loc["int8", "rel_l2"] < every.loc["int4", "rel_l2"]
    assert every.loc["int8", "kl"] < every.loc["int4", "kl"]
    assert (df["kl"] >= -1e-12).all() and (df["cosine"] <= 1 + 1e-9).all()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_run_sweep_on_a_local_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = pytest.importorskip("hyperlane_lab.runtime.local_cluster")
    started = []

    class CountingCluster(runtime.LocalCluster):
        def start(self):
            started.append(self.n)
            return super().start()

    import hyperlane_lab.runtime as rt

    monkeypatch.setattr(rt, "LocalCluster", CountingCluster, raising=False)
    cfg = {
        "mode": "run",
        "base": {"model": None, "cluster": 2, "max_tokens": 6, "prompt": "Once upon a time", "codec": "fp16"},
        "grid": {"concurrency": [1, 3]},
    }
    df = sweep.run(cfg, tmp_path, progress=False, fail_fast=True)
    assert started == [2]  # one cluster serves both points
    assert df["concurrency"].tolist() == [1, 3]
    assert df["generated_tokens"].tolist() == [6, 18]  # greedy, no EOS this early in a TinyStories story
    assert (df["stages"] == 2).all() and (df["trace_events"] > 0).all()
    assert ((df["bubble_pct_mean"] >= 0) & (df["bubble_pct_mean"] <= 100)).all()
    again = sweep.run(cfg, tmp_path, progress=False)
    assert (
        started == [2] and again["tokens_per_s"].tolist() == df["tokens_per_s"].tolist()
    )  # resumed: no rerun
