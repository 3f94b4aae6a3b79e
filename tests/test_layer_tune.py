"""``models/layer_tune.py``: the all-Triton layer's configs chosen by timing the whole step (CPU: the choice
rules against brute force, with a cost table standing in for the step timings; the GPU test is in
tests/test_gpu.py)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

from hyperlane_lab.models import layer_tune
from hyperlane_lab.models.layer_tune import ROLES, candidates, descend


@dataclass(frozen=True)
class Cfg:
    name: str
    split_k: int = 1


BY_NAME = {n: Cfg(n, 2 if n.endswith("k2") else 1) for n in ("a", "b", "c", "d", "e", "ek2")}
SHAPES = {"wqkv": (48, 16), "wo": (16, 16), "w_gate_up": (64, 16), "w_down": (16, 32)}


def _choice() -> dict:
    return {
        "48x16": {"us": {"cublas": 9.0, "a": 10.0, "b": 10.2, "c": 11.4, "d": 11.6, "e": 10.2}},
        "16x16": {"us": {"cublas": 3.0, "a": 4.0, "ek2": 3.0, "b": 3.3, "zz": 1.0}},  # zz: no such config
        "64x16": {"us": {"a": 5.0, "ek2": 1.0}, "pinned": "a"},
        "16x32": {"us": {}},
    }


def _small_stage():
    """A two-layer 64-wide CPU stage holding the whole model."""
    from hyperlane_lab.models.config import ModelSpec
    from hyperlane_lab.models.stage import TorchStage
    from hyperlane_lab.types import LayerSpan

    spec = ModelSpec("llama", 2, 64, 4, 2, 16, 128, 97, 1e-6)
    return TorchStage.random(spec, LayerSpan(0, 2), seed=0, dtype=torch.float32, device="cpu")


def test_candidates_are_the_near_configs_fastest_first_without_the_base():
    base = {"wqkv": BY_NAME["a"], "wo": BY_NAME["ek2"], "w_gate_up": BY_NAME["a"], "w_down": BY_NAME["a"]}
    got = candidates(SHAPES, _choice(), base, BY_NAME, margin=0.15, limit=3)
    # q/k/v: within 15% of 10.0 -> a, b, e (tie at 10.2: by name), c (11.4); d (11.6) is out; base a dropped;
    # limit 3
    assert [c.name for c in got["wqkv"]] == ["b", "e", "c"]
    # wo: not normed, so the split-K config counts (best 3.0, the base): b at 3.3 is within 15%, a (4.0) not;
    # "zz" and cuBLAS are not Triton configs
    assert [c.name for c in got["wo"]] == ["b"]
    assert got["w_gate_up"] == [] and got["w_down"] == []  # pinned; nothing timed
    normed = candidates(
        {"wqkv": (16, 16)}, {"16x16": {"us": {"ek2": 1.0, "a": 1.1}}}, {"wqkv": BY_NAME["b"]}, BY_NAME
    )
    assert [c.name for c in normed["wqkv"]] == ["a"]  # split-K cannot fold the norm: its time is not the best
    assert candidates(SHAPES, _choice(), base, BY_NAME, margin=0.5, limit=9)["wqkv"] == [
        BY_NAME[n] for n in ("b", "e", "c", "d")
    ]


def _table_compare(cost, calls: list):
    def compare(cur: dict, trial: dict):
        calls.append((dict(cur), dict(trial)))
        t = cost(trial)
        return None if t is None else (t, cost(cur))

    return compare


@pytest.mark.parametrize("seed", range(6))
def test_descend_finds_the_brute_force_best_of_a_separable_cost(seed):
    """A step time that is a sum of per-role times: one pass over the roles reaches the best combination."""
    rng = random.Random(seed)
    opts = {r: [f"{r}{i}" for i in range(rng.randint(1, 4))] for r in ROLES}
    part = {(r, c): rng.uniform(1, 10) for r in ROLES for c in opts[r]}

    def cost(cfgs: dict) -> float:
        return sum(part[r, cfgs[r]] for r in ROLES)

    base = {r: opts[r][0] for r in ROLES}
    calls: list = []
    best, trials = descend(base, {r: opts[r][1:] for r in ROLES}, _table_compare(cost, calls), min_gain=0.0)
    brute = min((dict(zip(ROLES, combo)) for combo in itertools.product(*opts.values())), key=cost)
    assert cost(best) == pytest.approx(cost(brute))
    assert len(calls) == len(trials) == sum(len(opts[r]) - 1 for r in ROLES)
    assert [t["config"] for t in trials] == [c for r in ROLES for c in opts[r][1:]]


def test_descend_keeps_only_trials_faster_by_min_gain_and_skips_failures():
    """With interactions between roles the pass is no worse than the start; a trial replaces the current choice
    only when at least ``min_gain`` faster, and a failed trial (None) is recorded, not kept."""
    rng = random.Random(7)
    opts = {r: [f"{r}{i}" for i in range(4)] for r in ROLES}
    inter = {combo: rng.uniform(0, 3) for combo in itertools.product(*opts.values())}

    def cost(cfgs: dict) -> float | None:
        if cfgs["wo"] == "wo2":
            return None  # its capture failed
        return 10.0 + inter[tuple(cfgs[r] for r in ROLES)]

    base = {r: opts[r][0] for r in ROLES}
    calls: list = []
    best, trials = descend(base, {r: opts[r][1:] for r in ROLES}, _table_compare(cost, calls), min_gain=0.05)
    assert cost(best) <= cost(base)
    failed = [t for t in trials if t["config"] == "wo2"]
    assert failed == [{"role": "wo", "config": "wo2", "kept": False}]
    for (cur, trial), rec in zip(calls, trials, strict=True):
        if rec["kept"]:
            assert cost(trial) < cost(cur) * 0.95
            assert (rec["us"], rec["current_us"]) == (cost(trial), cost(cur))
        elif "us" in rec:
            assert cost(trial) >= cost(cur) * 0.95
    kept = [t for t in trials if t["kept"]]
    assert {t["role"]: t["config"] for t in kept} == {r: c for r, c in best.items() if c != base[r]}


def test_tune_layer_times_once_per_setting_and_can_be_turned_off(monkeypatch):
    """On a CUDA stage the decoder's layer configs come from the step timings (the fake timer's cost table here),
    with the trials reported in ``gemv_choice``; the result is kept across calls (no second timing);
    ``HYPERLANE_LAYER_TUNE=0``, or a CPU stage, keeps the configs chosen alone."""
    pytest.importorskip("triton")
    from hyperlane_lab.codecs._kernels import kernel_module
    from hyperlane_lab.models.cuda_decode import GraphDecoder

    gk = kernel_module("gemv")
    plain = [c for c in gk.CONFIGS if c.split_k == 1]
    st = _small_stage()
    shapes = layer_tune.role_shapes(st.weights.layers[0])
    fast = {"wqkv": plain[1], "wo": plain[2], "w_gate_up": plain[0], "w_down": plain[3]}  # in the step

    def cost(cfgs: dict) -> float:
        return 100.0 - sum(5.0 for r in ROLES if cfgs[r] == fast[r])

    timings: list = []

    class FakeTimer:
        def __init__(self, gd, make, name, mode):
            assert mode == "session"  # the default
            self.name = name

        def compare(self, cur, trial):
            timings.append(trial)
            return cost(trial), cost(cur)

        def close(self):
            pass

    monkeypatch.setattr(layer_tune, "StepTimer", FakeTimer)
    monkeypatch.delenv("HYPERLANE_LAYER_TUNE", raising=False)
    gd = GraphDecoder(st)
    for n, k in shapes.values():  # every plain config timed alone within 2% of each other
        gd.gemv_choice[f"{n}x{k}"] = {"us": {gk.config_name(c): 10.0 + 0.05 * i for i, c in enumerate(plain)}}
    alone = {r: plain[0] for r in ROLES}
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == alone  # a CPU stage: not timed
    monkeypatch.setattr(st, "device", torch.device("cuda", 0))
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == fast
    assert len(timings) == 4 * min(4, len(plain) - 1)
    report = gd.gemv_choice["triton_layer_tune"]
    assert report["chosen"] == {r: gk.config_name(c) for r, c in fast.items()}
    assert report["alone"] == {r: gk.config_name(plain[0]) for r in ROLES}
    assert sum(t["kept"] for t in report["trials"]) == 3  # gate/up's fastest is the one chosen alone
    del gd.gemv_choice["triton_layer_tune"]
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == fast
    assert len(timings) == 4 * min(4, len(plain) - 1)
    assert gd.gemv_choice["triton_layer_tune"] == report  # kept: reported again, not timed again
    monkeypatch.setenv("HYPERLANE_LAYER_TUNE", "0")
    assert layer_tune.tune_layer(GraphDecoder(st), alone, lambda c: None) == alone


def test_a_failed_tuning_keeps_the_configs_timed_alone_and_says_why(monkeypatch):
    """A timing that raises (e.g. the starting configs fail to capture) leaves the configs chosen alone, recorded
    in ``fallbacks`` and the report, once (kept like a result); with tuning off no stale report is left."""
    pytest.importorskip("triton")
    from hyperlane_lab.codecs._kernels import kernel_module
    from hyperlane_lab.models.cuda_decode import GraphDecoder

    gk = kernel_module("gemv")
    plain = [c for c in gk.CONFIGS if c.split_k == 1]
    st = _small_stage()
    calls: list = []

    class Broken:
        def __init__(self, *a):
            pass

        def compare(self, cur, trial):
            calls.append(trial)
            raise RuntimeError("no kernel image")

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(layer_tune, "StepTimer", Broken)
    monkeypatch.delenv("HYPERLANE_LAYER_TUNE", raising=False)
    monkeypatch.setattr(st, "device", torch.device("cuda", 0))
    gd = GraphDecoder(st)
    for n, k in layer_tune.role_shapes(st.weights.layers[0]).values():
        gd.gemv_choice[f"{n}x{k}"] = {"us": {gk.config_name(c): 10.0 for c in plain}}
    alone = {r: plain[0] for r in ROLES}
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == alone
    assert len(calls) == 2 and calls[-1] == "closed" and not gd._tuning
    assert gd.fallbacks == ["layer tuning: RuntimeError: no kernel image"]
    assert gd.gemv_choice["triton_layer_tune"]["error"] == "RuntimeError: no kernel image"
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == alone and len(calls) == 2  # not tried again
    gd.layer_tune_enabled = False
    assert layer_tune.tune_layer(gd, alone, lambda c: None) == alone
    assert "triton_layer_tune" not in gd.gemv_choice


def test_the_step_timer_restores_the_decoder_after_a_failed_capture():
    """``StepTimer``: a trial whose capture fails gives None and leaves the decoder's layer and capture count as
    they were; a starting config whose capture fails raises (the tuning stops)."""
    from types import SimpleNamespace

    st = _small_stage()
    seen: list = []

    def capture(cache, degrade=True):
        assert degrade is False
        seen.append(gd._tlayer)
        gd.captures += 5  # as a capture would count itself
        if gd._tlayer == ("layer", "bad"):
            raise RuntimeError("out of resources")
        return SimpleNamespace(
            io=torch.zeros(2, 1, dtype=torch.int64), greedy=torch.zeros(2, dtype=torch.int64)
        )

    own = object()
    gd = SimpleNamespace(stage=st, _tlayer=own, captures=3, cache_len=lambda n: n, _capture=capture)
    timer = layer_tune.StepTimer(gd, lambda c: ("layer", c["wqkv"]))  # type: ignore[arg-type]
    cur = dict.fromkeys(ROLES, "good")
    assert timer.compare(cur, {**cur, "wqkv": "bad"}) is None
    assert seen == [("layer", "good"), ("layer", "bad")] and gd._tlayer is own and gd.captures == 3
    g, cache = timer.graph(cur)  # kept; its first session input is a valid id, its position a real one
    assert g.greedy.tolist() == [1, 1] and g.io[:, 0].tolist() == [1, 16] and cache.max_len == 64
    with pytest.raises(RuntimeError, match="out of resources"):
        timer.compare({**cur, "wqkv": "bad"}, cur)
    assert gd._tlayer is own and gd.captures == 3
