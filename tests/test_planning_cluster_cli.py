"""Cluster YAML loading, plan_model and the ``hyperlane plan`` subcommand."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from hyperlane_lab.cli import plan as plan_cli
from hyperlane_lab.errors import ConfigError
from hyperlane_lab.planning import cluster_from_dict, load_cluster, plan_model, preset_profile

CLUSTERS = Path(__file__).resolve().parent.parent / "experiments" / "clusters"
GIB = 2**30

BASE: dict[str, Any] = {
    "devices": [
        {"name": "rtx4090"},
        {"name": "old-box", "memory_gib": 12, "fp16_tflops": 25, "mem_bw_gbs": 360},
    ],
    "links": {"default": {"gbit_s": 1.0, "latency_ms": 0.3}},
    "context": 4096,
    "dtype": "fp16",
}


def with_changes(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    data.update(changes)
    return data


def test_cluster_figures_are_converted_to_si_units() -> None:
    c = cluster_from_dict(BASE)
    box = c.devices[1]
    assert (box.name, box.memory_bytes, box.flops, box.mem_bw) == ("old-box", 12 * GIB, 25e12, 360e9)
    assert c.devices[0].memory_bytes == 24 * GIB
    link = c.links.between("client", "rtx4090")
    assert link.bandwidth == pytest.approx(1e9 / 8) and link.latency_s == pytest.approx(0.3e-3)
    assert c.context == 4096 and c.dtype_bytes == 2


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        (
            {"devices": [{"name": "rtx4090"}, {"name": "x", "memry_gib": 12}]},
            "devices[1].memry_gib: unknown key",
        ),
        ({"contxt": 10}, "contxt: unknown key"),
        ({"links": {"default": {"gbps": 1}}}, "links.default.gbps: unknown key"),
        (
            {"links": {"hops": [{"from": "client", "to": "rtx4090", "bw": 1}]}},
            "links.hops[0].bw: unknown key",
        ),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError, match=r"valid keys: ") as err:
        cluster_from_dict(with_changes(**changes), source="c.yaml")
    assert f"c.yaml: {path}" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"devices": [{"name": "mystery", "memory_gib": 8}]}, "lacks fp16_tflops, mem_bw_gbs"),
        ({"devices": [{"name": "x", "catalog": "rtx9999"}]}, "devices[0].catalog: unknown catalog device"),
        (
            {"devices": [{"name": "rtx4090", "memory_gib": -1}]},
            "devices[0].memory_gib: expected a number > 0",
        ),
        ({"links": {"hops": [{"from": "client", "to": "nobody"}]}}, "links.hops[0].to: unknown endpoint"),
        ({"dtype": "fp8"}, "dtype: unknown dtype"),
        ({"context": "long"}, "context: expected an integer"),
        ({"devices": []}, "devices: expected a non-empty list"),
    ],
)
def test_bad_values_name_the_key(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        cluster_from_dict(with_changes(**changes))
    assert needle in str(err.value)


def test_repeated_names_get_suffixes_and_hops_use_them() -> None:
    data = with_changes(
        devices=[
            {"name": "rtx3090"},
            {"name": "rtx3090"},
            {"name": "big", "catalog": "a6000", "memory_gib": 40},
        ],
        links={"default": {"gbit_s": 1}, "hops": [{"from": "rtx3090#2", "to": "big", "gbit_s": 10}]},
    )
    c = cluster_from_dict(data)
    assert [d.name for d in c.devices] == ["rtx3090", "rtx3090#2", "big"]
    assert c.devices[2].memory_bytes == 40 * GIB and c.devices[2].mem_bw == 768e9  # override + catalog
    assert c.links.between("big", "rtx3090#2").bandwidth == pytest.approx(10e9 / 8)
    assert c.links.between("rtx3090", "big").bandwidth == pytest.approx(1e9 / 8)
    assert c.links.between("big", "rtx3090#2").latency_s == pytest.approx(0.3e-3)  # default's latency


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_clusters_load_and_plan(path: Path) -> None:
    cluster = load_cluster(path)
    plan = plan_model("llama-2-13b", cluster, partitioner="dp_select", objective="throughput", concurrency=2)
    assert plan.n_layers == 40 and plan.predicted_tokens_per_s > 0


def test_plan_model_uses_cluster_dtype() -> None:
    fp16 = plan_model("llama-2-7b", cluster_from_dict(BASE), "dp")
    int8 = plan_model("llama-2-7b", cluster_from_dict(with_changes(dtype="int8")), "dp")
    prof = preset_profile("llama-2-7b", 1)
    assert sum(s.memory_bytes for s in int8.stages) < sum(s.memory_bytes for s in fp16.stages)
    assert prof.layer_weight_bytes[0] * 2 == preset_profile("llama-2-7b").layer_weight_bytes[0]


def _args(tmp_path: Path, **kw: Any) -> argparse.Namespace:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(json.dumps(BASE))  # JSON is YAML
    base = dict(
        model="llama-2-7b",
        cluster=str(cluster),
        partitioner="dp",
        objective="throughput",
        concurrency=2,
        batch=1,
        context=None,
        codec="fp16",
        allow_skip=False,
        json=True,
        compare=False,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.run(_args(tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"stages", "predicted", "solve_ms"}
    assert set(out["predicted"]) == {"latency_ms_per_token", "tokens_per_s", "bottleneck_ms"}
    assert [s["device"] for s in out["stages"]] == ["rtx4090", "old-box"]
    bounds = [s["layers"] for s in out["stages"]]
    assert bounds[0][0] == 0 and bounds[-1][1] == 32
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for s in out["stages"]:
        assert set(s) == {"device", "layers", "memory_gib", "predicted_ms"}
        assert 0 < s["memory_gib"] <= 24 and s["predicted_ms"] > 0
    p = out["predicted"]
    assert p["tokens_per_s"] > 0 and p["latency_ms_per_token"] >= max(
        s["predicted_ms"] for s in out["stages"]
    )


def test_cli_compare_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.run(_args(tmp_path, compare=True, json=True)) == 0
    out = json.loads(capsys.readouterr().out)["partitioners"]
    assert out["dp_select"]["pct_of_optimum"] == pytest.approx(100.0)
    assert all(v.get("pct_of_optimum", 0) <= 100.0 + 1e-9 for v in out.values())
    assert plan_cli.run(_args(tmp_path, json=False, partitioner="knapsack")) == 0
    text = capsys.readouterr().out
    assert "rtx4090" in text and "tokens/s" in text


def test_cli_reads_a_checkpoint_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    folder = Path(plan_cli.__file__).resolve().parent.parent / "assets" / "stories260K"
    assert plan_cli.run(_args(tmp_path, model=str(folder), concurrency=1)) == 0
    out = json.loads(capsys.readouterr().out)
    config = json.loads((folder / "config.json").read_text())
    assert out["stages"][-1]["layers"][1] == config["num_hidden_layers"]


def test_cli_help_names_every_partitioner() -> None:
    from hyperlane_lab.planning import PARTITIONERS

    parser = argparse.ArgumentParser()
    plan_cli.add_parser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["plan"].format_help()  # type: ignore[union-attr]
    for name in PARTITIONERS.names():
        assert name in text
